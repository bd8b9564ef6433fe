"""Versioned feed tables in Postgres and the atomic switch that readers never see half-done.

Readers (the website, downstream SQL) only ever name the view `feedpipe.current_feed`. Each publish loads a new
table `feedpipe.feed_v<version>` beside the served one, indexes and analyzes it, then points the view at it in one
short transaction. A query sees either the old version or the new one, never both and never an empty feed. Old
tables stay for `retention` versions (a rollback is a view switch away) and are then dropped.

`feedpipe.feed_versions` records every attempt: 'loading' (committed before the load, so a crash leaves a trace),
'current', 'retired' or 'failed'.
"""

from __future__ import annotations

import datetime as dt
import logging
import time
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import psycopg
import pyarrow as pa
import pyarrow.compute as pc
from psycopg import sql
from psycopg.rows import dict_row

from feedpipe.database import connect, redact_url

logger = logging.getLogger(__name__)

SCHEMA = "feedpipe"
VIEW = "current_feed"
VERSIONS_TABLE = "feed_versions"
VERSION_SEQUENCE = "feed_version_seq"
MIGRATIONS_TABLE = "schema_migrations"
READER_ROLE = "feedpipe_reader"
TABLE_PREFIX = "feed_v"
STATUSES = ("loading", "current", "retired", "failed")

# Session-level advisory lock held for a whole publish, and a transaction-level one for schema changes (also taken
# by the switch, which rewrites the view that init_schema grants on). Advisory locks are per database.
PUBLISH_LOCK_KEY = 0x6665_6564  # "feed"
SCHEMA_LOCK_KEY = 0x6665_6565


@dataclass(frozen=True)
class FeedColumn:
    """One column of the reader contract: its SQL type and, where it is stored, its numpy dtype (None: text)."""

    name: str
    sql_type: str
    numpy_dtype: np.dtype | None = None


# The feed schema, defined once: the table DDL, the COPY column list and binary layout, the view and its empty
# placeholder are all derived from these two tuples.
TABLE_COLUMNS = (
    FeedColumn("customer_id", "text"),
    FeedColumn("product_id", "text"),
    FeedColumn("rank", "integer", np.dtype(np.int32)),
    FeedColumn("score", "real", np.dtype(np.float32)),
)
# Constant within a version, so they are literals in the view rather than 2 columns repeated on every stored row.
VERSION_COLUMNS = (FeedColumn("feed_date", "date"), FeedColumn("model_version", "text"))
FEED_COLUMNS = TABLE_COLUMNS + VERSION_COLUMNS
# One customer's feed, in rank order, is an index-only scan.
INDEX_KEY = ("customer_id", "rank")
INDEX_INCLUDE = ("product_id", "score")


class PublishError(RuntimeError):
    """A publish could not complete; the served feed is unchanged."""


class PublishLockTimeout(PublishError):
    """Another publish held the publish lock for longer than we were willing to wait."""


def _as_large_strings(name: str, values: Any) -> pa.LargeStringArray:
    if hasattr(values, "to_arrow"):  # a polars Series
        values = values.to_arrow()
    try:
        if isinstance(values, (pa.Array, pa.ChunkedArray)):
            if not (pa.types.is_string(values.type) or pa.types.is_large_string(values.type)
                    or pa.types.is_string_view(values.type)):
                raise ValueError(f"feed column {name!r}: expected a string array, got {values.type}")
            values = values.cast(pa.large_string())
        else:
            values = pa.array(np.asarray(values, dtype=object), type=pa.large_string())
    except (pa.ArrowInvalid, pa.ArrowTypeError, pa.ArrowNotImplementedError) as exc:
        raise ValueError(f"feed column {name!r}: expected strings ({exc})") from None
    if isinstance(values, pa.ChunkedArray):
        values = values.combine_chunks()
    if values.null_count:
        bad = np.flatnonzero(values.is_null().to_numpy(zero_copy_only=False))[:5].tolist()
        raise ValueError(f"feed column {name!r}: {values.null_count} null ids, first at rows {bad}")
    return values


