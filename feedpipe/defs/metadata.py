"""Metadata builders shared by the assets: what an operator needs to judge a run from the UI."""

from __future__ import annotations

import dagster as dg
import polars as pl


def table_schema(df: pl.DataFrame) -> dg.TableSchema:
    return dg.TableSchema(columns=[dg.TableColumn(name, str(dtype)) for name, dtype in df.schema.items()])


def frame_metadata(df: pl.DataFrame, **extra) -> dict:
    return {"dagster/row_count": df.height, "dagster/column_schema": table_schema(df), **extra}


def markdown_table(rows: list[dict]) -> dg.MetadataValue:
    if not rows:
        return dg.MetadataValue.md("(none)")
    cols = list(rows[0])
    lines = ["| " + " | ".join(cols) + " |", "|" + "---|" * len(cols)]
    for r in rows:
        lines.append("| " + " | ".join(f"{r[c]:.4f}" if isinstance(r[c], float) else str(r[c]) for c in cols) + " |")
    return dg.MetadataValue.md("\n".join(lines))
