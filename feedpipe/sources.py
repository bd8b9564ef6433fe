"""Read the three input tables of a data directory into typed polars frames, checking them against the contract.

What comes out (whatever the file format):
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

Bad input raises `InputError` naming the file, the column, the first offending rows and what was expected. Each row
check is a function returning the 0-based positions of the offending rows (`BadRows`), so a later quarantine step can
drop those rows instead of raising.
"""

from __future__ import annotations

import csv
from dataclasses import dataclass
from pathlib import Path

import polars as pl
import pyarrow as pa
import pyarrow.csv as pacsv

from feedpipe import contract
from feedpipe.input_config import InputConfig, InputConfigError, InputError, TableInputConfig

__all__ = [
    "BadRows", "FeatureSpec", "InputConfig", "InputConfigError", "InputError", "TS_FORMATS", "duplicated_rows",
    "find_table_file", "infer_features", "missing_rows", "read_customers", "read_products", "read_transactions",
    "unparsed_rows",
]

TS_FORMATS = (
    "a Parquet timestamp or date, or ISO 8601 text: YYYY-MM-DD, or YYYY-MM-DD[T or space]HH:MM[:SS[.ffffff]] "
    "optionally followed by Z or an offset such as +02:00"
)
_MAX_ROWS_SHOWN = 5


@dataclass(frozen=True)
class FeatureSpec:
    """One attribute column of customers or products and the role it plays in the model."""

    name: str
    table: str  # contract.CUSTOMERS or contract.PRODUCTS
    role: str  # contract.DENSE, CATEGORICAL or MULTI_CATEGORICAL


@dataclass(frozen=True)
class BadRows:
    """Rows of one column that break the contract; `rows` are 0-based positions in the file's data rows (UInt32)."""

    column: str
    problem: str  # completes "N rows ...", e.g. "do not parse as a number"
    expected: str
    rows: pl.Series


# --- locating and reading files ------------------------------------------------------------------------------------


def find_table_file(data_dir: str | Path, table: str) -> Path:
    """The one `<table>.parquet` or `<table>.csv` in `data_dir`."""
    if table not in contract.TABLES:
        raise ValueError(f"unknown table {table!r}; expected one of {contract.TABLES}")
    data_dir = Path(data_dir)
    if not data_dir.is_dir():
        raise InputError(f"{data_dir}: data directory does not exist")
    candidates = [data_dir / f"{table}{suffix}" for suffix in contract.FILE_SUFFIXES]
    found = [p for p in candidates if p.is_file()]
    if len(found) > 1:
        raise InputError(f"{data_dir}: both {found[0].name} and {found[1].name} exist; keep exactly one of them")
    if not found:
        expected = " or ".join(f"{table}{suffix}" for suffix in contract.FILE_SUFFIXES)
        near = sorted(p.name for p in data_dir.glob(f"{table}*"))
        hint = f" (found {', '.join(near)})" if near else ""
        raise InputError(f"{data_dir}: missing {expected}{hint}")
    return found[0]


def _read_schema(path: Path) -> pl.Schema:
    """Column names and dtypes without reading the data; every CSV column is text."""
    try:
        if path.suffix == ".csv":
            # The header alone, through the csv module: it sees duplicate names (polars renames them) and a BOM.
            with path.open(newline="", encoding="utf-8-sig") as f:
                header = next(csv.reader(f), None)
            if header is None:
                raise InputError(f"{path}: empty file; expected a header line")
            duplicates = sorted({c for c in header if header.count(c) > 1})
            if duplicates:
                raise InputError(f"{path}: duplicate column name(s) in the header: {', '.join(duplicates)}")
            return pl.Schema({c: pl.Utf8 for c in header})
        return pl.scan_parquet(path).collect_schema()
    except (OSError, UnicodeDecodeError, csv.Error, pl.exceptions.PolarsError, pl.exceptions.PanicException) as exc:
        raise InputError(f"{path}: cannot read the file ({_kind(path)}): {exc}") from exc


def _read_columns(path: Path, schema: pl.Schema, columns: list[str]) -> pl.DataFrame:
    """The named columns as stored (CSV: all text, empty cells as "")."""
    try:
        if path.suffix == ".csv":
            return _read_csv_text(path, schema, columns)
        return pl.scan_parquet(path).select(columns).collect()
    except (OSError, pa.ArrowException, pl.exceptions.PolarsError, pl.exceptions.PanicException) as exc:
        raise InputError(f"{path}: cannot read the file ({_kind(path)}): {exc}") from exc


