"""The feed's place in Postgres, defined once: names, columns, the SQL built from them, and the migrations.

Everything lives in the schema `feedpipe`:

- `feed_v<N>`: one table per published version (see `publishing.py`), indexed for the reader query;
- `current_feed`: the view readers query, pointed at the served version's table;
- `current_feed_version`: the view of which version is served (a `feed_versions` row, minus operator columns);
- `feed_versions`, `feed_version_seq`, `schema_migrations`: bookkeeping, invisible to readers;
- the role `feedpipe_reader` (NOLOGIN): USAGE on the schema and SELECT on the two views, nothing else.

`init_schema()` applies the migrations and recreates a view dropped by hand; `feedpipe db init` and every publish
call it.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import Any

import numpy as np
import psycopg
from psycopg import sql

logger = logging.getLogger(__name__)

SCHEMA = "feedpipe"
VIEW = "current_feed"
VERSION_VIEW = "current_feed_version"
VERSIONS_TABLE = "feed_versions"
VERSION_SEQUENCE = "feed_version_seq"
MIGRATIONS_TABLE = "schema_migrations"
READER_ROLE = "feedpipe_reader"
TABLE_PREFIX = "feed_v"
STATUSES = ("loading", "current", "retired", "failed")
# Transaction-level advisory lock for schema changes, also taken by the switch, which rewrites the view that
# init_schema grants on. Advisory locks are per database.
SCHEMA_LOCK_KEY = 0x6665_6565


@dataclass(frozen=True)
class FeedColumn:
    """One column of the reader contract: its SQL type and, where it is stored, its numpy dtype (None: text)."""

    name: str
    sql_type: str
    numpy_dtype: np.dtype | None = None


# The feed schema: the table DDL, the COPY column list and binary layout, the view and its empty placeholder are
# all derived from these two tuples.
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
# What readers may learn about the served version: not the run id or the internal table name.
VERSION_VIEW_COLUMNS = ("version", "feed_date", "model_version", "rows", "customers", "published_at")


# --- SQL built from the schema ----------------------------------------------------------------------------------
def qualified(name: str) -> sql.Composed:
    """`feedpipe.<name>`, quoted."""
    return sql.Identifier(SCHEMA, name)


def column_list(columns: tuple[FeedColumn, ...] = TABLE_COLUMNS) -> sql.Composed:
    return sql.SQL(", ").join(sql.Identifier(c.name) for c in columns)


def create_table_sql(table: str) -> sql.Composed:
    """A bare version table: no constraint or index, so COPY only appends heap pages."""
    definitions = sql.SQL(", ").join(
        sql.SQL("{} {} NOT NULL").format(sql.Identifier(c.name), sql.SQL(c.sql_type)) for c in TABLE_COLUMNS
    )
    return sql.SQL("CREATE TABLE {} ({})").format(qualified(table), definitions)


def create_index_sql(table: str) -> sql.Composed:
    return sql.SQL("CREATE INDEX {} ON {} ({}) INCLUDE ({})").format(
        sql.Identifier(f"{table}_customer_rank"),
        qualified(table),
        sql.SQL(", ").join(map(sql.Identifier, INDEX_KEY)),
        sql.SQL(", ").join(map(sql.Identifier, INDEX_INCLUDE)),
    )


def view_sql(table: str | None, constants: dict[str, Any]) -> sql.Composed:
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
    source = sql.SQL("FROM {}").format(qualified(table)) if table is not None else sql.SQL("WHERE false")
    return sql.SQL("CREATE OR REPLACE VIEW {} AS SELECT {} {}").format(
        qualified(VIEW), sql.SQL(", ").join(items), source
    )


def grant_reader_sql() -> sql.Composed:
    """SELECT on both views. CREATE OR REPLACE VIEW keeps grants; init_schema repeats this for a role made since."""
    return sql.SQL("GRANT SELECT ON {}, {} TO {}").format(
        qualified(VIEW), qualified(VERSION_VIEW), sql.Identifier(READER_ROLE)
    )


def reader_role_exists(cur: psycopg.Cursor) -> bool:
    cur.execute("SELECT 1 FROM pg_roles WHERE rolname = %s", [READER_ROLE])
    return cur.fetchone() is not None


# --- migrations ---------------------------------------------------------------------------------------------------
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
        ).format(qualified(VERSIONS_TABLE), statuses)
    )
    # At most one current version, whatever goes wrong in the code that switches.
    cur.execute(
        sql.SQL("CREATE UNIQUE INDEX IF NOT EXISTS {} ON {} ((true)) WHERE status = 'current'").format(
            sql.Identifier(f"{VERSIONS_TABLE}_one_current"), qualified(VERSIONS_TABLE)
        )
    )
    cur.execute(sql.SQL("CREATE SEQUENCE IF NOT EXISTS {}").format(qualified(VERSION_SEQUENCE)))
    cur.execute("SELECT to_regclass(%s)", [f"{SCHEMA}.{VIEW}"])
    if cur.fetchone()[0] is None:
        # Typed and empty, so readers' queries work before the first publish.
        cur.execute(view_sql(None, {}))


def version_view_sql() -> sql.Composed:
    """The view of the served version's row; the switch issues it again after locking both views."""
    return sql.SQL("CREATE OR REPLACE VIEW {} AS SELECT {} FROM {} WHERE status = 'current'").format(
        qualified(VERSION_VIEW), sql.SQL(", ").join(map(sql.Identifier, VERSION_VIEW_COLUMNS)),
        qualified(VERSIONS_TABLE),
    )