def _as_numbers(name: str, values: Any, dtype: np.dtype) -> np.ndarray:
    values = np.asarray(values)
    if dtype.kind == "i":
        if values.dtype.kind not in "iu":
            raise ValueError(f"feed column {name!r}: expected integers, got dtype {values.dtype}")
        info = np.iinfo(dtype)
        bad = np.flatnonzero((values < info.min) | (values > info.max))
    else:
        if values.dtype.kind not in "fiu":
            raise ValueError(f"feed column {name!r}: expected floats, got dtype {values.dtype}")
        # Cast first: a float64 that overflows float32 becomes inf, which is as unservable as NaN.
        values = values.astype(dtype, copy=False)
        bad = np.flatnonzero(~np.isfinite(values))
    if bad.size:
        raise ValueError(
            f"feed column {name!r}: {bad.size} values not representable as finite {dtype}, "
            f"first at rows {bad[:5].tolist()}: {values[bad[:5]].tolist()}"
        )
    return np.ascontiguousarray(values, dtype=dtype)


@dataclass
class FeedArrays:
    """A feed as equal-length columns, converted once on construction.

    `customer_id`, `product_id`: pyarrow string arrays, numpy object arrays of str (or polars Series), held as
    `pa.LargeStringArray`; `rank`: integers, held as int32; `score`: floats, held as float32 and finite.
    """

    customer_id: Any
    product_id: Any
    rank: Any
    score: Any

    def __post_init__(self) -> None:
        for column in TABLE_COLUMNS:
            values = getattr(self, column.name)
            if column.numpy_dtype is None:
                setattr(self, column.name, _as_large_strings(column.name, values))
            else:
                setattr(self, column.name, _as_numbers(column.name, values, column.numpy_dtype))
        lengths = {column.name: len(getattr(self, column.name)) for column in TABLE_COLUMNS}
        if len(set(lengths.values())) > 1:
            raise ValueError(f"feed columns differ in length: {lengths}")

    def __len__(self) -> int:
        return len(self.rank)

    def customers(self) -> int:
        return pc.count_distinct(self.customer_id).as_py() if len(self) else 0


@dataclass(frozen=True)
class PublishResult:
    version: int
    table_name: str
    rows: int
    customers: int
    seconds: float
    copy_seconds: float
    index_seconds: float
    dropped_tables: tuple[str, ...] = field(default=())


# --- binary COPY -------------------------------------------------------------------------------------------------
# Format: https://www.postgresql.org/docs/current/sql-copy.html#id-1.9.3.55.9.4 -- a signature, flags and header
# extension length, then per row an int16 field count and per field an int32 byte length and the value in network
# byte order (text as its UTF-8 bytes), then an int16 -1.
_COPY_SIGNATURE = b"PGCOPY\n\xff\r\n\x00" + (0).to_bytes(4, "big") + (0).to_bytes(4, "big")
_COPY_TRAILER = (-1).to_bytes(2, "big", signed=True)


def _row_fixed_dtype() -> np.dtype:
    """Every fixed-width byte of one row, in wire order: the field count, each length word, each numeric value."""
    fields: list[tuple[str, str | np.dtype]] = [("nfields", ">i2")]
    for column in TABLE_COLUMNS:
        fields.append((f"{column.name}_len", ">i4"))
        if column.numpy_dtype is not None:
            fields.append((column.name, column.numpy_dtype.newbyteorder(">")))
    return np.dtype(fields)  # packed: no alignment padding between fields


_ROW_FIXED = _row_fixed_dtype()


