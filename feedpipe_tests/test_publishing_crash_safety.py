"""A publisher SIGKILLed mid-COPY or just before the switch: readers keep the previous version, byte for byte."""

from __future__ import annotations

import datetime as dt
import os
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest
from psycopg import sql

from feedpipe.database import connect
from feedpipe.feed_queries import current_version, list_versions
from feedpipe.feed_schema import VERSION_VIEW, VIEW, qualified
from feedpipe.publishing import PAUSE_AT_ENV, publish_feed
from feedpipe_tests.test_publishing import grid_feed

DAY = dt.date(2024, 3, 1)
REPO_ROOT = Path(__file__).resolve().parents[1]
# 3,000 customers x 20 = 60,000 rows (~2.4 MB) in 2 chunks: the pause after the first is mid-COPY. The chunk is
# over psycopg's 1 MiB flush threshold: a smaller one could wait in libpq's buffer and never reach the server.
PUBLISHER = """
import datetime as dt, sys
from feedpipe.publishing import publish_feed
from feedpipe_tests.test_publishing import grid_feed
publish_feed(sys.argv[1], grid_feed(3000, 20, tag="-killed", seed=9), feed_date=dt.date(2024, 3, 2),
             model_version="m-killed", chunk_rows=40_000)
"""


def served_bytes(url: str) -> bytes:
    """The whole served feed and its version row, as binary COPY output: equal bytes mean an equal feed."""
    out = bytearray()
    with connect(url) as conn, conn.cursor() as cur:
        for view, order in ((VIEW, "customer_id, rank, product_id"), (VERSION_VIEW, "version")):
            query = sql.SQL("COPY (SELECT * FROM {} ORDER BY {}) TO STDOUT (FORMAT binary)").format(
                qualified(view), sql.SQL(order)
            )
            with cur.copy(query) as copy:
                for block in copy:
                    out += block
    return bytes(out)


def start_paused_publisher(url: str, pause_at: str) -> tuple[subprocess.Popen, list[str]]:
    """A publisher in a child process, returned once it reports that it stopped at `pause_at`."""
    env = {**os.environ, PAUSE_AT_ENV: pause_at}
    child = subprocess.Popen(
        [sys.executable, "-c", PUBLISHER, url], cwd=REPO_ROOT, env=env,
        stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True,
    )
    lines: list[str] = []
    paused = threading.Event()

    def read_stderr():
        for line in child.stderr:
            lines.append(line)
            if f"paused at {pause_at}" in line:
                paused.set()

    threading.Thread(target=read_stderr, daemon=True).start()
    if not paused.wait(timeout=30):
        child.kill()
        pytest.fail(f"publisher never paused at {pause_at!r} (exit {child.wait()}): {''.join(lines)}")
    return child, lines


def wait_for(predicate, what: str, timeout_s: float = 10.0):
    deadline = time.monotonic() + timeout_s
    while not (value := predicate()):
        if time.monotonic() > deadline:
            pytest.fail(f"timed out waiting for {what}")
        time.sleep(0.05)
    return value


@pytest.mark.parametrize("pause_at", ["copy", "switch"])
def test_publisher_killed_mid_publish_leaves_served_feed_byte_identical_and_next_publish_cleans_up(
    pg_url, pause_at
):
    served = publish_feed(pg_url, grid_feed(300, 10, tag="-v0"), feed_date=DAY, model_version="m0")
    before = served_bytes(pg_url)

    child, _ = start_paused_publisher(pg_url, pause_at)
    try:
        with connect(pg_url, autocommit=True) as conn:
            killed = wait_for(
                lambda: [v for v in list_versions(conn) if v["status"] == "loading"], "a loading row"
            )[0]
            if pause_at == "copy":
                # The server has taken rows of the COPY (uncommitted: the table is invisible to other sessions).
                wait_for(
                    lambda: conn.execute(
                        "SELECT 1 FROM pg_stat_progress_copy "
                        "WHERE datname = current_database() AND tuples_processed > 0"
                    ).fetchone(),
                    "the COPY to be in progress",
                )
                assert not killed["table_exists"]
            else:
                assert killed["table_exists"]  # loaded, indexed and committed; only the switch is missing
        os.kill(child.pid, signal.SIGKILL)
        assert child.wait(timeout=10) == -signal.SIGKILL
    finally:
        if child.poll() is None:  # a failed assertion above must not leave a paused publisher behind
            child.kill()
            child.wait()

    assert served_bytes(pg_url) == before
    with connect(pg_url) as conn:
        assert current_version(conn)["version"] == served.version

    after = publish_feed(pg_url, grid_feed(300, 10, tag="-v1"), feed_date=DAY, model_version="m1")
    with connect(pg_url) as conn:
        states = {v["version"]: (v["status"], v["table_exists"]) for v in list_versions(conn)}
        tables = conn.execute(
            "SELECT tablename FROM pg_tables WHERE schemaname = 'feedpipe' AND tablename ~ '^feed_v[0-9]+$' "
            "ORDER BY tablename"
        ).fetchall()
    assert states == {
        served.version: ("retired", True),
        killed["version"]: ("failed", False),
        after.version: ("current", True),
    }
    assert sorted(t for t, in tables) == sorted([f"feed_v{served.version}", f"feed_v{after.version}"])


def test_a_publisher_frozen_inside_the_switch_holds_readers_seconds_not_minutes(pg_url):
    """The switch's transaction ends itself after SWITCH_IDLE_IN_TRANSACTION_S idle: readers wait that long."""
    from feedpipe.publishing import SWITCH_IDLE_IN_TRANSACTION_S

    publish_feed(pg_url, grid_feed(300, 10, tag="-v0"), feed_date=DAY, model_version="m0")
    before = served_bytes(pg_url)
    child, _ = start_paused_publisher(pg_url, "inside_switch")
    try:
        with connect(pg_url, autocommit=True) as conn:
            conn.execute("SET statement_timeout = '60s'")
            t0 = time.monotonic()
            rows = conn.execute(sql.SQL("SELECT count(*) FROM {}").format(qualified(VIEW))).fetchone()[0]
            waited = time.monotonic() - t0
        assert rows == 3000 and waited < SWITCH_IDLE_IN_TRANSACTION_S + 10, waited  # the old version, soon
        assert served_bytes(pg_url) == before
    finally:
        child.kill()
        child.wait(timeout=10)
