"""What publishing does after the schema was damaged by hand, and around readers and backfills it once tripped on."""

from __future__ import annotations

import datetime as dt
import threading
import time

import pytest

from feedpipe.database import connect
from feedpipe.feed_queries import current_version, list_versions, version_rows
from feedpipe.feed_schema import init_schema
from feedpipe.publishing import publish_feed
from feedpipe_tests.test_publishing import grid_feed

DAY = dt.date(2024, 3, 1)


def _as_reader(conn, query: str) -> list[tuple]:
    with conn.transaction():
        conn.execute("SET LOCAL ROLE feedpipe_reader")
        return conn.execute(query).fetchall()


def test_a_publish_after_the_served_table_was_dropped_with_cascade_recreates_the_view(pg_url):
    first = publish_feed(pg_url, grid_feed(3, 2, tag="-v0"), feed_date=DAY, model_version="m0")
    with connect(pg_url, autocommit=True) as conn:
        conn.execute(f"DROP TABLE {first.table_name} CASCADE")  # takes feedpipe.current_feed with it
    second = publish_feed(pg_url, grid_feed(4, 2, tag="-v1"), feed_date=DAY + dt.timedelta(days=1),
                          model_version="m1")
    with connect(pg_url) as conn:
        feed = _as_reader(conn, "SELECT DISTINCT model_version, count(*) OVER () FROM feedpipe.current_feed")
        served = _as_reader(conn, "SELECT version FROM feedpipe.current_feed_version")
    assert second.served and feed == [("m1", 8)] and served == [(second.version,)]


def test_init_schema_recreates_a_dropped_feed_view_over_the_served_table(pg_url):
    publish_feed(pg_url, grid_feed(3, 2, tag="-v0"), feed_date=DAY, model_version="m0")
    with connect(pg_url, autocommit=True) as conn:
        conn.execute("DROP VIEW feedpipe.current_feed")
        assert init_schema(conn) == []  # nothing to migrate, but the view is back
        feed = _as_reader(conn, "SELECT DISTINCT model_version, feed_date, count(*) OVER () FROM feedpipe.current_feed")
    assert feed == [("m0", DAY, 6)]  # the served version's rows, not the empty placeholder


def test_db_init_recreates_a_dropped_version_view_and_says_so(pg_url, monkeypatch, capsys):
    from feedpipe.cli import main

    result = publish_feed(pg_url, grid_feed(3, 2), feed_date=DAY, model_version="m0")
    with connect(pg_url, autocommit=True) as conn:
        conn.execute("DROP VIEW feedpipe.current_feed_version")
    monkeypatch.setenv("FEEDPIPE_DATABASE_URL", pg_url)
    assert main(["db", "init"]) == 0
    assert "recreated feedpipe.current_feed_version" in capsys.readouterr().out
    with connect(pg_url) as conn:
        served = _as_reader(conn, "SELECT version, model_version, rows FROM feedpipe.current_feed_version")
        assert current_version(conn)["version"] == result.version
    assert served == [(result.version, "m0", 6)]
    assert main(["db", "init"]) == 0
    assert "nothing to apply" in capsys.readouterr().out  # repaired once, for good


def _wait_until_blocked(conn, application_name: str = "feedpipe", timeout_s: float = 10.0) -> None:
    """Until a session of `application_name` waits on a heavyweight lock (the switch queued behind a reader)."""
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if conn.execute("SELECT count(*) FROM pg_stat_activity WHERE application_name = %s "
                        "AND wait_event_type = 'Lock'", [application_name]).fetchone()[0]:
            return
        time.sleep(0.02)
    raise AssertionError("the publish never queued behind the reader")


