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
