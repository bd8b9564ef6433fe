"""Versioned feed tables in Postgres and the atomic switch that readers never see half-done.

Readers (the website, downstream SQL) only ever name the view `feedpipe.current_feed`. Each publish loads a new
table `feedpipe.feed_v<version>` beside the served one, indexes and analyzes it, then points the view at it in one
short transaction. A query sees either the old version or the new one, never both and never an empty feed. Old
tables stay for `retention` versions (a rollback is a view switch away) and are then dropped.

`feedpipe.feed_versions` records every attempt: 'loading' (committed before the load, so a crash leaves a trace),
'current', 'retired' or 'failed'; `customers` is filled in at the switch.

The schema and its migrations are in `feed_schema.py`, the COPY encoding in `copy_binary.py`, the read helpers in
`feed_queries.py`; the names other modules use are re-exported here.
"""

from __future__ import annotations

import datetime as dt
import logging
import os
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field

import psycopg
from psycopg import sql

from feedpipe.copy_binary import DEFAULT_CHUNK_ROWS, FeedArrays, copy_stream, encode_copy_rows
from feedpipe.database import connect, redact_url
from feedpipe.feed_queries import current_version, list_versions, read_feed
from feedpipe.feed_schema import (
    FEED_COLUMNS,
    SCHEMA,
    SCHEMA_LOCK_KEY,
    TABLE_PREFIX,
    VERSION_SEQUENCE,
    VERSION_VIEW,
    VERSIONS_TABLE,
    VIEW,
    column_list,
    create_index_sql,
    create_table_sql,
    init_schema,
    qualified,
    version_view_sql,
    view_sql,
)

__all__ = [
    "FEED_COLUMNS", "PUBLISH_LOCK_KEY", "FeedArrays", "PublishError", "PublishLockTimeout", "PublishResult",
    "current_version", "encode_copy_rows", "init_schema", "list_versions", "publish_feed", "read_feed",
]

logger = logging.getLogger(__name__)

# Session-level advisory lock held for a whole publish (per database).
PUBLISH_LOCK_KEY = 0x6665_6564  # "feed"
# Crash-safety tests set this to a pause point's name ('copy', 'switch') to stop a publisher there and SIGKILL it.
PAUSE_AT_ENV = "FEEDPIPE_TEST_PAUSE_AT"


class PublishError(RuntimeError):
    """A publish could not complete; the served feed is unchanged."""


class PublishLockTimeout(PublishError):
    """Another publish held the publish lock for longer than we were willing to wait."""


