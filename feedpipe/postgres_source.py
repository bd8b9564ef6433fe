"""Postgres as a source: export one input table (a table or a query named in the input config) to a Parquet file.

The export streams: a server-side cursor (psycopg 3 named cursor) fetches `chunk_rows` rows per round trip, each chunk
becomes an Arrow record batch appended to the Parquet file, and nothing holds the whole result. A client-side cursor
would make libpq buffer the entire result set as text before the first row reached Python, which is how a large table
crashes a load. The spooled file is then read by the same loader as a Parquet file in the data directory, so Postgres
rows are validated and quarantined exactly like file rows; messages name the source ("postgres table sales.orders")
and number rows in the query's order ("row N"). Only the columns the loader reads leave the database: for transactions
the contract's four (`contract.TRANSACTION_COLUMNS`), so a wide orders table costs no more than a narrow one; a
missing required column fails before any row is fetched, with the message a file would give.

Safety: schema, table and column names from the config are validated (`check_identifier`) and always composed as
`psycopg.sql.Identifier`, never as text; a source column the config names must exist in the described result. The
session is read-only, so a configured query cannot write (a data-modifying CTE fails).

Types: integers -> int64, float4/float8 -> float64, numeric -> float8 (cast in SQL; an id column's numeric -> text), text types -> string, bool,
date, timestamp (naive) and timestamptz (UTC), arrays of those -> lists; anything else (uuid, json, enums, ...) is
cast to text in SQL. A date or timestamp of 'infinity' or '-infinity', which Python's types cannot hold, is exported
as empty, so a transaction whose `ts` is infinite is rejected as `missing_ts` rather than stopping the load.
"""

from __future__ import annotations

import os
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from pathlib import Path

import polars as pl
import psycopg
import pyarrow as pa
import pyarrow.parquet as pq
from psycopg import sql

from feedpipe import contract
from feedpipe.database import connect
from feedpipe.input_config import InputConfigError, InputError, PostgresSource, PostgresTableSource
from feedpipe.table_files import StoredTable, check_required_columns

_SCALAR_TYPES = {
    "int2": pa.int64(), "int4": pa.int64(), "int8": pa.int64(),
    "float4": pa.float64(), "float8": pa.float64(),
    "text": pa.string(), "varchar": pa.string(), "name": pa.string(), "citext": pa.string(),
    "bool": pa.bool_(), "date": pa.date32(),
    "timestamp": pa.timestamp("us"), "timestamptz": pa.timestamp("us", tz="UTC"),
}
# Types converted in SQL on the way out: (cast target, arrow type).
# char(n) as text: the cast drops its blank padding, so a char(8) id 'c1' matches the 'c1' of a text column.
_CASTS = {"numeric": ("float8", pa.float64()), "_numeric": ("float8[]", pa.list_(pa.float64())),
          "bpchar": ("text", pa.string())}
# Dates and timestamps Python's types hold (years 1-9999), with a day's margin for the session's time zone.
_FIRST_DAY, _LAST_DAY = "0001-01-02", "9999-12-30"


@dataclass(frozen=True)
class PostgresExport:
    """A table exported to `stored.path`: how many rows, in how many fetched chunks, in how long."""

    stored: StoredTable
    rows: int
    chunks: int
    seconds: float


@dataclass(frozen=True)
class _Column:
    source: str  # name in the described result
    name: str  # name in feedpipe
    cast: str | None
    arrow_type: pa.DataType


def source_url(source: PostgresSource, environ: Mapping[str, str] = os.environ) -> str:
    """The source database URL from the environment variable the config names."""
    url = environ.get(source.url_env, "")
    if not url:
        raise InputConfigError(
            f"key 'source.postgres.url_env': the environment variable {source.url_env} is not set; "
            "it must hold the source database URL (postgresql://...)"
        )
    return url


def export_table(url: str, source: PostgresSource, table: str, spool_dir: Path,
                 progress: Callable[[int, int], None] | None = None) -> PostgresExport:
    """Stream `table` from Postgres into `<spool_dir>/<table>.parquet`; `progress(rows, chunks)` after each chunk."""
    spec = source.tables[table]
    path = Path(spool_dir) / f"{table}.parquet"
    stored = StoredTable(table, path, name=spec.describe())
    started = time.perf_counter()
    with connect(url) as conn:
        conn.read_only = True
        try:
            columns = _describe(conn, spec)
            if table == contract.TRANSACTIONS:
                check_required_columns(stored, pl.Schema({c.name: pl.Utf8 for c in columns}))  # names only
                columns = [c for c in columns if c.name in contract.TRANSACTION_COLUMNS]
            rows, chunks = _stream(conn, spec, columns, path, source.chunk_rows, progress)
        except (psycopg.Error, pa.ArrowException, UnicodeDecodeError, OverflowError, ValueError) as exc:
            if isinstance(exc, InputError):
                raise
            detail = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
            raise InputError(f"{spec.describe()}: cannot read it: {detail}") from None
    return PostgresExport(stored, rows, chunks, time.perf_counter() - started)


