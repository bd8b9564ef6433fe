"""Ranking quality on held-out purchases.

recall@K for one customer = |top K ∩ products first bought in the holdout| / |those products|,
averaged over customers who have history before the holdout and at least one new holdout
purchase (the customers a feed is for). Rankings must carry the same exclusions (past purchases).
"""

from __future__ import annotations

import polars as pl

from feedpipe.contract import CUSTOMER_ID, PRODUCT_ID
from feedpipe.ranking import RANK


def recall_at_k(ranking: pl.DataFrame, holdout: pl.DataFrame, k: int) -> float:
    """Mean recall@k over the customers in `holdout` (pairs first bought in the holdout days)."""
    if holdout.is_empty():
        return float("nan")
    truth = holdout.select(CUSTOMER_ID, PRODUCT_ID).unique()
    per_customer = truth.group_by(CUSTOMER_ID).agg(pl.len().alias("relevant"))
    hits = (
        ranking.filter(pl.col(RANK) <= k)
        .select(CUSTOMER_ID, PRODUCT_ID)
        .join(truth, on=[CUSTOMER_ID, PRODUCT_ID], how="semi")
        .group_by(CUSTOMER_ID)
        .agg(pl.len().alias("hits"))
    )
    scored = per_customer.join(hits, on=CUSTOMER_ID, how="left").with_columns(pl.col("hits").fill_null(0))
    return float((scored.get_column("hits") / scored.get_column("relevant")).mean())


def evaluation_customers(train_pairs: pl.DataFrame, holdout: pl.DataFrame) -> pl.Series:
    """Customers with history before the holdout and new purchases in it."""
    return (
        holdout.select(CUSTOMER_ID).unique().join(train_pairs.select(CUSTOMER_ID).unique(), on=CUSTOMER_ID, how="semi")
        .sort(CUSTOMER_ID)
        .get_column(CUSTOMER_ID)
    )


# Candidates a ranking did not place get _UNRANKED: below every ranked item, so torchmetrics counts
# them as relevant-but-missed (recall and NDCG need every relevant item in the group). Each group also
# gets k non-relevant fillers scored between the two, so a customer with fewer than k ranked products
# (or none) still has k candidates above the unranked ones: torchmetrics takes each group's top k by
# score, and without the fillers an unranked relevant product would enter it and count as a hit.
_UNRANKED = -1e9
_FILLER = -1e8


def ranking_metrics(ranking: pl.DataFrame, holdout: pl.DataFrame, k: int, catalogue_size: int | None = None) -> dict:
    """recall, NDCG and hit rate @k from torchmetrics' retrieval metrics, MAP@k, and catalogue coverage.

    One retrieval group per customer in `holdout`; its candidates are the customer's top k plus every
    product first bought in the holdout. Customers absent from the ranking score zero.
    """
    import torch
    from torchmetrics.retrieval import RetrievalHitRate, RetrievalNormalizedDCG, RetrievalRecall

    if holdout.is_empty():
        nan = float("nan")
        return {"recall": nan, "ndcg": nan, "map": nan, "hit_rate": nan, "customers": 0,
                **({"coverage": nan} if catalogue_size else {})}
    truth = holdout.select(CUSTOMER_ID, PRODUCT_ID).unique().with_columns(pl.lit(True).alias("relevant"))
    top = ranking.filter(pl.col(RANK) <= k).select(CUSTOMER_ID, PRODUCT_ID, (-pl.col(RANK).cast(pl.Float64)).alias("pred"))
    top = top.join(truth.select(CUSTOMER_ID), on=CUSTOMER_ID, how="semi")
    candidates = (
        top.join(truth, on=[CUSTOMER_ID, PRODUCT_ID], how="full", coalesce=True)
        .with_columns(pl.col("pred").fill_null(_UNRANKED), pl.col("relevant").fill_null(False))
        .select(CUSTOMER_ID, "pred", "relevant")
    )
    fillers = (
        truth.select(CUSTOMER_ID).unique()
        .join(pl.DataFrame({"filler": range(k)}), how="cross")
        .select(CUSTOMER_ID, pl.lit(_FILLER).alias("pred"), pl.lit(False).alias("relevant"))
    )
    groups = pl.concat([candidates, fillers]).with_columns(
        pl.col(CUSTOMER_ID).rank("dense").cast(pl.Int64).alias("group")
    )
    preds = torch.from_numpy(groups.get_column("pred").to_numpy().copy())
    target = torch.from_numpy(groups.get_column("relevant").to_numpy().copy())
    indexes = torch.from_numpy(groups.get_column("group").to_numpy().copy())
    out = {}
    for name, metric in (
        ("recall", RetrievalRecall(top_k=k)),
        ("ndcg", RetrievalNormalizedDCG(top_k=k)),
        ("hit_rate", RetrievalHitRate(top_k=k)),
    ):
        out[name] = float(metric(preds, target, indexes=indexes))
    out["map"] = mean_average_precision(top, truth, k)
    if catalogue_size:
        out["coverage"] = ranking.filter(pl.col(RANK) <= k).get_column(PRODUCT_ID).n_unique() / catalogue_size
    out["customers"] = truth.get_column(CUSTOMER_ID).n_unique()
    return out


def mean_average_precision(top: pl.DataFrame, truth: pl.DataFrame, k: int) -> float:
    """MAP@k: per customer, the precision at each hit in the top k, summed and divided by min(k, relevant).

    By hand because torchmetrics' `RetrievalMAP(top_k=k)` divides by the hits it found instead, so one hit at
    rank 1 among five relevant products scores 1.0 where this (and the usual AP@k) scores 0.2. `top` holds
    each customer's ranked products (rank 1 first, as `pred` = -rank), `truth` the relevant pairs.
    """
    hits = (
        top.join(truth, on=[CUSTOMER_ID, PRODUCT_ID], how="semi")
        .sort(CUSTOMER_ID, "pred", descending=[False, True])
        .with_columns(pl.int_range(1, pl.len() + 1).over(CUSTOMER_ID).alias("nth"))
        .group_by(CUSTOMER_ID)
        .agg((pl.col("nth") / -pl.col("pred")).sum().alias("precision_sum"))
    )
    per_customer = (
        truth.group_by(CUSTOMER_ID).agg(pl.len().alias("relevant"))
        .join(hits, on=CUSTOMER_ID, how="left")
        .select(pl.col("precision_sum").fill_null(0.0) / pl.min_horizontal(pl.col("relevant"), pl.lit(k)))
    )
    return float(per_customer.to_series().mean())
