"""What operators and the CLI ask of a published feed: its versions, the served one, one customer's rows.

Downstream readers use SQL against the views instead (docs/sql-interface.md); `read_feed` is their main query.
"""

from __future__ import annotations

from typing import Any

import psycopg
from psycopg import sql
from psycopg.rows import dict_row

from feedpipe.feed_schema import SCHEMA, VERSION_VIEW, VERSIONS_TABLE, VIEW, qualified


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
            ).format(qualified(VERSIONS_TABLE)),
            [SCHEMA],
        )
        return cur.fetchall()


def current_version(conn: psycopg.Connection) -> dict | None:
    """The `feed_versions` row the view serves (run id and table included), or None before the first publish.

    Reads the private bookkeeping table: for operators. A reader's code, the CLI's included, calls `served_version`.
    """
    if not _schema_ready(conn):
        return None
    with conn.cursor(row_factory=dict_row) as cur:
        cur.execute(sql.SQL("SELECT * FROM {} WHERE status = 'current'").format(qualified(VERSIONS_TABLE)))
        return cur.fetchone()


def served_version(conn: psycopg.Connection) -> dict | None:
    """The served version as readers see it (the columns of `current_feed_version`), or None before the first publish.

    Reads the public view, so a login given only the reader role may call it. In a transaction, reading the view
    keeps the switch waiting until the transaction ends, so the transaction's later reads of `current_feed`
    serve this same version: read it first.
    """
    if conn.execute("SELECT to_regclass(%s)", [f"{SCHEMA}.{VERSION_VIEW}"]).fetchone()[0] is None:
        return None
    with conn.cursor(row_factory=dict_row) as cur:
        cur.execute(sql.SQL("SELECT * FROM {}").format(qualified(VERSION_VIEW)))
        return cur.fetchone()


def version_rows(conn: psycopg.Connection, version: int) -> int:
    """Rows in a published version's table, counted in the database."""
    return version_counts(conn, version)[0]


def version_counts(conn: psycopg.Connection, version: int) -> tuple[int, int]:
    """(rows, distinct customers) in a published version's table, counted in the database."""
    found = conn.execute(sql.SQL("SELECT table_name FROM {} WHERE version = %s").format(qualified(VERSIONS_TABLE)),
                         [version]).fetchone()
    if found is None:
        raise LookupError(f"no feed version {version}")
    rows, customers = conn.execute(
        sql.SQL("SELECT count(*), count(DISTINCT customer_id) FROM {}").format(qualified(found[0]))
    ).fetchone()
    return int(rows), int(customers)


def read_feed(conn: psycopg.Connection, customer_id: str, limit: int | None = None) -> list[tuple[str, int, float]]:
    """One customer's served feed as (product_id, rank, score), best first: the query the index is built for."""
    query = sql.SQL("SELECT product_id, rank, score FROM {} WHERE customer_id = %s ORDER BY rank").format(
        qualified(VIEW)
    )
    params: list[Any] = [customer_id]
    if limit is not None:
        query += sql.SQL(" LIMIT %s")
        params.append(int(limit))
    return conn.execute(query, params).fetchall()
