"""Metadata builders shared by the assets: what an operator needs to judge a run from the UI."""

from __future__ import annotations

import dagster as dg
import polars as pl


def table_schema(df: pl.DataFrame | pl.Schema) -> dg.TableSchema:
    schema = df if isinstance(df, pl.Schema) else df.schema
    return dg.TableSchema(columns=[dg.TableColumn(name, str(dtype)) for name, dtype in schema.items()])


def frame_metadata(df: pl.DataFrame, **extra) -> dict:
    return table_metadata(df.schema, df.height, **extra)


def table_metadata(schema: pl.Schema, rows: int, **extra) -> dict:
    """`frame_metadata` for a table that is not in memory (a Parquet file written in chunks)."""
    return {"dagster/row_count": rows, "dagster/column_schema": table_schema(schema), **extra}


def markdown_table(rows: list[dict]) -> dg.MetadataValue:
    if not rows:
        return dg.MetadataValue.md("(none)")
    cols = list(rows[0])
    lines = ["| " + " | ".join(cols) + " |", "|" + "---|" * len(cols)]
    for r in rows:
        lines.append("| " + " | ".join(f"{r[c]:.4f}" if isinstance(r[c], float) else str(r[c]) for c in cols) + " |")
    return dg.MetadataValue.md("\n".join(lines))


def latest_metadata(instance: dg.DagsterInstance, asset: str, partition_key: str) -> dict:
    """An asset's latest materialization's metadata values for this partition ({}: none recorded)."""
    records = instance.fetch_materializations(
        dg.AssetRecordsFilter(asset_key=dg.AssetKey(asset), asset_partitions=[partition_key]), limit=1
    ).records
    return {k: v.value for k, v in records[0].asset_materialization.metadata.items()} if records else {}
