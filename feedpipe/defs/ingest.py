"""Input assets: the three contract tables, read and validated by feedpipe.sources."""


from datetime import date, datetime

import dagster as dg
import polars as pl

from feedpipe import sources
from feedpipe.contract import CUSTOMERS, PRODUCTS, TS
from feedpipe.defs.metadata import frame_metadata, markdown_table
from feedpipe.defs.partitions import feed_date_partitions
from feedpipe.defs.resources import DataResource


def feed_date_of(context: dg.AssetExecutionContext) -> date:
    return date.fromisoformat(context.partition_key)


def _feature_metadata(table: str, df: pl.DataFrame, data: DataResource) -> dict:
    specs = sources.infer_features(table, df, data.config())
    return {"features": markdown_table([{"column": s.name, "role": s.role} for s in specs])}


@dg.asset(partitions_def=feed_date_partitions, group_name="input", kinds={"polars"})
def transactions(context: dg.AssetExecutionContext, data: DataResource) -> dg.Output[pl.DataFrame]:
    """Every transaction before the feed date (the feed for day D is built from what happened before D)."""
    feed_date = feed_date_of(context)
    df = sources.read_transactions(data.directory(), data.config())
    cutoff = datetime.combine(feed_date, datetime.min.time())
    kept = df.filter(pl.col(TS) < cutoff)
    meta = frame_metadata(
        kept,
        rows_read=df.height,
        rows_on_or_after_feed_date=df.height - kept.height,
        first_ts=str(kept.get_column(TS).min()) if kept.height else "",
        last_ts=str(kept.get_column(TS).max()) if kept.height else "",
        source=dg.MetadataValue.path(str(sources.find_table_file(data.directory(), "transactions"))),
    )
    if kept.is_empty():
        raise dg.Failure(f"no transactions before the feed date {feed_date} in {data.directory()}", metadata=meta)
    return dg.Output(kept, metadata=meta)


@dg.asset(partitions_def=feed_date_partitions, group_name="input", kinds={"polars"})
def customers(context: dg.AssetExecutionContext, data: DataResource) -> dg.Output[pl.DataFrame]:
    """Customer ids (as text) and attributes typed by role."""
    df = sources.read_customers(data.directory(), data.config())
    return dg.Output(df, metadata=frame_metadata(df, **_feature_metadata(CUSTOMERS, df, data)))


@dg.asset(partitions_def=feed_date_partitions, group_name="input", kinds={"polars"})
def products(context: dg.AssetExecutionContext, data: DataResource) -> dg.Output[pl.DataFrame]:
    """Product ids (as text) and attributes typed by role: the catalogue every customer is scored against."""
    df = sources.read_products(data.directory(), data.config())
    return dg.Output(df, metadata=frame_metadata(df, **_feature_metadata(PRODUCTS, df, data)))
