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
    #    AP@2 = (precision at the hit, 1/2) / min(k, relevant) = 1/4
    # b: relevant {q}; top-2 [x, w] -> all zero
    assert m["recall"] == pytest.approx(0.25)
    assert m["hit_rate"] == pytest.approx(0.5)
    ndcg_a = (1 / math.log2(3)) / (1 + 1 / math.log2(3))
    assert m["ndcg"] == pytest.approx(ndcg_a / 2, rel=1e-5)
    assert m["map"] == pytest.approx(0.125)
    assert m["coverage"] == pytest.approx(3 / 10)
    assert m["customers"] == 2
    assert m["recall"] == pytest.approx(recall_at_k(ranking, holdout, 2))


def test_map_at_k_divides_by_the_relevant_products_the_top_k_could_hold():
    """torchmetrics' RetrievalMAP(top_k) divides by the hits it found: one hit at rank 1 among five relevant
    products scored 1.0, beside a recall of 0.2."""
    from feedpipe.evaluation import ranking_metrics

    ranking = _ranking([("a", p, r) for r, p in enumerate("vwxyz", start=1)] + [("b", "m", 1), ("b", "v", 2)])
    holdout = pl.DataFrame({"customer_id": ["a"] * 5 + ["b"] * 3, "product_id": list("vqrst") + ["v", "n", "o"]})
    m = ranking_metrics(ranking, holdout, k=5)
    # a: one hit at rank 1 of 5 relevant -> 1/5; b: a hit at rank 2 of 3 relevant, k=5 -> (1/2) / 3
    assert m["recall"] == pytest.approx((1 / 5 + 1 / 3) / 2)
    assert m["map"] == pytest.approx((1 / 5 + 1 / 6) / 2)
    # k below the relevant count: a's top 2 [v, w] -> (1/1) / min(2, 5)
    assert ranking_metrics(ranking, holdout.filter(pl.col("customer_id") == "a"), k=2)["map"] == pytest.approx(0.5)


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



def test_the_evaluation_hides_what_the_feed_would_and_counts_no_hit_on_it(monkeypatch):
    """A product bought before the training days but within the feed's exclusion window, and bought again in the
    holdout, was a positive every ranker could hit, though the published feed never shows it."""
    import torch

    from feedpipe import model_evaluation
    from feedpipe.model_evaluation import HeldOut, evaluate_rankers

    seen = []
    monkeypatch.setattr(model_evaluation, "model_ranking", lambda trained, c, p, *, top_n, exclude: seen.append(
        exclude) or popularity_ranking(pl.DataFrame(schema={"customer_id": pl.Utf8, "product_id": pl.Utf8}),
                                       c.get_column("customer_id"), top_n=top_n, exclude=exclude))
    pairs = [("a", "p1", "train"), ("b", "p2", "train"), ("a", "p3", "test"), ("a", "p4", "test"), ("b", "p3", "test")]
    examples = pl.DataFrame(
        {"customer_id": [c for c, _, _ in pairs], "product_id": [p for _, p, _ in pairs],
         "label": [1.0] * len(pairs), "split": [s for _, _, s in pairs]},
        schema_overrides={"label": pl.Float32},
    )
    train = examples.filter(pl.col("split") == "train").select("customer_id", "product_id")
    early = pl.DataFrame({"customer_id": ["a"], "product_id": ["p3"]})  # bought before the training days
    truth = pl.DataFrame({"customer_id": ["a"] * 4 + ["b"] * 4, "product_id": ["p1", "p2", "p3", "p4"] * 2,
                          "score": [0.1, 0.05, 0.9, 0.8, 0.1, 0.2, 0.9, 0.3]})
    customers, products = pl.DataFrame({"customer_id": ["a", "b"]}), pl.DataFrame({"product_id": ["p1", "p2", "p3", "p4"]})
    trained = type("Trained", (), {"version": "v"})()

    def evaluate(exclude):
        return evaluate_rankers(trained, examples, customers, products, k=1, truth=truth, with_lightgbm=False,
                                held_out=HeldOut(torch.zeros(0), torch.zeros(0)), exclude=exclude)

    feed_like = evaluate(pl.concat([train, early]))
    # a: p3 hidden, so not a positive; the oracle's best left is p4, a hit. b: p3, a hit.
    assert feed_like.ranking["oracle"]["recall"] == 1.0
    assert seen[-1].filter(pl.col("customer_id") == "a").get_column("product_id").sort().to_list() == ["p1", "p3"]
    # the training days alone hide less: a's p3 is a positive again, and a hit the real feed never shows
    assert evaluate(train).ranking["oracle"]["recall"] == pytest.approx(0.75)
    nothing_hidden = evaluate(None)
    assert seen[-1] is None and nothing_hidden.ranking["oracle"]["recall"] == pytest.approx(0.75)
