"""Load the three input tables into typed polars frames, every received row accepted or rejected with a reason.

What comes out (whatever the source: CSV, Parquet, or Postgres through a spooled Parquet file):
- ids are `pl.Utf8`, text exactly as stored (Parquet integer 42 -> "42"; CSV "007" stays "007");
- `ts` is naive `Datetime("us")`: dates become midnight, timezone-aware values are converted to UTC and the zone
  dropped, naive values are taken as they are;
- `quantity` is `Float64` (fractional quantities such as kilograms exist); a missing column or empty cell means 1.0;
- attributes are typed by role: dense -> Float64 (NaN and +-inf become null: one spelling of "missing"),
  categorical -> Utf8 (empty text becomes null), multi-valued categorical -> List(Utf8) (missing -> empty list,
  empty and null items dropped).

Roles come from the dtype: numeric -> dense, text or boolean -> categorical ("true"/"false"), list -> multi-valued.
CSV has no dtypes, so every column is read as text and an attribute column whose every non-empty value parses as a
finite number is dense. A Parquet text column stays categorical even when it holds digits (the writer chose text).
`InputConfig` overrides roles, excludes columns and names text columns to split into lists.

Two kinds of bad input (see docs/input-contract.md):
- fatal (`feedpipe.table_files` and the dtype checks here): `InputError` naming the file, the column, the first
  offending rows and what was expected;
- row-level: `load_*` returns a `TableLoad` with the row rejected for a reason (`feedpipe.quarantine.REASONS`).
`read_*` are the strict forms: any rejected row raises `InputError`, otherwise the accepted frame comes back.

Memory: `load_transactions_in_chunks` checks a Parquet transactions table a chunk at a time with the very checks of
`load_transactions`, so the nightly load of the one table that grows without bound is bounded by the chunk size
(`feedpipe.input_tables.stream_transactions`). Customers and products are loaded whole: telling a duplicate row
from a conflicting one compares every row with every other, CSV role inference looks at every value of a column, and
they hold one row per customer or product, which the model's embedding tables hold in memory anyway.
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass, field
from datetime import date, datetime
from pathlib import Path

import polars as pl

from feedpipe import contract
from feedpipe.column_parsing import (
    BOOLEAN_FORMS, TS_FORMATS, boolean_expr, float_expr, id_expr, is_text, multi_expr, present, text_expr, text_length,
    ts_expr,
)
from feedpipe.input_config import InputConfig, InputConfigError, InputError, TableInputConfig
from feedpipe.quarantine import (
    INTERNAL_COLUMNS, REASON, ROW, STRICT, Rejection, RejectionPolicy, TableLoad, enforce_policy,
)
from feedpipe.table_files import (
    MAX_ROWS_SHOWN, RawTable, StoredTable, check_required_columns, check_reserved_columns, find_table_file, iter_columns,
    read_columns, read_schema,
)

__all__ = [
    "FeatureSpec", "InputConfig", "InputConfigError", "InputError", "StoredTable", "TS_FORMATS", "find_table_file",
    "infer_features", "load_customers", "load_products", "load_transactions", "load_transactions_in_chunks",
    "read_customers", "read_products", "read_transactions",
]


@dataclass(frozen=True)
class FeatureSpec:
    """One attribute column of customers or products and the role it plays in the model."""

    name: str
    table: str  # contract.CUSTOMERS or contract.PRODUCTS
    role: str  # contract.DENSE, CATEGORICAL or MULTI_CATEGORICAL


# --- strict readers: the accepted frame, or InputError for any rejected row --------------------------------------------


def read_transactions(data_dir: str | Path, config: InputConfig | None = None) -> pl.DataFrame:
    """Columns exactly: customer_id Utf8, product_id Utf8, ts Datetime("us") (naive UTC), quantity Float64."""
    return _strict(load_transactions(StoredTable.find(data_dir, contract.TRANSACTIONS), config, STRICT))


def read_customers(data_dir: str | Path, config: InputConfig | None = None) -> pl.DataFrame:
    """customer_id Utf8 first, then each non-excluded attribute typed by its role (see the module docstring)."""
    return _strict(load_customers(StoredTable.find(data_dir, contract.CUSTOMERS), config, STRICT))


def read_products(data_dir: str | Path, config: InputConfig | None = None) -> pl.DataFrame:
    """product_id Utf8 first, then each non-excluded attribute typed by its role (see the module docstring)."""
    return _strict(load_products(StoredTable.find(data_dir, contract.PRODUCTS), config, STRICT))


def _strict(load: TableLoad) -> pl.DataFrame:
    enforce_policy(load, STRICT)
    return load.accepted


# --- loaders ---------------------------------------------------------------------------------------------------------


def load_transactions(
    stored: StoredTable,
    config: InputConfig | None = None,
    policy: RejectionPolicy = RejectionPolicy(),
    feed_date: date | None = None,
) -> TableLoad:
    """Transactions with their rejections; with `feed_date`, rows at or after its midnight are rejected too.

    Other columns in the file are ignored (and not read). `config` is accepted for symmetry; no key applies here.
    """
    (load,) = load_transactions_in_chunks(stored, config, policy, feed_date, chunk_rows=None)
    return load


def load_transactions_in_chunks(
    stored: StoredTable,
    config: InputConfig | None = None,
    policy: RejectionPolicy = RejectionPolicy(),
    feed_date: date | None = None,
    chunk_rows: int | None = None,
) -> Iterator[TableLoad]:
    """`load_transactions`, one `TableLoad` per chunk of at most `chunk_rows` rows (None: one chunk).

    A chunk's rows keep the whole table's row numbers. What only the whole table shows (no data rows; not one `ts`
    value is a timestamp) is raised after the last chunk, so keep nothing before the generator is exhausted.
    """
    schema = read_schema(stored)
    check_required_columns(stored, schema)
    quantity_dtype = schema.get(contract.QUANTITY)
    if quantity_dtype is not None and not (quantity_dtype.is_numeric() or quantity_dtype in (pl.Utf8, pl.Null)):
        raise InputError(f"{stored}: column '{contract.QUANTITY}' holds {quantity_dtype}; expected numbers")
    columns = [*contract.REQUIRED_COLUMNS[contract.TRANSACTIONS], *([contract.QUANTITY] if quantity_dtype else [])]
    timestamps = _TimestampTally()
    received = 0
    for raw in iter_columns(stored, schema, columns, chunk_rows):
        if raw.frame.is_empty():
            continue
        received += raw.frame.height
        yield _check_transactions(raw, policy, feed_date, timestamps)
    if received == 0:
        raise InputError(f"{stored}: no data rows; expected at least one {stored.table} row after the header")
    timestamps.fail_if_none_parses(stored)


def _check_transactions(raw: RawTable, policy: RejectionPolicy, feed_date: date | None,
                        timestamps: _TimestampTally) -> TableLoad:
    stored, schema, frame = raw.stored, raw.schema, raw.frame
    quantity_dtype = schema.get(contract.QUANTITY)
    quantity = float_expr(contract.QUANTITY, quantity_dtype) if quantity_dtype else pl.lit(None, pl.Float64)
    typed = frame.select(
        id_expr(stored, contract.CUSTOMER_ID, schema[contract.CUSTOMER_ID]),
        id_expr(stored, contract.PRODUCT_ID, schema[contract.PRODUCT_ID]),
        ts_expr(stored, schema[contract.TS]).alias(contract.TS),
        quantity.alias(contract.QUANTITY),
    )
    ts_present = frame.select(present(pl.col(contract.TS), schema[contract.TS])).to_series()
    timestamps.add(raw, ts_present, typed.get_column(contract.TS))

    rejections = [*_utf8_rejections(raw), *_id_rejections(typed, contract.CUSTOMER_ID, policy),
                  *_id_rejections(typed, contract.PRODUCT_ID, policy)]
    rejections += [
        Rejection("missing_ts", contract.TS, ~ts_present, TS_FORMATS),
        Rejection("invalid_ts", contract.TS, typed.get_column(contract.TS).is_null(), TS_FORMATS),
    ]
    # Before the quantity's reasons, as documented: a row of a later day is no concern of this feed date's, so
    # a backfill that exempts ts_after_feed_date exempts all of them, bad quantities included.
    if feed_date is not None:
        cutoff = datetime.combine(feed_date, datetime.min.time())
        rejections.append(Rejection("ts_after_feed_date", contract.TS, typed.get_column(contract.TS) >= cutoff,
                                    f"a timestamp before the feed date {feed_date} (the feed is built from the past)"))
    if quantity_dtype is not None:
        stored_quantity = frame.select(present(pl.col(contract.QUANTITY), quantity_dtype)).to_series()
        rejections += [
            Rejection("invalid_number", contract.QUANTITY, stored_quantity & typed.get_column(contract.QUANTITY).is_null(),
                      "a finite number (empty means 1)"),
            Rejection("non_positive_quantity", contract.QUANTITY, typed.get_column(contract.QUANTITY) <= 0,
                      "a quantity above zero"),
        ]
    typed = typed.with_columns(pl.col(contract.QUANTITY).fill_null(1.0))
    return TableLoad.build(stored, frame, typed, rejections, offset=raw.offset)


def load_customers(stored: StoredTable, config: InputConfig | None = None,
                   policy: RejectionPolicy = RejectionPolicy()) -> TableLoad:
    return _load_attribute_table(stored, config or InputConfig.default(), policy)


def load_products(stored: StoredTable, config: InputConfig | None = None,
                  policy: RejectionPolicy = RejectionPolicy()) -> TableLoad:
    return _load_attribute_table(stored, config or InputConfig.default(), policy)


def _load_attribute_table(stored: StoredTable, config: InputConfig, policy: RejectionPolicy) -> TableLoad:
    table = stored.table
    schema = read_schema(stored)
    check_required_columns(stored, schema)
    _check_config_columns(stored, config, schema)
    section = config.table(table)
    id_column = contract.ID_COLUMN[table]
    available = section.available
    if available and not _is_scalar_attribute(schema[available]):
        raise InputError(f"{stored}: column '{available}' (products.available in the input config) holds "
                         f"{schema[available]}; the availability column must be {BOOLEAN_FORMS}, or empty")
    attributes = [c for c in schema if c not in (id_column, available) and c not in section.exclude]
    check_reserved_columns(stored, attributes)  # only what is read: an excluded or unread one is never overwritten
    raw = _read_rows(stored, schema, [id_column, *attributes, *([available] if available else [])])
    frame = raw.frame

    inferable_text = [c for c in attributes if schema[c] == pl.Utf8 and section.role_override(c) is None]
    numeric_text = _numeric_text_columns(raw, inferable_text) if stored.is_csv else set()
    roles = {c: _resolve_role(table, c, schema[c], section, str(stored), config, c in numeric_text) for c in attributes}
    converters = {
        contract.DENSE: lambda c: float_expr(c, schema[c]),
        contract.CATEGORICAL: text_expr,
        contract.MULTI_CATEGORICAL: lambda c: multi_expr(c, schema[c], config.delimiter),
    }
    typed = frame.select(
        id_expr(stored, id_column, schema[id_column]),
        *(converters[roles[c]](c).alias(c) for c in attributes),
        *([boolean_expr(available, schema[available]).alias(contract.AVAILABLE)] if available else []),
    )
    rejections = [*_utf8_rejections(raw), *_id_rejections(typed, id_column, policy)]
    for c in attributes:
        if roles[c] == contract.DENSE and is_text(schema[c]):
            stored_value = frame.select(present(pl.col(c), schema[c])).to_series()
            rejections.append(Rejection("invalid_number", c, stored_value & typed.get_column(c).is_null(),
                                        f"a number ('{c}' is {contract.DENSE}) or empty"))
        elif roles[c] != contract.DENSE:
            too_long = typed.select(text_length(c, typed.schema[c]) > policy.max_text_chars).to_series()
            rejections.append(Rejection("text_too_long", c, too_long, f"at most {policy.max_text_chars} characters"))
    if available:
        stored_value = frame.select(present(pl.col(available), schema[available])).to_series()
        rejections.append(Rejection("invalid_boolean", available,
                                    stored_value & typed.get_column(contract.AVAILABLE).is_null(),
                                    f"{BOOLEAN_FORMS}, or empty (not available)"))
        # Empty is "not known to be available": such a product is left out of the feed, as a false one is.
        typed = typed.with_columns(pl.col(contract.AVAILABLE).fill_null(False))
    return _reject_duplicates(TableLoad.build(stored, frame, typed, rejections), id_column)


def _read_rows(stored: StoredTable, schema: pl.Schema, columns: list[str]) -> RawTable:
    raw = read_columns(stored, schema, columns)
    if raw.frame.is_empty():
        raise InputError(f"{stored}: no data rows; expected at least one {stored.table} row after the header")
    return raw


# --- row checks ------------------------------------------------------------------------------------------------------


def _utf8_rejections(raw: RawTable) -> list[Rejection]:
    return [Rejection("invalid_utf8", c, mask, "text in UTF-8") for c, mask in raw.invalid_utf8.items()]


def _id_rejections(typed: pl.DataFrame, column: str, policy: RejectionPolicy) -> list[Rejection]:
    ids = typed.get_column(column)
    return [
        Rejection("missing_id", column, ids.is_null() | (ids == ""), "an id"),
        # PostgreSQL text cannot hold NUL: such an id would pass here and fail the publish at the end of the run.
        Rejection("nul_in_id", column, ids.str.contains("\x00", literal=True), "an id without NUL characters"),
        Rejection("text_too_long", column, ids.str.len_chars() > policy.max_id_chars,
                  f"an id of at most {policy.max_id_chars} characters"),
    ]


def _reject_duplicates(load: TableLoad, id_column: str) -> TableLoad:
    """Exact copies of an accepted row: the first is kept. Different rows sharing an id: none is kept."""
    candidates = load.rows.filter(pl.col(REASON).is_null())
    first_copy = pl.struct([c for c in candidates.columns if c not in INTERNAL_COLUMNS]).is_first_distinct()
    later_copies = candidates.filter(~first_copy).get_column(ROW)
    conflicting = candidates.filter(first_copy).filter(pl.col(id_column).is_duplicated()).get_column(id_column)
    # duplicate_id first: an id with conflicting rows keeps none of them, so no copy of one is "the first kept".
    return load.reject(
        Rejection("duplicate_id", id_column, pl.col(id_column).is_in(conflicting), "each id on one row"),
        Rejection("duplicate_row", id_column, pl.col(ROW).is_in(later_copies), "each row once"),
    )


@dataclass
class _TimestampTally:
    """Over every chunk: how many `ts` values are stored, whether any parsed, and the first ones (for the message).

    A `ts` column where not one stored value parses is a wrong format, not a few bad rows: fatal.
    """

    present: int = 0
    parsed: bool = False
    first: list[tuple[int, object]] = field(default_factory=list)  # (row index in the table, stored value)

    def add(self, raw: RawTable, ts_present: pl.Series, parsed: pl.Series) -> None:
        self.present += int(ts_present.sum())
        self.parsed = self.parsed or bool(parsed.is_not_null().any())
        if not self.parsed and len(self.first) < MAX_ROWS_SHOWN:
            rows = ts_present.arg_true().head(MAX_ROWS_SHOWN - len(self.first))
            values = raw.frame.get_column(contract.TS).gather(rows).to_list()
            self.first += [(raw.offset + i, v) for i, v in zip(rows, values)]

    def fail_if_none_parses(self, stored: StoredTable) -> None:
        if self.present == 0 or self.parsed:
            return
        shown = "\n".join(f"    {stored.row_label} {i + stored.first_row_number}: {v!r}" for i, v in self.first)
        if self.present > len(self.first):
            shown += f"\n    ... and {self.present - len(self.first)} more"
        raise InputError(
            f"{stored}: column '{contract.TS}': none of its {self.present:,} value(s) is a timestamp; "
            f"expected {TS_FORMATS}:\n{shown}"
        )


# --- roles -----------------------------------------------------------------------------------------------------------


def _is_scalar_attribute(dtype: pl.DataType) -> bool:
    return dtype.is_numeric() or dtype in (pl.Utf8, pl.Boolean, pl.Categorical, pl.Enum, pl.Null)


def _resolve_role(table: str, column: str, dtype: pl.DataType, section: TableInputConfig, where: str,
                  config: InputConfig, numeric_text: bool = False) -> str:
    """The role of one attribute column: the config's override if any, else inferred from the dtype."""
    is_list = isinstance(dtype, pl.List)
    if not (_is_scalar_attribute(dtype) or (is_list and _is_scalar_attribute(dtype.inner))):
        raise InputError(
            f"{where}: column '{column}' holds {dtype}; attributes must be numeric, boolean, text or lists of those "
            f"(exclude it under {table}.exclude in the input config)"
        )
    override = section.role_override(column)
    if override is not None:
        if is_list and override != contract.MULTI_CATEGORICAL:
            key = f"{table}.roles.{column}"
            raise InputConfigError(
                f"{config.describe_source()}: key '{key}': {where} column '{column}' holds lists ({dtype}); "
                f"a list column can only be {contract.MULTI_CATEGORICAL}"
            )
        return override
    if is_list:
        return contract.MULTI_CATEGORICAL
    if dtype.is_numeric() or dtype == pl.Null or (dtype == pl.Utf8 and numeric_text):
        return contract.DENSE
    return contract.CATEGORICAL