def _read_csv_text(path: Path, schema: pl.Schema, columns: list[str], use_threads: bool = True) -> pl.DataFrame:
    # pyarrow rather than polars for CSV: polars pads a row with too few fields with nulls, so a file cut off mid-row
    # loads silently; pyarrow reports such rows, and its invalid-row hook is where quarantine can go later.
    invalid: list[pacsv.InvalidRow] = []

    def on_invalid(row: pacsv.InvalidRow) -> str:
        invalid.append(row)
        return "skip"

    table = pacsv.read_csv(
        path,
        read_options=pacsv.ReadOptions(use_threads=use_threads),
        parse_options=pacsv.ParseOptions(newlines_in_values=True, invalid_row_handler=on_invalid),
        convert_options=pacsv.ConvertOptions(
            column_types={c: pa.string() for c in schema},
            include_columns=columns,
            strings_can_be_null=False,
            quoted_strings_can_be_null=False,
        ),
    )
    if invalid:
        if use_threads:  # a threaded read does not know row numbers; only the error path pays for a serial reread
            return _read_csv_text(path, schema, columns, use_threads=False)
        shown = "\n".join(
            f"  line {r.number}: {r.actual_columns} fields: {r.text!r}" for r in invalid[:_MAX_ROWS_SHOWN]
        )
        more = f"\n  ... and {len(invalid) - _MAX_ROWS_SHOWN} more" if len(invalid) > _MAX_ROWS_SHOWN else ""
        raise InputError(
            f"{path}: {len(invalid)} line(s) do not have the header's {len(schema)} fields "
            f"(a truncated file, or a value with an unquoted comma):\n{shown}{more}"
        )
    return pl.from_arrow(table)


def _kind(path: Path) -> str:
    return "expected CSV in UTF-8 with a header line" if path.suffix == ".csv" else "expected a Parquet file"


def _check_required_columns(path: Path, table: str, schema: pl.Schema) -> None:
    missing = [c for c in contract.REQUIRED_COLUMNS[table] if c not in schema]
    if missing:
        raise InputError(
            f"{path}: missing required column(s) {', '.join(missing)}; found {', '.join(schema) or 'no columns'}"
        )


# --- row checks: each returns the 0-based positions of the offending rows --------------------------------------------


def missing_rows(values: pl.Series) -> pl.Series:
    """Rows that are null, or empty text."""
    missing = values.is_null()
    if values.dtype == pl.Utf8:
        missing = missing | (values == "")
    return missing.arg_true()


def duplicated_rows(values: pl.Series) -> pl.Series:
    """Rows whose non-null value occurs more than once (every occurrence)."""
    return (values.is_duplicated() & values.is_not_null()).arg_true()


def unparsed_rows(raw: pl.Series, parsed: pl.Series) -> pl.Series:
    """Rows with a value in `raw` that `parsed` could not convert (parsed is null there)."""
    present = raw.is_not_null()
    if raw.dtype == pl.Utf8:
        present = present & (raw != "")
    return (present & parsed.is_null()).arg_true()


def _raise_if_bad(path: Path, raw: pl.DataFrame, problems: list[BadRows]) -> None:
    problems = [p for p in problems if len(p.rows)]
    if not problems:
        return
    label, first = ("line", 2) if path.suffix == ".csv" else ("row", 1)  # a CSV header is line 1
    parts = []
    for p in problems:
        shown = p.rows.head(_MAX_ROWS_SHOWN)
        values = raw[p.column].gather(shown).to_list()
        rows = "\n".join(
            f"    {label} {i + first}: {'empty' if v is None or v == '' else repr(v)}" for i, v in zip(shown, values)
        )
        more = f"\n    ... and {len(p.rows) - len(shown)} more" if len(p.rows) > len(shown) else ""
        parts.append(f"  column '{p.column}': {len(p.rows)} row(s) {p.problem}; expected {p.expected}:\n{rows}{more}")
    raise InputError(f"{path}:\n" + "\n".join(parts))


# --- conversions (polars expressions over whole columns) -------------------------------------------------------------


def _id_expr(path: Path, column: str, dtype: pl.DataType) -> pl.Expr:
    if dtype == pl.Utf8:
        return pl.col(column)
    if dtype.is_integer() or dtype in (pl.Categorical, pl.Enum, pl.Null):
        return pl.col(column).cast(pl.Utf8)
    raise InputError(f"{path}: column '{column}' holds {dtype}; expected integer or text ids")


