"""Scoring split by customer ranges over 2 torchrun ranks merges to the one-process ranking."""

import polars as pl
import torch
import pytest

from feedpipe import scoring, sharded_scoring
from feedpipe.process_group import split_range
from feedpipe.ranking import model_ranking
from feedpipe.scoring import (
    AMX_BF16_PAIRS_PER_TILE,
    DEFAULT_PAIRS_PER_TILE,
    DEFAULT_PAIRS_PER_UNIT,
    customers_as_rows,
    default_pairs_per_tile,
    tile_shape,
)
from feedpipe.sharded_scoring import (
    agreed_customers_per_unit,
    customer_range,
    customers_per_unit,
    part_path,
    rank_customers,
    score_rank_part,
)
from feedpipe.training import TrainConfig, TrainedModel, model_shape, split_examples, train_dlrm
from feedpipe.training_examples import purchased_pairs
from feedpipe.vocabularies import Vocabularies
from feedpipe_tests.distributed_fixtures import read_summary, run_ranks, write_demo_inputs


@pytest.fixture(scope="module")
def scoring_inputs(tmp_path_factory):
    d = tmp_path_factory.mktemp("dist_score")
    # 2,000 products: the scorer's unit is a few hundred customers (512 at its current defaults), so
    # 1,200 customers are enough for both ranks to get whole units (see the test below).
    paths = write_demo_inputs(d, customers=1200, products=2000, seed=4)
    vocab = Vocabularies.load(paths["vocabularies"])
    cfg = TrainConfig(epochs=1, batch_size=1024)
    train, valid = split_examples(pl.read_parquet(paths["examples"]), vocab.customer_specs, vocab.product_specs)
    model = train_dlrm(train, valid, model_shape(vocab.customer_specs, vocab.product_specs, vocab, cfg), cfg).model
    trained = TrainedModel(model, vocab.customer_specs, vocab.product_specs, vocab, "v1")
    trained.save(d / "model")
    # 2 units (of the CPU scorer's layout, customers as rows) and a part: ranges of 2 units and 1
    n = min(1200, 2 * customers_per_unit(2000, customer_rows=True) + 79)
    customers = pl.read_parquet(paths["customers"]).head(n)
    customers.write_parquet(paths["customers"])
    exclude = purchased_pairs(pl.read_parquet(paths["transactions"]))
    exclude.write_parquet(d / "exclude.parquet")
    return d, paths, trained, customers, exclude


@pytest.mark.parametrize("n, parts", [(299, 2), (10, 3), (2, 4), (0, 2)])
def test_customer_ranges_are_contiguous_cover_everyone_and_differ_by_at_most_one(n, parts):
    ranges = [split_range(n, parts, i) for i in range(parts)]
    assert ranges[0][0] == 0 and ranges[-1][1] == n
    assert all(a[1] == b[0] for a, b in zip(ranges, ranges[1:]))
    sizes = [stop - start for start, stop in ranges]
    assert max(sizes) - min(sizes) <= 1


@pytest.mark.parametrize("rows", [False, True])
def test_rank_ranges_are_whole_scorer_units_and_cover_every_customer(rows):
    per_unit = customers_per_unit(2000, customer_rows=rows)
    assert per_unit % tile_shape(2000, DEFAULT_PAIRS_PER_TILE, rows)[0] == 0 and per_unit < 600
    n = 2 * per_unit + 79
    ranges = [customer_range(n, 2000, 2, r, customer_rows=rows) for r in range(2)]
    assert ranges == [(0, 2 * per_unit), (2 * per_unit, n)]
    ranges = [customer_range(n, 2000, 3, r, customer_rows=rows) for r in range(3)]
    assert ranges == [(0, per_unit), (per_unit, 2 * per_unit), (2 * per_unit, n)]
    assert [customer_range(10, 2000, 3, r, customer_rows=rows) for r in range(3)] == [(0, 10), (10, 10), (10, 10)]


class _PeerGroup:
    """A rank of a group whose `min` sees every rank's value, as the gloo all-reduce does."""

    def __init__(self, rank: int, values: list[int]) -> None:
        self.rank, self.world_size, self._values = rank, len(values), values

    def min(self, value: int) -> int:
        assert value == self._values[self.rank]
        return min(self._values)


# bf16 on two hosts: (tile, customers as rows) as `default_pairs_per_tile` and `customers_as_rows`
# choose them with AMX (32k tiles, products as rows) and without (8k tiles, customers as rows).
BF16_HOSTS = [(AMX_BF16_PAIRS_PER_TILE, False), (DEFAULT_PAIRS_PER_TILE, True)]


