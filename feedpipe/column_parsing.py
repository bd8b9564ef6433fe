"""Typing the stored columns of an input table: polars expressions over whole columns, one per contract type.

A value that does not convert becomes null; which nulls were values that failed (and so reject their row) is decided by
the loader comparing the stored column with the converted one. A column whose stored dtype can never convert (float
ids, a numeric `ts`) is fatal: `InputError` naming the file and column.
"""

from __future__ import annotations

import polars as pl

from feedpipe import contract
from feedpipe.input_config import InputError

TS_FORMATS = (
    "a Parquet timestamp or date, or ISO 8601 text: YYYY-MM-DD, or YYYY-MM-DD[T or space]HH:MM[:SS[.ffffff]] "
    "optionally followed by Z or an offset such as +02:00"
)


def is_text(dtype: pl.DataType) -> bool:
    return dtype in (pl.Utf8, pl.Categorical, pl.Enum)


def id_expr(where: object, column: str, dtype: pl.DataType) -> pl.Expr:
    """Integer or text ids -> text, exactly as stored (Parquet 42 -> "42", CSV "007" stays "007")."""
    if dtype == pl.Utf8:
        return pl.col(column)
    if dtype.is_integer() or dtype in (pl.Categorical, pl.Enum, pl.Null):
        return pl.col(column).cast(pl.Utf8)
    raise InputError(f"{where}: column '{column}' holds {dtype}; expected integer or text ids")


def ts_expr(where: object, dtype: pl.DataType) -> pl.Expr:
    """`ts` -> naive UTC Datetime("us"); null where missing or not a timestamp."""
    col = pl.col(contract.TS)
    # strict=False: a stored value outside Datetime("us")'s range (a Parquet ts of 2**63-1 ms) is null, an
    # invalid_ts row; the strict cast panics in polars' Rust code and takes the whole load down.
    if isinstance(dtype, pl.Datetime):
        if dtype.time_zone is not None:
            col = col.dt.convert_time_zone("UTC").dt.replace_time_zone(None)
        return col.cast(pl.Datetime("us"), strict=False)
    if dtype == pl.Date:
        return col.cast(pl.Datetime("us"), strict=False)
    if dtype in (pl.Utf8, pl.Categorical, pl.Null):
        return parse_iso_ts(col.cast(pl.Utf8))
    raise InputError(f"{where}: column '{contract.TS}' holds {dtype}; expected {TS_FORMATS}")


def parse_iso_ts(text: pl.Expr) -> pl.Expr:
    """ISO 8601 text -> naive UTC Datetime("us"); null where it does not parse."""
    # One separator ("T") and one spelling of UTC ("+00:00") first, so a handful of formats covers the variants.
    # An hour-only offset ("+00", as PostgreSQL writes timestamptz in CSV) gets its minutes; only after a time,
    # so the day of a bare date is left alone.
    text = (text.str.strip_chars().str.replace(r"^(\d{4}-\d{2}-\d{2}) ", "${1}T").str.replace(r"[zZ]$", "+00:00")
            .str.replace(r"(T\d{2}:\d{2}(?::\d{2}(?:\.\d+)?)?[+-]\d{2})$", "${1}:00"))

    def naive(fmt: str) -> pl.Expr:
        return text.str.to_datetime(fmt, strict=False, time_unit="us")

    def aware(fmt: str) -> pl.Expr:
        parsed = text.str.to_datetime(fmt, strict=False, time_unit="us", time_zone="UTC")
        return parsed.dt.replace_time_zone(None)

    return pl.coalesce(
        naive("%Y-%m-%dT%H:%M:%S%.f"),  # %.f also accepts no fraction
        naive("%Y-%m-%dT%H:%M"),
        text.str.to_date("%Y-%m-%d", strict=False).cast(pl.Datetime("us")),
        aware("%Y-%m-%dT%H:%M:%S%.f%z"),
        aware("%Y-%m-%dT%H:%M%z"),
    )


def float_expr(column: str, dtype: pl.DataType) -> pl.Expr:
    """Numbers, booleans or numeric text -> Float64; null where missing, unparsable or not finite."""
    col = pl.col(column)
    if is_text(dtype):
        col = col.cast(pl.Utf8).str.strip_chars().cast(pl.Float64, strict=False)
    else:
        col = col.cast(pl.Float64)
    return pl.when(col.is_finite()).then(col)


TRUE_TEXT = ("true", "t", "yes", "y")
FALSE_TEXT = ("false", "f", "no", "n")
BOOLEAN_FORMS = "true/false, t/f, yes/no, y/n (any case) or 1/0"


def boolean_expr(column: str, dtype: pl.DataType) -> pl.Expr:
    """Booleans, 1/0 or their usual words (BOOLEAN_FORMS) -> Boolean; null where missing or anything else."""
    col = pl.col(column)
    if dtype == pl.Boolean:
        return col
    number = float_expr(column, dtype)
    from_number = pl.when(number == 1).then(True).when(number == 0).then(False)
    if not is_text(dtype):
        return from_number if dtype.is_numeric() else pl.lit(None, pl.Boolean)
    word = col.cast(pl.Utf8).str.strip_chars().str.to_lowercase()
    return (pl.when(word.is_in(TRUE_TEXT)).then(True).when(word.is_in(FALSE_TEXT)).then(False)
            .otherwise(from_number))


def text_expr(column: str) -> pl.Expr:
    """Any scalar -> text; empty text becomes null (one spelling of "missing")."""
    text = pl.col(column).cast(pl.Utf8)
    return pl.when(text != "").then(text)


def multi_expr(column: str, dtype: pl.DataType, delimiter: str) -> pl.Expr:
    """A list, or text split on `delimiter` -> List(Utf8) without empty items; missing -> empty list."""
    col = pl.col(column)
    if isinstance(dtype, pl.List):
        items = col.cast(pl.List(pl.Utf8))
    else:  # text split on the delimiter; the spaces around items are an artefact of writing, not part of the value
        items = col.cast(pl.Utf8).str.split(delimiter).list.eval(pl.element().str.strip_chars())
    items = items.list.eval(pl.element().filter(pl.element().is_not_null() & (pl.element() != "")))
    return items.fill_null(pl.lit([], dtype=pl.List(pl.Utf8)))


def present(raw: pl.Expr, dtype: pl.DataType) -> pl.Expr:
    """A stored value is there: not null and, for text, not empty."""
    return raw.is_not_null() & (raw != "") if dtype == pl.Utf8 else raw.is_not_null()


def text_length(column: str, dtype: pl.DataType) -> pl.Expr:
    """Characters of a text value, or of the longest item of a list; null for other dtypes' values."""
    if dtype == pl.Utf8:
        return pl.col(column).str.len_chars()
    if isinstance(dtype, pl.List) and dtype.inner == pl.Utf8:
        return pl.col(column).list.eval(pl.element().str.len_chars()).list.max()
    return pl.lit(None, pl.UInt32)