def _ts_expr(path: Path, dtype: pl.DataType) -> pl.Expr:
    col = pl.col(contract.TS)
    if isinstance(dtype, pl.Datetime):
        if dtype.time_zone is not None:
            col = col.dt.convert_time_zone("UTC").dt.replace_time_zone(None)
        return col.cast(pl.Datetime("us"))
    if dtype == pl.Date:
        return col.cast(pl.Datetime("us"))
    if dtype in (pl.Utf8, pl.Categorical, pl.Null):
        return _parse_iso_ts(col.cast(pl.Utf8))
    raise InputError(f"{path}: column '{contract.TS}' holds {dtype}; expected {TS_FORMATS}")


def _parse_iso_ts(text: pl.Expr) -> pl.Expr:
    """ISO 8601 text -> naive UTC Datetime("us"); null where it does not parse."""
    # One separator ("T") and one spelling of UTC ("+00:00") first, so a handful of formats covers the variants.
    text = text.str.strip_chars().str.replace(r"^(\d{4}-\d{2}-\d{2}) ", "${1}T").str.replace(r"[zZ]$", "+00:00")

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


def _float_expr(column: str, dtype: pl.DataType) -> pl.Expr:
    """Numbers, booleans or numeric text -> Float64; null where missing, unparsable or not finite."""
    col = pl.col(column)
    if _is_text(dtype):
        col = col.cast(pl.Utf8).str.strip_chars().cast(pl.Float64, strict=False)
    else:
        col = col.cast(pl.Float64)
    return pl.when(col.is_finite()).then(col)


def _is_text(dtype: pl.DataType) -> bool:
    return dtype in (pl.Utf8, pl.Categorical, pl.Enum)


def _text_expr(column: str) -> pl.Expr:
    text = pl.col(column).cast(pl.Utf8)
    return pl.when(text != "").then(text)


def _multi_expr(column: str, dtype: pl.DataType, delimiter: str) -> pl.Expr:
    col = pl.col(column)
    if isinstance(dtype, pl.List):
        items = col.cast(pl.List(pl.Utf8))
    else:  # text split on the delimiter; the spaces around items are an artefact of writing, not part of the value
        items = col.cast(pl.Utf8).str.split(delimiter).list.eval(pl.element().str.strip_chars())
    items = items.list.eval(pl.element().filter(pl.element().is_not_null() & (pl.element() != "")))
    return items.fill_null(pl.lit([], dtype=pl.List(pl.Utf8)))


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
    """One `FeatureSpec` per attribute column of `df` (id and excluded columns skipped), in column order.

    On a frame from `read_customers`/`read_products` the dtype already says the role (Float64 dense, Utf8
    categorical, List(Utf8) multi-valued), so `config` only matters for frames that were not loaded here.
    """
    config = config or InputConfig.default()
    section = config.table(table)
    id_column = contract.ID_COLUMN[table]
    return [
        FeatureSpec(name, table, _resolve_role(table, name, dtype, section, f"{table} frame", config))
        for name, dtype in df.schema.items()
        if name != id_column and name not in section.exclude
    ]


def _numeric_text_columns(raw: pl.DataFrame, columns: list[str]) -> set[str]:
    """Text columns whose every non-empty value parses as a finite number (all in one pass)."""
    if not columns:
        return set()
    verdict = raw.select(
        (~((pl.col(c) != "") & _float_expr(c, pl.Utf8).is_null()).any()).alias(c) for c in columns
    ).row(0)
    return {c for c, numeric in zip(columns, verdict) if numeric}


def _check_config_columns(path: Path, table: str, config: InputConfig, schema: pl.Schema) -> None:
    for column, key in config.table(table).named_columns().items():
        if column not in schema:
            raise InputConfigError(
                f"{config.describe_source()}: key '{table}.{key}' names column '{column}', which {path} does not "
                f"have; its columns are {', '.join(schema)}"
            )


# --- the three tables ------------------------------------------------------------------------------------------------