def _string_parts(values: pa.LargeStringArray, start: int, stop: int) -> tuple[np.ndarray, np.ndarray]:
    """Per-row byte lengths and the concatenated UTF-8 bytes of rows [start, stop), without copying."""
    _, offsets_buf, data_buf = values.buffers()
    offsets = np.frombuffer(offsets_buf, dtype=np.int64)[values.offset + start : values.offset + stop + 1]
    data = np.frombuffer(data_buf, dtype=np.uint8) if data_buf is not None else np.empty(0, np.uint8)
    return np.diff(offsets), data[offsets[0] : offsets[-1]]


def encode_copy_rows(feed: FeedArrays, start: int = 0, stop: int | None = None) -> np.ndarray:
    """Rows [start, stop) of `feed` in PostgreSQL's binary COPY row format (no signature or trailer), as uint8.

    Whole-column numpy: the fixed-width bytes of all rows are one structured array; each output byte is labelled
    with its source (0: fixed bytes, k: text column k) by a cumulative sum over +k/-k marks at the text fields'
    starts and ends, and each source fills its labelled bytes in order with one masked assignment.
    """
    stop = len(feed) if stop is None else stop
    n = stop - start
    fixed = np.empty(n, dtype=_ROW_FIXED)
    fixed["nfields"] = len(TABLE_COLUMNS)
    # Per text column: fixed bytes before it in a row, text bytes before it in each row, its lengths, its bytes.
    texts: list[tuple[int, np.ndarray, np.ndarray, np.ndarray]] = []
    text_bytes_before = np.zeros(n, dtype=np.int64)
    for column in TABLE_COLUMNS:
        values = getattr(feed, column.name)
        if column.numpy_dtype is None:
            lengths, data = _string_parts(values, start, stop)
            fixed[f"{column.name}_len"] = lengths
            fixed_before = _ROW_FIXED.fields[f"{column.name}_len"][1] + 4
            texts.append((fixed_before, text_bytes_before.copy(), lengths, data))
            text_bytes_before += lengths
        else:
            fixed[f"{column.name}_len"] = column.numpy_dtype.itemsize
            fixed[column.name] = values[start:stop]

    row_start = np.zeros(n + 1, dtype=np.int64)
    np.cumsum(_ROW_FIXED.itemsize + text_bytes_before, out=row_start[1:])
    total = int(row_start[-1])
    source = np.zeros(total + 1, dtype=np.int8)
    for code, (fixed_before, text_before, lengths, _) in enumerate(texts, start=1):
        text_start = row_start[:-1] + fixed_before + text_before
        # Two statements, so a zero-length text (start == end) nets to 0; within each, the indices are distinct.
        source[text_start] += code
        source[text_start + lengths] -= code
    np.cumsum(source, dtype=np.int8, out=source)
    source = source[:total]

    out = np.empty(total, dtype=np.uint8)
    out[source == 0] = fixed.view(np.uint8)
    for code, (_, _, _, data) in enumerate(texts, start=1):
        out[source == code] = data
    return out


# --- SQL built from the schema ----------------------------------------------------------------------------------
def _qualified(name: str) -> sql.Composed:
    return sql.Identifier(SCHEMA, name)


def _column_list(columns=TABLE_COLUMNS) -> sql.Composed:
    return sql.SQL(", ").join(sql.Identifier(c.name) for c in columns)


def _create_table_sql(table: str) -> sql.Composed:
    definitions = sql.SQL(", ").join(
        sql.SQL("{} {} NOT NULL").format(sql.Identifier(c.name), sql.SQL(c.sql_type)) for c in TABLE_COLUMNS
    )
    return sql.SQL("CREATE TABLE {} ({})").format(_qualified(table), definitions)


def _create_index_sql(table: str) -> sql.Composed:
    return sql.SQL("CREATE INDEX {} ON {} ({}) INCLUDE ({})").format(
        sql.Identifier(f"{table}_customer_rank"),
        _qualified(table),
        sql.SQL(", ").join(map(sql.Identifier, INDEX_KEY)),
        sql.SQL(", ").join(map(sql.Identifier, INDEX_INCLUDE)),
    )