@dataclass(frozen=True)
class PublishResult:
    version: int
    table_name: str
    rows: int  # sent
    customers: int
    seconds: float
    copy_seconds: float
    index_seconds: float
    dropped_tables: tuple[str, ...] = field(default=())
    rows_loaded: int = -1  # what the server's COPY reported storing
    # False: loaded and kept (a view switch away, like a retired version), but a newer feed date stays served
    served: bool = True
    served_feed_date: dt.date | None = None  # the feed date being served after this publish


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
    chunk_rows: int = DEFAULT_CHUNK_ROWS,
    maintenance_work_mem: str = "256MB",
    allow_empty: bool = False,
    replace_newer: bool = False,
) -> PublishResult:
    """Load `feed` into a new version table and make it what `feedpipe.current_feed` serves.

    `retention` versions (the current one included) keep their tables, the rest are dropped: the current one, then
    the most recently served before it, then unserved backfills (see `_apply_retention`). `lock_timeout_ms`
    bounds how long the switch (and each drop) may queue behind readers, during which new readers queue behind it;
    the switch is retried `switch_attempts` times. A concurrent publish waits up to `publish_lock_wait_s` for this
    one. An empty feed is refused unless `allow_empty`: served, it would blank every customer's feed.

    A feed for an older date than the one served (a backfill beside the nightly) is loaded and kept but not
    served, unless `replace_newer`: otherwise whichever of two partitions' publishes finished last would be
    what readers see. A feed for the same date (a rerun) replaces it.
    """
    if retention < 1:
        raise ValueError(f"retention must be >= 1 (the current version), got {retention}")
    if not len(feed) and not allow_empty:
        raise PublishError("refusing to publish an empty feed (pass allow_empty=True to serve one)")
    feed_date = dt.date.fromisoformat(feed_date) if isinstance(feed_date, str) else feed_date
    started = time.perf_counter()
    rows = len(feed)
    # Counting distinct customers hashes every id (0.35-0.6 s for 10M rows); it runs beside the COPY, where this
    # process mostly waits on the server, and the count is recorded at the switch.
    with ThreadPoolExecutor(1, thread_name_prefix="feedpipe-count") as pool, connect(url, autocommit=True) as conn:
        customers_counted = pool.submit(feed.customers)
        guard_publish_session(conn)
        init_schema(conn)
        _acquire_publish_lock(conn, url, publish_lock_wait_s)
        _clean_orphans(conn, lock_timeout_ms)
        version = conn.execute(
            sql.SQL(
                "INSERT INTO {} (version, table_name, feed_date, model_version, rows, run_id, status) "
                "SELECT v, %s || v, %s, %s, %s, %s, 'loading' FROM nextval(%s::regclass) AS v RETURNING version"
            ).format(qualified(VERSIONS_TABLE)),
            [TABLE_PREFIX, feed_date, model_version, rows, run_id, f"{SCHEMA}.{VERSION_SEQUENCE}"],
        ).fetchone()[0]
        table = f"{TABLE_PREFIX}{version}"
        try:
            copy_seconds, index_seconds, rows_loaded = _load(conn, table, feed, chunk_rows, maintenance_work_mem)
            if rows_loaded != rows:  # the server's own count of what it stored, before readers can see any of it
                raise PublishError(f"the server stored {rows_loaded:,} of the {rows:,} feed rows sent to {table}; "
                                   "not served, the current feed stays")
            customers = customers_counted.result()
            _pause_point("switch")
            served, served_date = _switch(conn, version, table, customers, feed_date, model_version, lock_timeout_ms,
                                          switch_attempts, replace_newer)
        except BaseException:
            _mark_failed(conn, version, table, lock_timeout_ms)
            raise
        dropped = _apply_retention(conn, version, retention, lock_timeout_ms)
    result = PublishResult(
        version=version, table_name=f"{SCHEMA}.{table}", rows=rows, customers=customers,
        seconds=time.perf_counter() - started, copy_seconds=copy_seconds, index_seconds=index_seconds,
        dropped_tables=tuple(dropped), rows_loaded=rows_loaded, served=served, served_feed_date=served_date,
    )
    logger.info(
        "%s %s: %d rows, %d customers in %.1f s (copy %.1f s, index+analyze %.1f s) on %s",
        "published" if served else f"loaded (not served: {served_date} is newer)", result.table_name, rows, customers,
        result.seconds, copy_seconds, index_seconds, redact_url(url),
    )
    return result


# A publisher that freezes inside a transaction, or whose host or network dies, would keep the publish lock (and,
# during a switch, the views' locks, queueing every reader) until TCP gives up: hours by the OS's defaults. The
# server ends such a session instead: idle in a transaction for this long (a publish never is: it is always
# sending or waiting on the server), or unanswered keepalives for ~2 minutes (TCP connections only).
PUBLISH_IDLE_IN_TRANSACTION_S = 300
# Inside the switch the views are locked and every reader queues behind them: a publisher frozen there (SIGSTOP, a
# swapped-out host) is ended after this long, not PUBLISH_IDLE_IN_TRANSACTION_S; its few statements take
# milliseconds. The switch's own transaction only (set_config(..., true)).
SWITCH_IDLE_IN_TRANSACTION_S = 5