@pytest.mark.parametrize("first, second", [
    ("current_feed", "current_feed_version"),
    ("current_feed_version", "current_feed"),
])
def test_a_reader_reading_both_views_in_one_transaction_neither_deadlocks_nor_fails_the_switch(pg_url, first, second):
    """docs/sql-interface.md's "several statements, one version", while a publish reaches the switch between them."""
    publish_feed(pg_url, grid_feed(3, 2, tag="-v0"), feed_date=DAY, model_version="m0")
    outcome: dict = {}

    def publish():
        try:
            outcome["result"] = publish_feed(pg_url, grid_feed(3, 2, tag="-v1"), feed_date=DAY + dt.timedelta(days=1),
                                             model_version="m1", lock_timeout_ms=3000, switch_attempts=3)
        except Exception as exc:  # reported below, in the test's thread
            outcome["error"] = exc

    with connect(pg_url, application_name="reader") as reader, connect(pg_url, autocommit=True) as watcher:
        reader.execute(f"SELECT DISTINCT model_version FROM feedpipe.{first}").fetchall()
        publisher = threading.Thread(target=publish)
        publisher.start()
        _wait_until_blocked(watcher)
        seen = reader.execute(f"SELECT DISTINCT model_version FROM feedpipe.{second}").fetchall()
        reader.commit()
        publisher.join(30)
    assert "error" not in outcome, outcome.get("error")
    assert seen == [("m0",)] and outcome["result"].served
    with connect(pg_url) as conn:
        assert conn.execute("SELECT DISTINCT model_version FROM feedpipe.current_feed").fetchall() == [("m1",)]


def _tables(pg_url) -> dict[int, bool]:
    with connect(pg_url) as conn:
        return {v["version"]: v["table_exists"] for v in list_versions(conn)}


def test_backfills_of_older_dates_do_not_evict_the_rollback_version_of_the_served_day(pg_url):
    served = [publish_feed(pg_url, grid_feed(3, 2), feed_date=DAY + dt.timedelta(days=9 + i), model_version=f"m{i}",
                           retention=2) for i in range(2)]
    backfills = [publish_feed(pg_url, grid_feed(3, 2), feed_date=DAY + dt.timedelta(days=i), model_version=f"b{i}",
                              retention=2) for i in range(2)]
    assert not any(b.served for b in backfills)
    tables = _tables(pg_url)
    # The current version and the one served before it (the rollback target) stay; of the backfills, only the
    # one just loaded is kept, and the earlier backfill makes way for it, not for the rollback target.
    assert tables[served[1].version] and tables[served[0].version]
    assert tables[backfills[1].version] and not tables[backfills[0].version]
    assert backfills[1].dropped_tables == (backfills[0].table_name,)


def test_with_retention_1_a_backfill_that_is_not_served_keeps_its_own_table(pg_url):
    nightly = publish_feed(pg_url, grid_feed(3, 2), feed_date=DAY + dt.timedelta(days=9), model_version="m9",
                           retention=1)
    backfill = publish_feed(pg_url, grid_feed(3, 2, tag="-old"), feed_date=DAY, model_version="m0", retention=1)
    assert not backfill.served and backfill.dropped_tables == ()
    assert _tables(pg_url) == {nightly.version: True, backfill.version: True}
    with connect(pg_url) as conn:  # loaded and kept: a view switch away, as the docstring promises
        assert version_rows(conn, backfill.version) == 6


def test_a_switch_queued_behind_a_version_view_reader_does_not_stop_plain_feed_reads(pg_url):
    """The CLI's pattern (the version view first, in a transaction) holds up the switch; meanwhile a website's
    one-statement read of current_feed must not queue behind the switch for the whole wait."""
    publish_feed(pg_url, grid_feed(3, 2, tag="-v0"), feed_date=DAY, model_version="m0")
    outcome: dict = {}

    def publish():
        outcome["result"] = publish_feed(pg_url, grid_feed(3, 2, tag="-v1"), feed_date=DAY + dt.timedelta(days=1),
                                         model_version="m1", lock_timeout_ms=3000, switch_attempts=3)

    with (connect(pg_url, application_name="reader") as reader, connect(pg_url, autocommit=True) as watcher,
          connect(pg_url, autocommit=True, application_name="website") as website):
        reader.execute("SELECT version FROM feedpipe.current_feed_version").fetchall()
        publisher = threading.Thread(target=publish)
        publisher.start()
        _wait_until_blocked(watcher)
        t0 = time.monotonic()
        rows = website.execute("SELECT DISTINCT model_version FROM feedpipe.current_feed").fetchall()
        waited = time.monotonic() - t0
        reader.commit()
        publisher.join(30)
    assert rows == [("m0",)] and waited < 1.0, waited
    assert outcome["result"].served
