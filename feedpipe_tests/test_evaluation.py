import math

import polars as pl
import pytest

from feedpipe.evaluation import evaluation_customers, recall_at_k
from feedpipe.ranking import model_ranking, popularity_ranking
from feedpipe.training import TrainConfig, TrainedModel, model_shape, split_examples, train_dlrm
from feedpipe_tests.model_fixtures import CUSTOMER_SPECS, PRODUCT_SPECS, grouped_data


def _ranking(rows):
    return pl.DataFrame(rows, schema={"customer_id": pl.Utf8, "product_id": pl.Utf8, "rank": pl.Int32}, orient="row")


def test_recall_at_k_by_hand():
    ranking = _ranking([("a", "x", 1), ("a", "y", 2), ("a", "z", 3), ("b", "x", 1), ("b", "w", 2)])
    holdout = pl.DataFrame({"customer_id": ["a", "a", "b"], "product_id": ["y", "q", "q"]})
    # a: top-2 {x, y} hits y of {y, q} -> 0.5; b: top-2 {x, w} misses q -> 0.0
    assert recall_at_k(ranking, holdout, 2) == pytest.approx(0.25)
    assert recall_at_k(ranking, holdout, 1) == pytest.approx(0.0)


def test_popularity_ranking_skips_each_customers_own_purchases():
    purchases = pl.DataFrame({"customer_id": ["a", "b", "c", "a", "b", "a"], "product_id": ["x", "x", "x", "y", "y", "z"]})
    ranking = popularity_ranking(purchases, pl.Series(["a", "b", "new"]), top_n=2, exclude=purchases)
    got = {c: ranking.filter(pl.col("customer_id") == c).sort("rank").get_column("product_id").to_list() for c in ["a", "b", "new"]}
    assert got == {"a": [], "b": ["z"], "new": ["x", "y"]}


def test_evaluation_customers_need_history_and_new_purchases():
    train = pl.DataFrame({"customer_id": ["a", "b"], "product_id": ["x", "x"]})
    held = pl.DataFrame({"customer_id": ["a", "c"], "product_id": ["y", "y"]})
    assert evaluation_customers(train, held).to_list() == ["a"]


def test_model_ranking_applies_exclusions_and_ranks_from_one():
    customers, products, vocab, examples = grouped_data()
    train, valid = split_examples(examples, CUSTOMER_SPECS, PRODUCT_SPECS)
    cfg = TrainConfig(epochs=3, batch_size=256, learning_rate=1e-2)
    model = train_dlrm(train, valid, model_shape(CUSTOMER_SPECS, PRODUCT_SPECS, vocab, cfg), cfg).model
    trained = TrainedModel(model, CUSTOMER_SPECS, PRODUCT_SPECS, vocab, "v")
    exclude = pl.DataFrame({"customer_id": ["c0", "c0"], "product_id": ["p0", "p3"]})
    ranking = model_ranking(trained, customers, products, top_n=5, exclude=exclude)
    assert ranking.height == customers.height * 5
    assert ranking.group_by("customer_id").agg(pl.col("rank").sort()).get_column("rank").to_list()[0] == [1, 2, 3, 4, 5]
    c0 = ranking.filter(pl.col("customer_id") == "c0").get_column("product_id").to_list()
    assert "p0" not in c0 and "p3" not in c0
    # c0 is in group g0: its top products are g0 products (p0, p3 excluded), i.e. indices = 0 mod 3
    assert all(int(p[1:]) % 3 == 0 for p in c0)
    scores = ranking.filter(pl.col("customer_id") == "c0").sort("rank").get_column("score").to_list()
    assert scores == sorted(scores, reverse=True)


def test_products_a_ranking_never_placed_are_never_hits():
    """Fewer than k ranked products (or none) must not let the unranked relevant ones into the top k."""
    from feedpipe.evaluation import ranking_metrics

    holdout = pl.DataFrame({"customer_id": ["a", "b", "c"], "product_id": ["q", "q", "x"]})
    ranking = _ranking([("a", "x", 1), ("c", "x", 1)])  # a: one wrong product; b: nothing ranked; c: a hit
    m = ranking_metrics(ranking, holdout, k=3)
    assert m["recall"] == pytest.approx(1 / 3) and m["hit_rate"] == pytest.approx(1 / 3)
    assert m["map"] == pytest.approx(1 / 3) and m["ndcg"] == pytest.approx(1 / 3)
    assert m["recall"] == pytest.approx(recall_at_k(ranking, holdout, 3))
    empty = ranking_metrics(ranking.clear(), holdout, k=3)
    assert empty["recall"] == 0 and empty["hit_rate"] == 0 and empty["ndcg"] == 0
    assert math.isnan(ranking_metrics(ranking, holdout.clear(), k=3)["recall"])


def test_ranking_metrics_match_a_hand_computed_case():
    import math

    from feedpipe.evaluation import ranking_metrics

    ranking = _ranking([("a", "x", 1), ("a", "y", 2), ("a", "z", 3), ("b", "x", 1), ("b", "w", 2)])
    holdout = pl.DataFrame({"customer_id": ["a", "a", "b"], "product_id": ["y", "q", "q"]})
    m = ranking_metrics(ranking, holdout, k=2, catalogue_size=10)
    # a: relevant {y, q}; top-2 [x, y] -> recall 1/2, hit 1, DCG = 1/log2(3), IDCG = 1 + 1/log2(3),
    #    AP@2 = (precision at the hit, 1/2) / relevant-in-top-k (torchmetrics divides by hits) = 1/2
    # b: relevant {q}; top-2 [x, w] -> all zero
    assert m["recall"] == pytest.approx(0.25)
    assert m["hit_rate"] == pytest.approx(0.5)
    ndcg_a = (1 / math.log2(3)) / (1 + 1 / math.log2(3))
    assert m["ndcg"] == pytest.approx(ndcg_a / 2, rel=1e-5)
    assert m["map"] == pytest.approx(0.25)
    assert m["coverage"] == pytest.approx(3 / 10)
    assert m["customers"] == 2
    assert m["recall"] == pytest.approx(recall_at_k(ranking, holdout, 2))


@pytest.mark.parametrize("overrides, named", [({"k": 0}, "k"), ({"max_customers": -1}, "max_customers")])
def test_an_evaluation_config_that_evaluates_nothing_names_the_setting(overrides, named):
    """A bound of the config class, so `feedpipe run` refuses it before any step (cli._check_asset_configs)."""
    import pydantic

    from feedpipe.defs.evaluation import EvaluationConfig

    assert EvaluationConfig().k == 20
    with pytest.raises(pydantic.ValidationError, match=rf"{named}\n.*greater than or equal to 1"):
        EvaluationConfig(**overrides)


def test_the_gate_compares_ndcg_where_k_covers_the_catalogue():
    """With K >= the products every ranker lists them all and recall ties at 1.0: the order decides."""
    from feedpipe.defs.evaluation import gate_metric

    assert gate_metric(20, 2000) == "recall"
    assert gate_metric(20, 12) == gate_metric(20, 20) == "ndcg"