def guard_publish_session(conn: psycopg.Connection, idle_in_transaction_s: float = PUBLISH_IDLE_IN_TRANSACTION_S) -> None:
    """Have the server end this session if its client stops answering (see PUBLISH_IDLE_IN_TRANSACTION_S)."""
    conn.execute(
        "SELECT set_config('idle_in_transaction_session_timeout', %s, false), "
        "set_config('tcp_keepalives_idle', '60', false), set_config('tcp_keepalives_interval', '10', false), "
        "set_config('tcp_keepalives_count', '6', false)",
        [f"{int(idle_in_transaction_s * 1000)}ms"],
    )


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
            qualified(VERSIONS_TABLE)
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
        ).format(qualified(VERSIONS_TABLE)),
        [SCHEMA, f"^{TABLE_PREFIX}[0-9]+$"],
    ).fetchall()
    for (table,) in strays:
        if _drop_table(conn, table, lock_timeout_ms):
            logger.warning("dropped orphaned feed table %s.%s", SCHEMA, table)


def _load(
    conn: psycopg.Connection, table: str, feed: FeedArrays, chunk_rows: int, maintenance_work_mem: str
) -> tuple[float, float, int]:
    """Create, fill, index and analyze the version table in one transaction; returns (copy, index) seconds and
    the rows the server's COPY stored.

    Creating the table in the COPY's transaction allows FREEZE: rows are written frozen and their pages all-visible
    (PostgreSQL >= 14), so index-only scans skip the heap from the first query without waiting for a VACUUM, and
    with wal_level=minimal the load skips WAL.
    """
    copy_sql = sql.SQL("COPY {} ({}) FROM STDIN (FORMAT BINARY, FREEZE)").format(qualified(table), column_list())
    with conn.transaction(), conn.cursor() as cur:
        cur.execute("SELECT set_config('maintenance_work_mem', %s, true)", [maintenance_work_mem])
        t0 = time.perf_counter()
        cur.execute(create_table_sql(table))
        with cur.copy(copy_sql) as copy:
            # Encoding chunk n+1 in a thread while chunk n is sent was measured no faster (10M rows, PostgreSQL 15,
            # 2 cores): the server's COPY parsing is the bottleneck, and the encoder took a core from it.
            for i, block in enumerate(copy_stream(feed, chunk_rows)):
                copy.write(block)
                if i == 1:  # the signature and a first chunk of rows are with the server
                    _pause_point("copy")
        loaded = cur.rowcount  # from the server's "COPY n"
        t1 = time.perf_counter()
        cur.execute(create_index_sql(table))
        cur.execute(sql.SQL("ANALYZE {}").format(qualified(table)))
        t2 = time.perf_counter()
    return t1 - t0, t2 - t1, loaded


# A reader holding one view in a transaction, and then reading the other, meets the switch's locks either way;
# when its order and the switch's cross, the server ends one side of the deadlock, and it is the switch, which waited
# first (deadlock_timeout, 1 s by default, counts from the start of a wait). Both are worth another try.
_SWITCH_RETRYABLE = (psycopg.errors.LockNotAvailable, psycopg.errors.DeadlockDetected)


def _switch(
    conn: psycopg.Connection, version: int, table: str, customers: int, feed_date: dt.date, model_version: str,
    lock_timeout_ms: int, attempts: int, replace_newer: bool = False,
) -> tuple[bool, dt.date]:
    """Point the view at `table` and record it current, in one transaction short enough to be atomic for readers.

    Returns (served, the feed date served after it): a feed older than the served one is recorded 'retired'
    (kept, not served) unless `replace_newer`. Retried `attempts` times when readers hold the views past
    `lock_timeout_ms` or the switch loses a deadlock against one.
    """
    for attempt in range(1, attempts + 1):
        try:
            with conn.transaction(), conn.cursor() as cur:
                return _switch_once(cur, version, table, customers, feed_date, model_version, lock_timeout_ms,
                                    replace_newer)
        except _SWITCH_RETRYABLE as exc:
            holders = _view_lock_holders(conn)
            why = "lost a deadlock against a reader" if isinstance(exc, psycopg.errors.DeadlockDetected) else \
                f"readers held the views past {lock_timeout_ms} ms"
            logger.warning("switch to %s attempt %d/%d: %s (pid, running for): %s",
                           table, attempt, attempts, why, holders)
            if attempt == attempts:
                raise PublishError(
                    f"could not switch {SCHEMA}.{VIEW} to {table} in {attempts} attempts of {lock_timeout_ms} ms: "
                    f"long-running readers hold the view (pid, running for): {holders}"
                ) from None
            time.sleep(min(0.2 * 2**attempt, 5.0))
    raise AssertionError("unreachable: the last attempt returns or raises")