def relation(spec: PostgresTableSource) -> sql.Composable:
    """What to select from: the quoted (schema.)table, or the configured query as a subquery."""
    if spec.query is not None:
        # The query is SQL by design (written by whoever owns the config); it runs in a read-only session.
        # The newline ends a trailing "-- comment", which would otherwise swallow the closing parenthesis.
        return sql.SQL("({}\n) AS source").format(sql.SQL(spec.query.strip().rstrip(";")))
    if spec.schema is not None:
        return sql.Identifier(spec.schema, spec.table)
    return sql.Identifier(spec.table)


def _describe(conn: psycopg.Connection, spec: PostgresTableSource) -> list[_Column]:
    cur = conn.execute(sql.SQL("SELECT * FROM {} LIMIT 0").format(relation(spec)))
    described = [(d.name, d.type_code) for d in cur.description]
    type_names = dict(conn.execute(
        "SELECT oid::int, typname::text FROM pg_type WHERE oid = ANY(%s)", [[oid for _, oid in described]]
    ).fetchall())
    names = [name for name, _ in described]
    duplicates = sorted({n for n in names if names.count(n) > 1})
    if duplicates:
        raise InputError(f"{spec.describe()}: duplicate column name(s) in the result: {', '.join(duplicates)}")
    renamed = {source: name for name, source in spec.columns.items()}
    for name, source in spec.columns.items():
        if source not in names:
            raise InputConfigError(
                f"key '{spec.key}.columns.{name}': {spec.describe()} has no column {source!r}; "
                f"its columns are {', '.join(names)}"
            )
        if name in names and name not in renamed:
            raise InputConfigError(
                f"key '{spec.key}.columns.{name}': {spec.describe()} already has a column {name!r}; "
                f"renaming {source!r} to it would give two"
            )
    columns = []
    for source, oid in described:
        type_name = type_names.get(oid, "")
        element = type_name[1:] if type_name.startswith("_") else None
        name = renamed.get(source, source)
        if name in contract.ID_COLUMN.values() and type_name == "numeric":
            # A numeric(12,0) id is an id, not a measurement: as float8 it would fail as "holds Float64".
            cast, arrow_type = "text", pa.string()
        elif type_name in _CASTS:
            cast, arrow_type = _CASTS[type_name]
        elif type_name in _SCALAR_TYPES:
            cast, arrow_type = None, _SCALAR_TYPES[type_name]
        elif element in _SCALAR_TYPES:
            cast, arrow_type = None, pa.list_(_SCALAR_TYPES[element])
        else:
            cast, arrow_type = "text", pa.string()
        columns.append(_Column(source, name, cast, arrow_type))
    return columns


def _exported(c: _Column) -> sql.Composable:
    """The select expression of a column: cast where _CASTS says; an infinite date or timestamp (which
    Python's types cannot hold, so psycopg refuses the whole fetch) as NULL, so that one such row is set
    aside like any empty value (a transaction's `ts` as missing_ts) instead of stopping the load."""
    if c.cast == "float8":
        # A numeric beyond float8's range would stop the fetch ("out of range for type double precision"):
        # NaN instead, which the row checks reject (not NULL: a missing quantity means 1).
        # Also one too small for float8 (1e-400: "out of range" too): NaN, like any number that is not one.
        return sql.SQL("CASE WHEN {0} IS NULL THEN NULL WHEN {0} = 0 THEN 0::float8 "
                       "WHEN abs({0}) BETWEEN 2.2250738585072014e-308 AND 1.7976931348623157e308 THEN {0}::float8 "
                       "ELSE 'NaN'::float8 END").format(sql.Identifier(c.source))
    if c.cast:  # c.cast comes from _CASTS only
        return sql.SQL("{}::{}").format(sql.Identifier(c.source), sql.SQL(c.cast))
    if pa.types.is_date(c.arrow_type) or pa.types.is_timestamp(c.arrow_type):
        # Infinite, BC and after-9999 values stop the whole fetch in psycopg: NULL, set aside by the row checks.
        return sql.SQL("CASE WHEN isfinite({0}) AND {0} BETWEEN {1} AND {2} THEN {0} END").format(
            sql.Identifier(c.source), sql.Literal(_FIRST_DAY), sql.Literal(_LAST_DAY))
    return sql.Identifier(c.source)


def _stream(conn: psycopg.Connection, spec: PostgresTableSource, columns: list[_Column], path: Path,
            chunk_rows: int, progress: Callable[[int, int], None] | None) -> tuple[int, int]:
    select = sql.SQL(", ").join(sql.SQL("{} AS {}").format(_exported(c), sql.Identifier(c.name)) for c in columns)
    schema = pa.schema([(c.name, c.arrow_type) for c in columns])
    rows = chunks = 0
    with conn.cursor(name="feedpipe_export") as cur, pq.ParquetWriter(path, schema) as writer:
        cur.itersize = chunk_rows
        cur.execute(sql.SQL("SELECT {} FROM {}").format(select, relation(spec)))
        while batch := cur.fetchmany(chunk_rows):
            values = list(zip(*batch))  # row tuples -> columns, in C
            writer.write_batch(pa.record_batch(
                [pa.array(v, type=c.arrow_type) for v, c in zip(values, columns)], schema=schema
            ))
            rows += len(batch)
            chunks += 1
            if progress is not None:
                progress(rows, chunks)
    return rows, chunks