def read_transactions(data_dir: str | Path, config: InputConfig | None = None) -> pl.DataFrame:
    """Columns exactly: customer_id Utf8, product_id Utf8, ts Datetime("us") (naive UTC), quantity Float64.

    Other columns in the file are ignored (and not read). `config` is accepted for symmetry; no key applies here.
    """
    path = find_table_file(data_dir, contract.TRANSACTIONS)
    schema = _read_schema(path)
    _check_required_columns(path, contract.TRANSACTIONS, schema)
    has_quantity = contract.QUANTITY in schema
    columns = [*contract.REQUIRED_COLUMNS[contract.TRANSACTIONS], *([contract.QUANTITY] if has_quantity else [])]
    raw = _read_columns(path, schema, columns)

    if has_quantity and not (schema[contract.QUANTITY].is_numeric() or schema[contract.QUANTITY] in (pl.Utf8, pl.Null)):
        raise InputError(f"{path}: column '{contract.QUANTITY}' holds {schema[contract.QUANTITY]}; expected numbers")
    quantity = _float_expr(contract.QUANTITY, schema[contract.QUANTITY]) if has_quantity else pl.lit(None, pl.Float64)
    typed = raw.select(
        _id_expr(path, contract.CUSTOMER_ID, schema[contract.CUSTOMER_ID]),
        _id_expr(path, contract.PRODUCT_ID, schema[contract.PRODUCT_ID]),
        _ts_expr(path, schema[contract.TS]).alias(contract.TS),
        quantity.alias(contract.QUANTITY),
    )
    problems = [
        BadRows(contract.CUSTOMER_ID, "are empty", "an id", missing_rows(typed[contract.CUSTOMER_ID])),
        BadRows(contract.PRODUCT_ID, "are empty", "an id", missing_rows(typed[contract.PRODUCT_ID])),
        BadRows(contract.TS, "are empty or not a timestamp", TS_FORMATS, missing_rows(typed[contract.TS])),
    ]
    if has_quantity:
        problems.append(BadRows(contract.QUANTITY, "do not parse as a finite number", "a number (empty means 1)",
                                unparsed_rows(raw[contract.QUANTITY], typed[contract.QUANTITY])))
    _raise_if_bad(path, raw, problems)
    return typed.with_columns(pl.col(contract.QUANTITY).fill_null(1.0))


def read_customers(data_dir: str | Path, config: InputConfig | None = None) -> pl.DataFrame:
    """customer_id Utf8 first, then each non-excluded attribute typed by its role (see the module docstring)."""
    return _read_attribute_table(contract.CUSTOMERS, data_dir, config or InputConfig.default())


def read_products(data_dir: str | Path, config: InputConfig | None = None) -> pl.DataFrame:
    """product_id Utf8 first, then each non-excluded attribute typed by its role (see the module docstring)."""
    return _read_attribute_table(contract.PRODUCTS, data_dir, config or InputConfig.default())


def _read_attribute_table(table: str, data_dir: str | Path, config: InputConfig) -> pl.DataFrame:
    path = find_table_file(data_dir, table)
    schema = _read_schema(path)
    _check_required_columns(path, table, schema)
    _check_config_columns(path, table, config, schema)
    section = config.table(table)
    id_column = contract.ID_COLUMN[table]
    attributes = [c for c in schema if c != id_column and c not in section.exclude]
    raw = _read_columns(path, schema, [id_column, *attributes])

    inferable_text = [c for c in attributes if schema[c] == pl.Utf8 and section.role_override(c) is None]
    numeric_text = _numeric_text_columns(raw, inferable_text) if path.suffix == ".csv" else set()
    roles = {c: _resolve_role(table, c, schema[c], section, str(path), config, c in numeric_text) for c in attributes}
    converters = {
        contract.DENSE: lambda c: _float_expr(c, schema[c]),
        contract.CATEGORICAL: _text_expr,
        contract.MULTI_CATEGORICAL: lambda c: _multi_expr(c, schema[c], config.delimiter),
    }
    typed = raw.select(
        _id_expr(path, id_column, schema[id_column]),
        *(converters[roles[c]](c).alias(c) for c in attributes),
    )
    problems = [
        BadRows(id_column, "are empty", "an id", missing_rows(typed[id_column])),
        BadRows(id_column, "repeat an id", "each id once", duplicated_rows(typed[id_column])),
        *(
            BadRows(c, "do not parse as a finite number", f"numbers ('{c}' is {contract.DENSE})",
                    unparsed_rows(raw[c], typed[c]))
            for c in attributes
            if roles[c] == contract.DENSE and _is_text(schema[c])
        ),
    ]
    _raise_if_bad(path, raw, problems)
    return typed