def _switch_once(
    cur: psycopg.Cursor, version: int, table: str, customers: int, feed_date: dt.date, model_version: str,
    lock_timeout_ms: int, replace_newer: bool,
) -> tuple[bool, dt.date]:
    cur.execute("SELECT set_config('lock_timeout', %s, true), set_config('idle_in_transaction_session_timeout', %s, true)",
                [f"{int(lock_timeout_ms)}ms", f"{int(SWITCH_IDLE_IN_TRANSACTION_S * 1000)}ms"])
    cur.execute("SELECT pg_advisory_xact_lock(%s)", [SCHEMA_LOCK_KEY])
    cur.execute(sql.SQL("SELECT feed_date FROM {} WHERE status = 'current'").format(qualified(VERSIONS_TABLE)))
    current = cur.fetchone()
    if current is not None and current[0] > feed_date and not replace_newer:
        cur.execute(
            sql.SQL("UPDATE {} SET status = 'retired', customers = %s WHERE version = %s").format(
                qualified(VERSIONS_TABLE)),
            [customers, version],
        )
        return False, current[0]
    # Both views, before anything a reader could wait on: from here to the commit new readers queue, and a reader
    # that read either view in its transaction keeps the switch waiting, so its later reads still see the version
    # it read. The version view first, the order docs/sql-interface.md asks of several-statement readers (and
    # `feedpipe feed` keeps): while such a reader holds it, the switch waits without holding current_feed, so the
    # website's one-statement feed reads go on (current_feed first had them queue for the whole wait). While a
    # reader holds current_feed instead, new readers of both views queue behind the waiting switch either way
    # (PostgreSQL queues them behind a waiting exclusive request; locking a view also locks feed_versions under it).
    # A reader that reads current_feed and then the version view can deadlock the switch: the server breaks it
    # and the switch retries.
    cur.execute(sql.SQL("LOCK TABLE {}, {} IN ACCESS EXCLUSIVE MODE").format(qualified(VERSION_VIEW), qualified(VIEW)))
    cur.execute(sql.SQL("UPDATE {} SET status = 'retired' WHERE status = 'current'").format(qualified(VERSIONS_TABLE)))
    cur.execute(
        sql.SQL("UPDATE {} SET status = 'current', published_at = now(), customers = %s WHERE version = %s").format(
            qualified(VERSIONS_TABLE)),
        [customers, version],
    )
    # CREATE OR REPLACE keeps the views' grants (init_schema granted them at this publish's start).
    cur.execute(version_view_sql())
    cur.execute(view_sql(table, {"feed_date": feed_date, "model_version": model_version}))
    _pause_point("inside_switch")
    return True, feed_date


def _view_lock_holders(conn: psycopg.Connection) -> list[tuple]:
    """(pid, running for) of the other sessions holding a lock on either view."""
    return conn.execute(
        "SELECT pid, now() - query_start FROM pg_stat_activity WHERE pid IN ("
        "  SELECT pid FROM pg_locks WHERE relation IN (to_regclass(%s), to_regclass(%s)) AND granted) "
        "AND pid <> pg_backend_pid()",
        [f"{SCHEMA}.{VIEW}", f"{SCHEMA}.{VERSION_VIEW}"],
    ).fetchall()