def _view_sql(table: str | None, constants: dict[str, Any]) -> sql.Composed:
    """The view over `table` with the version's constants as typed literals; over no rows when `table` is None."""
    items = []
    for column in FEED_COLUMNS:
        if table is not None and column in TABLE_COLUMNS:
            items.append(sql.Identifier(column.name))
        else:
            items.append(
                sql.SQL("CAST({} AS {}) AS {}").format(
                    sql.Literal(constants.get(column.name)), sql.SQL(column.sql_type), sql.Identifier(column.name)
                )
            )
    source = sql.SQL("FROM {}").format(_qualified(table)) if table is not None else sql.SQL("WHERE false")
    return sql.SQL("CREATE OR REPLACE VIEW {} AS SELECT {} {}").format(
        _qualified(VIEW), sql.SQL(", ").join(items), source
    )


def _drop_table(conn: psycopg.Connection, table: str, lock_timeout_ms: int) -> bool:
    """Drop a feed table unless readers hold it past the lock timeout (then the next publish retries)."""
    try:
        with conn.transaction():
            conn.execute("SELECT set_config('lock_timeout', %s, true)", [f"{int(lock_timeout_ms)}ms"])
            # No CASCADE: the table the view reads cannot be dropped by mistake.
            conn.execute(sql.SQL("DROP TABLE IF EXISTS {}").format(_qualified(table)))
        return True
    except (psycopg.errors.LockNotAvailable, psycopg.errors.DependentObjectsStillExist) as exc:
        logger.warning("left %s.%s in place: %s", SCHEMA, table, str(exc).strip())
        return False


# --- schema -------------------------------------------------------------------------------------------------------
def _migration_0001(cur: psycopg.Cursor) -> None:
    statuses = sql.SQL(", ").join(map(sql.Literal, STATUSES))
    cur.execute(
        sql.SQL(
            """CREATE TABLE IF NOT EXISTS {} (
                version bigint PRIMARY KEY,
                table_name text NOT NULL,
                feed_date date,
                model_version text,
                rows bigint,
                customers bigint,
                created_at timestamptz NOT NULL DEFAULT now(),
                published_at timestamptz,
                run_id text,
                status text NOT NULL CHECK (status IN ({})))"""
        ).format(_qualified(VERSIONS_TABLE), statuses)
    )
    # At most one current version, whatever goes wrong in the code that switches.
    cur.execute(
        sql.SQL("CREATE UNIQUE INDEX IF NOT EXISTS {} ON {} ((true)) WHERE status = 'current'").format(
            sql.Identifier(f"{VERSIONS_TABLE}_one_current"), _qualified(VERSIONS_TABLE)
        )
    )
    cur.execute(sql.SQL("CREATE SEQUENCE IF NOT EXISTS {}").format(_qualified(VERSION_SEQUENCE)))
    cur.execute("SELECT to_regclass(%s)", [f"{SCHEMA}.{VIEW}"])
    if cur.fetchone()[0] is None:
        # Typed and empty, so readers' queries work before the first publish.
        cur.execute(_view_sql(None, {}))


# Append only: an id, once applied somewhere, means the same change forever.
MIGRATIONS = (("0001_feed_versions_and_view", _migration_0001),)


def init_schema(conn: psycopg.Connection) -> list[str]:
    """Create or update the feedpipe schema; returns the ids of the migrations applied now (empty when up to date).

    Safe to run repeatedly and concurrently: a transaction-level advisory lock serializes callers per database.
    """
    with conn.transaction(), conn.cursor() as cur:
        cur.execute("SELECT pg_advisory_xact_lock(%s)", [SCHEMA_LOCK_KEY])
        cur.execute(sql.SQL("CREATE SCHEMA IF NOT EXISTS {}").format(sql.Identifier(SCHEMA)))
        cur.execute(
            sql.SQL(
                "CREATE TABLE IF NOT EXISTS {} (id text PRIMARY KEY, applied_at timestamptz NOT NULL DEFAULT now())"
            ).format(_qualified(MIGRATIONS_TABLE))
        )
        cur.execute(sql.SQL("SELECT id FROM {}").format(_qualified(MIGRATIONS_TABLE)))
        done = {row[0] for row in cur.fetchall()}
        applied = []
        for migration_id, migrate in MIGRATIONS:
            if migration_id not in done:
                migrate(cur)
                record = sql.SQL("INSERT INTO {} (id) VALUES (%s)").format(_qualified(MIGRATIONS_TABLE))
                cur.execute(record, [migration_id])
                applied.append(migration_id)
        _ensure_reader_role(cur)
    if applied:
        logger.info("applied feedpipe migrations %s", applied)
    return applied