def infer_features(table: str, df: pl.DataFrame, config: InputConfig | None = None) -> list[FeatureSpec]:
    """One `FeatureSpec` per attribute column of `df` (id, availability and excluded columns skipped), in column order.

    On a frame from `read_customers`/`read_products` the dtype already says the role (Float64 dense, Utf8
    categorical, List(Utf8) multi-valued), so `config` only matters for frames that were not loaded here.
    """
    config = config or InputConfig.default()
    section = config.table(table)
    id_column = contract.ID_COLUMN[table]
    return [
        FeatureSpec(name, table, _resolve_role(table, name, dtype, section, f"{table} frame", config))
        for name, dtype in df.schema.items()
        if name not in (id_column, contract.AVAILABLE, section.available) and name not in section.exclude
    ]


def _numeric_text_columns(raw: RawTable, columns: list[str]) -> set[str]:
    """Text columns whose every non-empty (UTF-8) value parses as a finite number (all in one pass)."""
    if not columns:
        return set()
    frame = raw.frame.with_columns(
        pl.when(pl.lit(mask)).then(pl.lit("")).otherwise(pl.col(c)).alias(c)
        for c, mask in raw.invalid_utf8.items() if c in columns
    )
    verdict = frame.select(
        (~((pl.col(c) != "") & float_expr(c, pl.Utf8).is_null()).any()).alias(c) for c in columns
    ).row(0)
    return {c for c, numeric in zip(columns, verdict) if numeric}


def _check_config_columns(stored: StoredTable, config: InputConfig, schema: pl.Schema) -> None:
    table = stored.table
    for column, key in config.table(table).named_columns().items():
        if column not in schema:
            raise InputConfigError(
                f"{config.describe_source()}: key '{table}.{key}' names column '{column}', which {stored} does not "
                f"have; its columns are {', '.join(schema)}"
            )