def _migration_0002(cur: psycopg.Cursor) -> None:
    # A view runs with its owner's rights, so readers learn the served version without SELECT on feed_versions.
    cur.execute(version_view_sql())


# Append only: an id, once applied somewhere, means the same change forever.
MIGRATIONS = (
    ("0001_feed_versions_and_view", _migration_0001),
    ("0002_current_feed_version_view", _migration_0002),
)


def init_schema(conn: psycopg.Connection) -> list[str]:
    """Create or update the feedpipe schema; returns the ids of the migrations applied now (empty when up to date).

    A view that is missing though its migration is recorded (dropped by hand) is recreated: see
    `_recreate_missing_views`.

    Safe to run repeatedly and concurrently: a transaction-level advisory lock serializes callers per database.
    """
    with conn.transaction(), conn.cursor() as cur:
        cur.execute("SELECT pg_advisory_xact_lock(%s)", [SCHEMA_LOCK_KEY])
        # CREATE SCHEMA IF NOT EXISTS needs CREATE on the database even when the schema exists, which a
        # least-privilege role that owns the schema lacks: look first.
        cur.execute("SELECT 1 FROM pg_namespace WHERE nspname = %s", [SCHEMA])
        if cur.fetchone() is None:
            cur.execute(sql.SQL("CREATE SCHEMA IF NOT EXISTS {}").format(sql.Identifier(SCHEMA)))
        cur.execute(
            sql.SQL(
                "CREATE TABLE IF NOT EXISTS {} (id text PRIMARY KEY, applied_at timestamptz NOT NULL DEFAULT now())"
            ).format(qualified(MIGRATIONS_TABLE))
        )
        cur.execute(sql.SQL("SELECT id FROM {}").format(qualified(MIGRATIONS_TABLE)))
        done = {row[0] for row in cur.fetchall()}
        applied = []
        for migration_id, migrate in MIGRATIONS:
            if migration_id not in done:
                migrate(cur)
                record = sql.SQL("INSERT INTO {} (id) VALUES (%s)").format(qualified(MIGRATIONS_TABLE))
                cur.execute(record, [migration_id])
                applied.append(migration_id)
        _recreate_missing_views(cur)
        _ensure_reader_role(cur)
    if applied:
        logger.info("applied feedpipe migrations %s", applied)
    return applied


def missing_views(cur: psycopg.Cursor) -> list[str]:
    """The readers' views that do not exist (someone dropped them, or a table under them with CASCADE)."""
    cur.execute("SELECT to_regclass(%s), to_regclass(%s)", [f"{SCHEMA}.{VIEW}", f"{SCHEMA}.{VERSION_VIEW}"])
    return [name for name, found in zip((VIEW, VERSION_VIEW), cur.fetchone()) if found is None]


def _recreate_missing_views(cur: psycopg.Cursor) -> None:
    """Recreate a dropped view: the migrations that made it are recorded as applied and will not run again.

    `current_feed` comes back over the current version's table while that table exists, else as the empty
    placeholder (the next publish points it at its table). Under the schema lock, so no switch runs meanwhile.
    """
    for name in missing_views(cur):
        if name == VERSION_VIEW:
            cur.execute(version_view_sql())
        else:
            cur.execute(_current_view_sql(cur))
        logger.warning("recreated the missing view %s.%s", SCHEMA, name)


def _current_view_sql(cur: psycopg.Cursor) -> sql.Composed:
    cur.execute(
        sql.SQL("SELECT table_name, feed_date, model_version FROM {} "
                "WHERE status = 'current' AND to_regclass(%s || '.' || table_name) IS NOT NULL").format(
            qualified(VERSIONS_TABLE)),
        [SCHEMA],
    )
    current = cur.fetchone()
    if current is None:
        return view_sql(None, {})
    table, feed_date, model_version = current
    return view_sql(table, {"feed_date": feed_date, "model_version": model_version})


def _ensure_reader_role(cur: psycopg.Cursor) -> None:
    """`feedpipe_reader` (NOLOGIN) may use the schema and select the views, nothing else. Idempotent."""
    if not reader_role_exists(cur):
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
    cur.execute(grant_reader_sql())  # after _recreate_missing_views: both views exist
