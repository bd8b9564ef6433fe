"""The evaluation's baselines on their own: LightGBM's top-N selection and the oracle's catalogue."""

import numpy as np
import polars as pl
import pytest

from feedpipe.contract import CUSTOMERS, DENSE, PRODUCTS
from feedpipe.lightgbm_baseline import LightGBMRanker, _top_k_columns, lightgbm_ranking, oracle_ranking
from feedpipe.sources import FeatureSpec

SPECS = [FeatureSpec("taste", CUSTOMERS, DENSE), FeatureSpec("appeal", PRODUCTS, DENSE)]


class ProductBooster:
    """Scores a pair by the product's appeal alone, rounded so that many pairs tie (as trees' leaves do)."""

    def predict(self, x: np.ndarray, num_iteration: int) -> np.ndarray:
        return np.round(x[:, 1] * x[:, 0], 1)


def _ranker() -> LightGBMRanker:
    return LightGBMRanker(ProductBooster(), ["customers.taste", "products.appeal"], [], SPECS, {}, 5, 10)


def test_top_k_columns_give_tied_places_to_the_first_columns():
    scores = np.array([[1.0, 3.0, 3.0, 3.0, 0.0], [-np.inf, 2.0, -np.inf, -np.inf, 2.0]])
    assert _top_k_columns(scores, 2).tolist() == [[1, 2], [1, 4]]
    assert _top_k_columns(scores, 4).tolist() == [[0, 1, 2, 3], [0, 1, 2, 4]]


def test_lightgbm_ranking_excludes_ranks_contiguously_and_breaks_ties_by_catalogue_order():
    customers = pl.DataFrame({"customer_id": [f"c{i}" for i in range(5)], "customers.taste": [1.0, 1, 1, 1, -1]})
    products = pl.DataFrame({"product_id": [f"p{i}" for i in range(6)],
                             "products.appeal": [0.5, 0.9, 0.9, 0.1, 0.9, 0.5]})
    exclude = pl.DataFrame({"customer_id": ["c1", "c3", "c3"], "product_id": ["p2", "p1", "p4"]})
    ranking = lightgbm_ranking(_ranker(), customers, products, top_n=3, exclude=exclude, customers_per_chunk=2)
    top = {c: g.sort("rank").get_column("product_id").to_list()
           for (c,), g in ranking.group_by("customer_id")}
    assert top["c0"] == ["p1", "p2", "p4"]  # three tied at 0.9, in catalogue order
    assert top["c1"] == ["p1", "p4", "p0"]  # p2 excluded; p0 and p5 tie at 0.5, p0 first
    assert top["c3"] == ["p2", "p0", "p5"]
    assert top["c4"] == ["p3", "p0", "p5"]  # taste -1: the least appealing first
    assert ranking.group_by("customer_id").agg(pl.col("rank").sort()).get_column("rank").to_list() == [[1, 2, 3]] * 5


def test_lightgbm_ranking_with_top_n_over_the_catalogue_drops_only_excluded_products():
    customers = pl.DataFrame({"customer_id": ["a", "b"], "customers.taste": [1.0, 1.0]})
    products = pl.DataFrame({"product_id": ["x", "y"], "products.appeal": [0.2, 0.4]})
    exclude = pl.DataFrame({"customer_id": ["b", "b"], "product_id": ["x", "y"]})
    ranking = lightgbm_ranking(_ranker(), customers, products, top_n=10, exclude=exclude)
    assert ranking.select("customer_id", "product_id", "rank").rows() == [("a", "y", 1), ("a", "x", 2)]


def test_the_lightgbm_note_says_whether_early_stopping_ended_training():
    assert "early-stopped" in _ranker().describe()
    ran_out = LightGBMRanker(None, [], [], SPECS, {}, 10, 10, ("products.tags",))
    assert "all 10 rounds" in ran_out.describe() and "left out, over 64 values: products.tags" in ran_out.describe()


def test_the_oracle_ranks_only_the_catalogue_the_other_rankers_rank():
    truth = pl.DataFrame({"customer_id": ["a"] * 3, "product_id": ["rejected", "p1", "p2"], "score": [0.9, 0.5, 0.1]})
    ids = pl.Series("customer_id", ["a"])
    assert oracle_ranking(truth, ids, top_n=2).get_column("product_id").to_list() == ["rejected", "p1"]
    kept = oracle_ranking(truth, ids, top_n=2, product_ids=pl.Series(["p1", "p2"]))
    assert kept.get_column("product_id").to_list() == ["p1", "p2"]
    assert kept.get_column("rank").to_list() == [1, 2]


@pytest.mark.parametrize("k", [1, 3, 6])
def test_top_k_columns_agree_with_a_full_sort_on_random_scores(k):
    scores = np.random.default_rng(k).integers(0, 4, size=(50, 6)).astype(float)
    expected = np.argsort(-scores, axis=1, kind="stable")[:, :k]
    assert (np.sort(_top_k_columns(scores, k), axis=1) == np.sort(expected, axis=1)).all()
