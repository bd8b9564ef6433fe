"""Fixtures shared by every test that needs PostgreSQL.

`pg_server_url` is one server per test session: `FEEDPIPE_TEST_DATABASE_URL` when set (CI, a shared dev server),
else an embedded pgserver in a temporary directory, deleted at the end. `pg_url` is a fresh database on it per test,
dropped afterwards, so tests are isolated even when several runs share a server.
"""

from __future__ import annotations

import os
import shutil
import tempfile
import uuid
from pathlib import Path
from urllib.parse import urlsplit, urlunsplit

import pytest
from psycopg import sql

from feedpipe.database import connect, embedded_server_url, import_pgserver

TEST_DATABASE_URL_ENV = "FEEDPIPE_TEST_DATABASE_URL"


@pytest.fixture(scope="session")
def pg_server_url() -> str:
    url = os.environ.get(TEST_DATABASE_URL_ENV)
    if url:
        yield url
        return
    pgserver = import_pgserver()
    # Not under pytest's basetemp: pytest deletes all but the 3 newest basetemps at start, so with several test
    # sessions running at once on a machine, a running server's data directory could vanish under it.
    parent = Path(tempfile.mkdtemp(prefix="feedpipe_test_pg_"))
    pgdata = parent / "pgdata"
    try:
        yield embedded_server_url(pgdata, cleanup_mode="delete")
        pgserver.get_server(pgdata).cleanup()  # the cached handle: stops the server and deletes pgdata
    finally:
        shutil.rmtree(parent, ignore_errors=True)


def _with_database(url: str, dbname: str) -> str:
    parts = urlsplit(url)
    return urlunsplit((parts.scheme, parts.netloc, f"/{dbname}", parts.query, parts.fragment))


@pytest.fixture
def pg_url(pg_server_url) -> str:
    dbname = f"feedpipe_test_{uuid.uuid4().hex[:12]}"
    with connect(pg_server_url, autocommit=True) as conn:
        conn.execute(sql.SQL("CREATE DATABASE {}").format(sql.Identifier(dbname)))
    try:
        yield _with_database(pg_server_url, dbname)
    finally:
        with connect(pg_server_url, autocommit=True) as conn:
            conn.execute(sql.SQL("DROP DATABASE IF EXISTS {} WITH (FORCE)").format(sql.Identifier(dbname)))