def test_ranks_on_hosts_with_different_tiles_still_cover_every_customer_once():
    customers = pl.DataFrame({"customer_id": [f"c{i}" for i in range(25_000)]})
    n_products = 3000
    own = [customers_per_unit(n_products, t, DEFAULT_PAIRS_PER_UNIT, rows) for t, rows in BF16_HOSTS]
    assert own == [340, 512]
    # Each rank cutting its own unit would score some customers twice (or never):
    mine = [customer_range(customers.height, n_products, 2, r, t, customer_rows=rows)
            for r, (t, rows) in enumerate(BF16_HOSTS)]
    assert mine[0][1] != mine[1][0]
    parts = []
    for rank, (tile, rows) in enumerate(BF16_HOSTS):
        group = _PeerGroup(rank, own)
        per_unit = agreed_customers_per_unit(group, n_products, tile, DEFAULT_PAIRS_PER_UNIT, rows)
        parts.append(rank_customers(customers, group, per_unit))
    assert all(p.height for p in parts)
    assert pl.concat(parts).equals(customers)


def test_score_rank_part_cuts_its_range_from_the_unit_the_ranks_agree_on(scoring_inputs, monkeypatch, tmp_path):
    """Each rank's real choice of tile and layout (AMX or not patched in), the scoring itself stubbed out."""
    _, paths, trained, customers, _ = scoring_inputs
    products = pl.read_parquet(paths["products"]).head(1500)
    own = [customers_per_unit(products.height, t, DEFAULT_PAIRS_PER_UNIT, rows) for t, rows in BF16_HOSTS]
    assert own[0] != own[1]
    monkeypatch.setattr(sharded_scoring, "model_ranking", lambda trained, mine, products, **kw: mine)
    for rank, amx in enumerate((True, False)):
        monkeypatch.setattr(scoring, "has_amx", lambda amx=amx: amx)
        score_rank_part(trained, customers, products, _PeerGroup(rank, own), tmp_path, top_n=5,
                        dtype=torch.bfloat16)
    parts = [pl.read_parquet(part_path(tmp_path, r)) for r in range(2)]
    assert all(p.height for p in parts)
    assert pl.concat(parts).equals(customers)


def test_two_rank_scoring_merges_to_the_one_process_ranking_row_for_row(scoring_inputs):
    d, paths, trained, customers, exclude = scoring_inputs
    products = pl.read_parquet(paths["products"])
    assert customers_as_rows(trained.model, products.height, torch.device("cpu"))  # the layout the ranges assume
    assert customer_range(customers.height, products.height, 2, 1, customer_rows=True)[0] < customers.height
    unavailable = products.get_column("product_id").head(5)  # out of stock: never recommended, never counted
    unavailable.to_frame().write_parquet(d / "unavailable.parquet")
    expected = model_ranking(trained, customers, products, top_n=25, exclude=exclude, unavailable=unavailable)
    assert not expected.filter(pl.col("product_id").is_in(unavailable.implode())).height
    out = d / "ranking.parquet"
    run_ranks(["score", "--model", str(d / "model"), "--customers", str(paths["customers"]),
               "--products", str(paths["products"]), "--exclude", str(d / "exclude.parquet"),
               "--unavailable", str(d / "unavailable.parquet"), "--out", str(out), "--top-n", "25"])
    got = pl.read_parquet(out)
    assert got.equals(expected)  # same rows, same order, same scores to the bit
    summary = read_summary(d / "ranking.summary.json")
    assert summary["ranks"] == 2 and summary["pairs_scored"] == customers.height * (products.height - 5)
    assert summary["rows"] == expected.height and len(summary["rank_seconds"]) == 2
    assert not (d / "ranking.parts").exists() or not any((d / "ranking.parts").iterdir())


def test_bf16_rerank_split_at_rank_ranges_equals_one_process(scoring_inputs):
    """What each rank computes with bf16-rerank (its range at the bf16 tile), concatenated, is the one-process frame."""
    _, paths, trained, customers, exclude = scoring_inputs
    products = pl.read_parquet(paths["products"])
    tile = default_pairs_per_tile(torch.device("cpu"), torch.bfloat16)
    rows = customers_as_rows(trained.model, products.height, torch.device("cpu"), torch.bfloat16)
    kw = dict(top_n=25, exclude=exclude, dtype=torch.bfloat16, rerank=True)
    expected = model_ranking(trained, customers, products, **kw)
    parts = []
    for rank in range(3):
        start, stop = customer_range(customers.height, products.height, 3, rank, tile, customer_rows=rows)
        parts.append(model_ranking(trained, customers.slice(start, stop - start), products, **kw))
    assert sum(p.height > 0 for p in parts) >= 2  # the split happened
    assert pl.concat(parts).equals(expected)