def _reader_role_exists(cur: psycopg.Cursor) -> bool:
    cur.execute("SELECT 1 FROM pg_roles WHERE rolname = %s", [READER_ROLE])
    return cur.fetchone() is not None


def _ensure_reader_role(cur: psycopg.Cursor) -> None:
    """`feedpipe_reader` (NOLOGIN) may use the schema and select the view, nothing else. Idempotent."""
    if not _reader_role_exists(cur):
        cur.execute("SELECT rolname, rolcreaterole OR rolsuper FROM pg_roles WHERE rolname = current_user")
        user, can_create = cur.fetchone()
        if not can_create:
            logger.warning(
                "role %s does not exist and %s lacks CREATEROLE: an admin must create it and rerun init_schema",
                READER_ROLE, user,
            )
            return
        # Roles are cluster-wide, so the per-database advisory lock does not serialize this: tolerate a twin.
        cur.execute(
            sql.SQL(
                "DO $$ BEGIN CREATE ROLE {} NOLOGIN; "
                "EXCEPTION WHEN duplicate_object OR unique_violation THEN NULL; END $$"
            ).format(sql.Identifier(READER_ROLE))
        )
    cur.execute(sql.SQL("GRANT USAGE ON SCHEMA {} TO {}").format(sql.Identifier(SCHEMA), sql.Identifier(READER_ROLE)))
    cur.execute(_grant_view_sql())


def _grant_view_sql() -> sql.Composed:
    return sql.SQL("GRANT SELECT ON {} TO {}").format(_qualified(VIEW), sql.Identifier(READER_ROLE))


# --- publish ------------------------------------------------------------------------------------------------------
def publish_feed(
    url: str,
    feed: FeedArrays,
    *,
    feed_date: dt.date | str,
    model_version: str,
    run_id: str | None = None,
    retention: int = 3,
    lock_timeout_ms: int = 2000,
    publish_lock_wait_s: float = 600.0,
    switch_attempts: int = 5,
    chunk_rows: int = 200_000,
    maintenance_work_mem: str = "256MB",
    allow_empty: bool = False,
) -> PublishResult:
    """Load `feed` into a new version table and make it what `feedpipe.current_feed` serves.

    `retention` versions (the current one included) keep their tables; older ones are dropped. `lock_timeout_ms`
    bounds how long the switch (and each drop) may queue behind readers, during which new readers queue behind it;
    the switch is retried `switch_attempts` times. A concurrent publish waits up to `publish_lock_wait_s` for this
    one. An empty feed is refused unless `allow_empty`: served, it would blank every customer's feed.
    """
    if retention < 1:
        raise ValueError(f"retention must be >= 1 (the current version), got {retention}")
    if not len(feed) and not allow_empty:
        raise PublishError("refusing to publish an empty feed (pass allow_empty=True to serve one)")
    feed_date = dt.date.fromisoformat(feed_date) if isinstance(feed_date, str) else feed_date
    started = time.perf_counter()
    rows, customers = len(feed), feed.customers()
    with connect(url, autocommit=True) as conn:
        init_schema(conn)
        _acquire_publish_lock(conn, url, publish_lock_wait_s)
        _clean_orphans(conn, lock_timeout_ms)
        version = conn.execute(
            sql.SQL(
                "INSERT INTO {} (version, table_name, feed_date, model_version, rows, customers, run_id, status) "
                "SELECT v, %s || v, %s, %s, %s, %s, %s, 'loading' FROM nextval(%s::regclass) AS v RETURNING version"
            ).format(_qualified(VERSIONS_TABLE)),
            [TABLE_PREFIX, feed_date, model_version, rows, customers, run_id, f"{SCHEMA}.{VERSION_SEQUENCE}"],
        ).fetchone()[0]
        table = f"{TABLE_PREFIX}{version}"
        try:
            copy_seconds, index_seconds = _load(conn, table, feed, chunk_rows, maintenance_work_mem)
            _switch(conn, version, table, feed_date, model_version, lock_timeout_ms, switch_attempts)
        except BaseException:
            _mark_failed(conn, version, table, lock_timeout_ms)
            raise
        dropped = _apply_retention(conn, retention, lock_timeout_ms)
    result = PublishResult(
        version=version, table_name=f"{SCHEMA}.{table}", rows=rows, customers=customers,
        seconds=time.perf_counter() - started, copy_seconds=copy_seconds, index_seconds=index_seconds,
        dropped_tables=tuple(dropped),
    )
    logger.info(
        "published %s: %d rows, %d customers in %.1f s (copy %.1f s, index+analyze %.1f s) on %s",
        result.table_name, rows, customers, result.seconds, copy_seconds, index_seconds, redact_url(url),
    )
    return result


