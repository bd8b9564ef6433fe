"""model_ranking: the scorer's top N as a frame, with exclusions and unavailable products by id."""

import polars as pl
import pytest
import torch

from feedpipe.ranking import model_ranking
from feedpipe.training import TrainConfig, TrainedModel, model_shape
from feedpipe.model import TwoSidedDLRM
from feedpipe_tests.model_fixtures import CUSTOMER_SPECS, PRODUCT_SPECS, grouped_data


@pytest.fixture(scope="module")
def trained():
    customers, products, vocab, _ = grouped_data(n_customers=30, n_products=25)
    torch.manual_seed(0)
    model = TwoSidedDLRM(model_shape(CUSTOMER_SPECS, PRODUCT_SPECS, vocab, TrainConfig())).eval()
    return TrainedModel(model, CUSTOMER_SPECS, PRODUCT_SPECS, vocab, "v"), customers, products


def test_unavailable_products_and_excluded_pairs_never_appear_and_ranks_stay_dense(trained):
    model, customers, products = trained
    exclude = pl.DataFrame({"customer_id": ["c0", "c1"], "product_id": ["p3", "p4"]})
    timings = {}
    ranking = model_ranking(model, customers, products, top_n=22, exclude=exclude,
                            unavailable=pl.Series(["p0", "p1", "not-a-product"]), timings=timings)
    assert not ranking.filter(pl.col("product_id").is_in(["p0", "p1"])).height
    assert ranking.filter((pl.col("customer_id") == "c0") & (pl.col("product_id") == "p3")).is_empty()
    per_customer = ranking.group_by("customer_id").agg(pl.len(), pl.col("rank").max().alias("last"))
    # 25 products - 2 unavailable = 23 allowed, minus one excluded for c0 and c1: 22 for everyone
    assert per_customer.get_column("len").to_list() == [22] * 30
    assert per_customer.get_column("last").to_list() == [22] * 30
    assert set(timings) == {"encode_s", "exclusions_s", "scoring_s", "frame_s"}


def test_bf16_ranking_has_the_same_shape_and_mostly_the_same_products(trained):
    model, customers, products = trained
    fp32 = model_ranking(model, customers, products, top_n=5)
    bf16 = model_ranking(model, customers, products, top_n=5, dtype=torch.bfloat16)
    assert bf16.height == fp32.height
    assert bf16.join(fp32, on=["customer_id", "product_id"]).height >= 0.6 * fp32.height


def test_top_k_overlap_of_fp32_with_itself_is_one_and_bf16_is_close(trained):
    from feedpipe.ranking import top_k_overlap

    model, customers, products = trained
    assert top_k_overlap(model, customers, products, dtype=torch.float32, k=5) == 1.0
    assert 0.5 <= top_k_overlap(model, customers, products, k=5) <= 1.0


def test_bf16_reranked_in_fp32_ranks_like_fp32(trained):
    from feedpipe.ranking import top_k_overlap

    model, customers, products = trained
    fp32 = model_ranking(model, customers, products, top_n=5)
    reranked = model_ranking(model, customers, products, top_n=5, dtype=torch.bfloat16, rerank=True)
    assert reranked.select("customer_id", "product_id", "rank").equals(fp32.select("customer_id", "product_id", "rank"))
    assert top_k_overlap(model, customers, products, rerank=True, k=5) == 1.0


def test_a_customer_who_bought_every_product_is_not_counted_missing():
    from feedpipe.ranking import customers_without_scores

    products = pl.DataFrame({"product_id": ["p1", "p2"]})
    window = pl.DataFrame({"customer_id": ["all", "all", "some", "lost"], "product_id": ["p1", "p2", "p1", "p1"]})
    scores = pl.DataFrame({"customer_id": ["some"], "product_id": ["p2"]})
    exclude = window.unique()
    assert customers_without_scores(window, scores, products, exclude) == (3, 1, 1)  # "lost" is missing
    assert customers_without_scores(window, scores, products, None) == (3, 2, 0)