def _mark_failed(conn: psycopg.Connection, version: int, table: str, lock_timeout_ms: int) -> None:
    """Best effort: if the connection is gone, the row stays 'loading' and the next publish cleans it up."""
    try:
        if conn.closed or conn.info.transaction_status != psycopg.pq.TransactionStatus.IDLE:
            return
        _drop_table(conn, table, lock_timeout_ms)
        conn.execute(
            sql.SQL("UPDATE {} SET status = 'failed' WHERE version = %s AND status = 'loading'").format(
                qualified(VERSIONS_TABLE)
            ),
            [version],
        )
    except psycopg.Error as exc:
        logger.warning("could not mark version %d failed (the next publish will): %s", version, exc)


def _apply_retention(conn: psycopg.Connection, published: int, retention: int, lock_timeout_ms: int) -> list[str]:
    """Drop the tables beyond the `retention` versions kept; returns the tables dropped.

    Kept, in this order, until `retention` tables are: the current version; the versions served before it, most
    recently served first (the rollback targets); then backfills that were loaded but never served, newest feed
    date first. So a backfill never pushes out a rollback target. The version `published` now is kept whatever
    its rank: a backfill loaded and not served stays a view switch away at least until the next publish.
    Versions whose tables are gone already take no place.
    """
    try:
        doomed = conn.execute(
            sql.SQL(
                "WITH kept AS (SELECT version, status, published_at, feed_date FROM {} "
                "              WHERE status IN ('current', 'retired') "
                "              AND to_regclass(%(schema)s || '.' || table_name) IS NOT NULL) "
                "SELECT table_name FROM {} WHERE status = 'retired' AND version <> %(published)s "
                "AND to_regclass(%(schema)s || '.' || table_name) IS NOT NULL "
                "AND version NOT IN (SELECT version FROM kept ORDER BY status = 'current' DESC, "
                "                    published_at IS NOT NULL DESC, published_at DESC, feed_date DESC NULLS LAST, "
                "                    version DESC LIMIT %(retention)s) "
                "ORDER BY version"
            ).format(qualified(VERSIONS_TABLE), qualified(VERSIONS_TABLE)),
            {"schema": SCHEMA, "published": published, "retention": retention},
        ).fetchall()
        return [f"{SCHEMA}.{t}" for (t,) in doomed if _drop_table(conn, t, lock_timeout_ms)]
    except psycopg.Error as exc:  # the new version is already served; a failed cleanup must not fail the publish
        logger.warning("retention cleanup failed, the next publish will retry: %s", exc)
        return []


def _pause_point(name: str) -> None:
    """Stop here for good when `FEEDPIPE_TEST_PAUSE_AT` names this point, so a test can SIGKILL the publisher."""
    if os.environ.get(PAUSE_AT_ENV) == name:
        print(f"{PAUSE_AT_ENV}: paused at {name}", file=sys.stderr, flush=True)
        time.sleep(600)  # the test kills us long before; bounded in case it does not
        raise PublishError(f"{PAUSE_AT_ENV}={name}: paused publisher was not killed")


def _drop_table(conn: psycopg.Connection, table: str, lock_timeout_ms: int) -> bool:
    """Drop a feed table unless readers hold it past the lock timeout (then the next publish retries)."""
    try:
        with conn.transaction():
            conn.execute("SELECT set_config('lock_timeout', %s, true)", [f"{int(lock_timeout_ms)}ms"])
            # No CASCADE: the table the view reads cannot be dropped by mistake.
            conn.execute(sql.SQL("DROP TABLE IF EXISTS {}").format(qualified(table)))
        return True
    except (psycopg.errors.LockNotAvailable, psycopg.errors.DependentObjectsStillExist) as exc:
        logger.warning("left %s.%s in place: %s", SCHEMA, table, str(exc).strip())
        return False