def _acquire_publish_lock(conn: psycopg.Connection, url: str, wait_s: float) -> None:
    """Session-level, so it spans the publish's transactions and is released if this process dies."""
    deadline = time.monotonic() + wait_s
    delay = 0.05
    while not conn.execute("SELECT pg_try_advisory_lock(%s)", [PUBLISH_LOCK_KEY]).fetchone()[0]:
        if time.monotonic() >= deadline:
            holder = conn.execute(
                "SELECT a.pid, a.application_name, now() - a.backend_start FROM pg_locks l "
                "JOIN pg_stat_activity a USING (pid) WHERE l.locktype = 'advisory' AND l.granted "
                "AND l.database = (SELECT oid FROM pg_database WHERE datname = current_database()) "
                "AND l.classid = 0 AND l.objid = %s AND l.objsubid = 1",
                [PUBLISH_LOCK_KEY],
            ).fetchone()
            who = f"backend pid {holder[0]} ({holder[1]!r}, connected for {holder[2]})" if holder else "another session"
            raise PublishLockTimeout(
                f"another feed publish is running on {redact_url(url)}: {who} holds the publish lock; "
                f"gave up after {wait_s:.1f} s"
            )
        time.sleep(delay)
        delay = min(delay * 2, 1.0)


def _clean_orphans(conn: psycopg.Connection, lock_timeout_ms: int) -> None:
    """Under the publish lock, a 'loading' version is one whose publisher died: fail it and drop stray tables."""
    failed = conn.execute(
        sql.SQL("UPDATE {} SET status = 'failed' WHERE status = 'loading' RETURNING version").format(
            _qualified(VERSIONS_TABLE)
        )
    ).fetchall()
    if failed:
        logger.warning(
            "marked versions %s failed: left 'loading' by a publish that did not finish", [v for v, in failed]
        )
    strays = conn.execute(
        sql.SQL(
            "SELECT c.relname FROM pg_class c JOIN pg_namespace n ON n.oid = c.relnamespace "
            "WHERE n.nspname = %s AND c.relkind = 'r' AND c.relname ~ %s AND NOT EXISTS ("
            "  SELECT 1 FROM {} v WHERE v.table_name = c.relname AND v.status IN ('current', 'retired')) "
            "ORDER BY c.relname"
        ).format(_qualified(VERSIONS_TABLE)),
        [SCHEMA, f"^{TABLE_PREFIX}[0-9]+$"],
    ).fetchall()
    for (table,) in strays:
        if _drop_table(conn, table, lock_timeout_ms):
            logger.warning("dropped orphaned feed table %s.%s", SCHEMA, table)


def _load(
    conn: psycopg.Connection, table: str, feed: FeedArrays, chunk_rows: int, maintenance_work_mem: str
) -> tuple[float, float]:
    """Create, fill, index and analyze the version table in one transaction; returns (copy, index) seconds.

    Creating the table in the COPY's transaction allows FREEZE: rows are written frozen and their pages all-visible
    (PostgreSQL >= 14), so index-only scans skip the heap from the first query without waiting for a VACUUM, and
    with wal_level=minimal the load skips WAL.
    """
    copy_sql = sql.SQL("COPY {} ({}) FROM STDIN (FORMAT BINARY, FREEZE)").format(_qualified(table), _column_list())
    with conn.transaction(), conn.cursor() as cur:
        cur.execute("SELECT set_config('maintenance_work_mem', %s, true)", [maintenance_work_mem])
        t0 = time.perf_counter()
        cur.execute(_create_table_sql(table))
        with cur.copy(copy_sql) as copy:
            copy.write(_COPY_SIGNATURE)
            # Chunks bound memory (~45 bytes a row here plus a byte of labels). 200k rows measured 1.55M rows/s
            # end to end against 1.25M with 1M-row chunks (PostgreSQL 15, 2 cores): smaller chunks stay in cache
            # and the server ingests one while the next is encoded.
            for start in range(0, len(feed), chunk_rows):
                copy.write(memoryview(encode_copy_rows(feed, start, min(start + chunk_rows, len(feed)))))
            copy.write(_COPY_TRAILER)
        t1 = time.perf_counter()
        cur.execute(_create_index_sql(table))
        cur.execute(sql.SQL("ANALYZE {}").format(_qualified(table)))
        t2 = time.perf_counter()
    return t1 - t0, t2 - t1


def _switch(
    conn: psycopg.Connection, version: int, table: str, feed_date: dt.date, model_version: str,
    lock_timeout_ms: int, attempts: int,
) -> None:
    """Point the view at `table` and record it current, in one transaction short enough to be atomic for readers."""
    view = _view_sql(table, {"feed_date": feed_date, "model_version": model_version})
    for attempt in range(1, attempts + 1):
        try:
            with conn.transaction(), conn.cursor() as cur:
                cur.execute("SELECT set_config('lock_timeout', %s, true)", [f"{int(lock_timeout_ms)}ms"])
                cur.execute("SELECT pg_advisory_xact_lock(%s)", [SCHEMA_LOCK_KEY])
                cur.execute(view)
                cur.execute(
                    sql.SQL("UPDATE {} SET status = 'retired' WHERE status = 'current'").format(
                        _qualified(VERSIONS_TABLE)
                    )
                )
                cur.execute(
                    sql.SQL("UPDATE {} SET status = 'current', published_at = now() WHERE version = %s").format(
                        _qualified(VERSIONS_TABLE)
                    ),
                    [version],
                )
                # CREATE OR REPLACE keeps the view's grants; granting again covers a role created since.
                if _reader_role_exists(cur):
                    cur.execute(_grant_view_sql())
            return
        except psycopg.errors.LockNotAvailable:
            holders = conn.execute(
                "SELECT pid, now() - query_start FROM pg_stat_activity WHERE pid IN ("
                "  SELECT pid FROM pg_locks WHERE relation = to_regclass(%s) AND granted) AND pid <> pg_backend_pid()",
                [f"{SCHEMA}.{VIEW}"],
            ).fetchall()
            logger.warning(
                "switch to %s attempt %d/%d: readers held %s.%s past %d ms (pid, running for): %s",
                table, attempt, attempts, SCHEMA, VIEW, lock_timeout_ms, holders,
            )
            if attempt == attempts:
                raise PublishError(
                    f"could not switch {SCHEMA}.{VIEW} to {table} in {attempts} attempts of {lock_timeout_ms} ms: "
                    f"long-running readers hold the view (pid, running for): {holders}"
                ) from None
            time.sleep(min(0.2 * 2**attempt, 5.0))


def _mark_failed(conn: psycopg.Connection, version: int, table: str, lock_timeout_ms: int) -> None:
    """Best effort: if the connection is gone, the row stays 'loading' and the next publish cleans it up."""
    try:
        if conn.closed or conn.info.transaction_status != psycopg.pq.TransactionStatus.IDLE:
            return
        _drop_table(conn, table, lock_timeout_ms)
        conn.execute(
            sql.SQL("UPDATE {} SET status = 'failed' WHERE version = %s AND status = 'loading'").format(
                _qualified(VERSIONS_TABLE)
            ),
            [version],
        )
    except psycopg.Error as exc:
        logger.warning("could not mark version %d failed (the next publish will): %s", version, exc)


def _apply_retention(conn: psycopg.Connection, retention: int, lock_timeout_ms: int) -> list[str]:
    """Drop the tables of served versions beyond the newest `retention`, never the current one's."""
    try:
        doomed = conn.execute(
            sql.SQL(
                "SELECT table_name FROM {} "
                "WHERE status = 'retired' AND to_regclass(%s || '.' || table_name) IS NOT NULL "
                "AND version NOT IN (SELECT version FROM {} WHERE status IN ('current', 'retired') "
                "                    ORDER BY status = 'current' DESC, version DESC LIMIT %s) "
                "ORDER BY version"
            ).format(_qualified(VERSIONS_TABLE), _qualified(VERSIONS_TABLE)),
            [SCHEMA, retention],
        ).fetchall()
        return [f"{SCHEMA}.{t}" for (t,) in doomed if _drop_table(conn, t, lock_timeout_ms)]
    except psycopg.Error as exc:  # the new version is already served; a failed cleanup must not fail the publish
        logger.warning("retention cleanup failed, the next publish will retry: %s", exc)
        return []


# --- readers ------------------------------------------------------------------------------------------------------
def _schema_ready(conn: psycopg.Connection) -> bool:
    return conn.execute("SELECT to_regclass(%s)", [f"{SCHEMA}.{VERSIONS_TABLE}"]).fetchone()[0] is not None


def list_versions(conn: psycopg.Connection) -> list[dict]:
    """Every publish attempt, newest first, with `table_exists` (False once retention dropped its table)."""
    if not _schema_ready(conn):
        return []
    with conn.cursor(row_factory=dict_row) as cur:
        cur.execute(
            sql.SQL(
                "SELECT *, to_regclass(%s || '.' || table_name) IS NOT NULL AS table_exists "
                "FROM {} ORDER BY version DESC"
            ).format(_qualified(VERSIONS_TABLE)),
            [SCHEMA],
        )
        return cur.fetchall()


def current_version(conn: psycopg.Connection) -> dict | None:
    """The `feed_versions` row the view serves, or None before the first publish."""
    if not _schema_ready(conn):
        return None
    with conn.cursor(row_factory=dict_row) as cur:
        cur.execute(sql.SQL("SELECT * FROM {} WHERE status = 'current'").format(_qualified(VERSIONS_TABLE)))
        return cur.fetchone()


def read_feed(conn: psycopg.Connection, customer_id: str, limit: int | None = None) -> list[tuple[str, int, float]]:
    """One customer's served feed as (product_id, rank, score), best first: the query the index is built for."""
    query = sql.SQL("SELECT product_id, rank, score FROM {} WHERE customer_id = %s ORDER BY rank").format(
        _qualified(VIEW)
    )
    params: list[Any] = [customer_id]
    if limit is not None:
        query += sql.SQL(" LIMIT %s")
        params.append(int(limit))
    return conn.execute(query, params).fetchall()
