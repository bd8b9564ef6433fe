from __future__ import annotations

import datetime as dt
import re
import threading
import time
import uuid
from pathlib import Path

import numpy as np
import psycopg
import pyarrow as pa
import pytest
from psycopg import sql
from psycopg.conninfo import make_conninfo

from feedpipe.copy_binary import FeedArrays, encode_copy_rows
from feedpipe.database import connect
from feedpipe.feed_queries import current_version, list_versions, read_feed, version_rows
from feedpipe.feed_schema import FEED_COLUMNS, MIGRATIONS, init_schema
from feedpipe.publishing import PUBLISH_LOCK_KEY, PublishError, PublishLockTimeout, publish_feed

DAY = dt.date(2024, 3, 1)
AWKWARD_IDS = ["", "O'Reilly", 'say "hi"', "tab\there", "back\\slash", "new\nline", "Ünïcødé 🚀 日本", "\\N", "NULL", ","]


def grid_feed(customers: int, per_customer: int, tag: str = "", seed: int = 0) -> FeedArrays:
    """Every customer ranks `per_customer` products; `tag` marks product ids so versions are told apart."""
    rng = np.random.default_rng(seed)
    customer = np.repeat(np.arange(customers), per_customer)
    product = np.tile(np.arange(per_customer), customers)
    return FeedArrays(
        customer_id=pa.array(np.char.add("c", customer.astype(str))),
        product_id=np.char.add(np.char.add("p", product.astype(str)), tag).astype(object),
        rank=(product + 1).astype(np.int32),
        score=rng.random(customers * per_customer, dtype=np.float32),
    )


def test_binary_copy_round_trips_awkward_ids_exact_float32_and_ranks(pg_url):
    n = len(AWKWARD_IDS)
    scores = np.array([0.0, -0.0, 1 / 3, -2.5e-42, 3.4028235e38, -1.1754944e-38, 1e-7, 0.1, 123456.789, -1.0],
                      dtype=np.float32)
    ranks = np.array([1, 2, 0, -5, 2**31 - 1, -(2**31), 7, 8, 9, 10], dtype=np.int32)
    feed = FeedArrays(np.array(AWKWARD_IDS, dtype=object), pa.array(AWKWARD_IDS[::-1]), ranks, scores)
    # chunk_rows=3: several COPY chunks, one of them partial.
    result = publish_feed(pg_url, feed, feed_date=DAY, model_version="m'1", chunk_rows=3)
    assert (result.rows, result.customers) == (n, n)

    with connect(pg_url) as conn:
        # Binary results: float4 comes back as its exact float32 value, not a shortest-decimal rendering of it.
        got = conn.execute("SELECT * FROM feedpipe.current_feed", binary=True).fetchall()
        types = conn.execute(
            "SELECT column_name, data_type FROM information_schema.columns "
            "WHERE table_schema = 'feedpipe' AND table_name = 'current_feed' ORDER BY ordinal_position"
        ).fetchall()
    expected = sorted(zip(AWKWARD_IDS, AWKWARD_IDS[::-1], ranks.tolist(), scores.tolist(), [DAY] * n, ["m'1"] * n))
    assert sorted(got) == expected
    assert [name for name, _ in types] == [c.name for c in FEED_COLUMNS]
    assert [t for _, t in types] == ["text", "text", "integer", "real", "date", "text"]


def test_empty_feed_is_refused_unless_allowed(pg_url):
    empty = FeedArrays(pa.array([], pa.string()), np.array([], dtype=object), np.array([], np.int32),
                       np.array([], np.float32))
    assert encode_copy_rows(empty).size == 0
    with pytest.raises(PublishError, match="empty feed"):
        publish_feed(pg_url, empty, feed_date=DAY, model_version="m0")
    result = publish_feed(pg_url, empty, feed_date=DAY, model_version="m0", allow_empty=True)
    assert (result.rows, result.customers) == (0, 0)
    with connect(pg_url) as conn:
        assert conn.execute("SELECT count(*) FROM feedpipe.current_feed").fetchone() == (0,)
        assert current_version(conn)["version"] == result.version


def test_view_reads_an_empty_typed_placeholder_before_the_first_publish(pg_url):
    with connect(pg_url) as conn:
        assert current_version(conn) is None and list_versions(conn) == []
        init_schema(conn)
        assert read_feed(conn, "c1") == []
        assert current_version(conn) is None


def test_init_schema_twice_is_a_noop_and_safe_concurrently(pg_url):
    errors: list[BaseException] = []

    def migrate():
        try:
            with connect(pg_url) as conn:
                init_schema(conn)
        except BaseException as exc:  # noqa: BLE001 -- reported by the assertion below
            errors.append(exc)

    threads = [threading.Thread(target=migrate) for _ in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert errors == []
    with connect(pg_url) as conn:
        before = conn.execute("SELECT id, applied_at FROM feedpipe.schema_migrations").fetchall()
        assert init_schema(conn) == []
        assert init_schema(conn) == []
        assert conn.execute("SELECT id, applied_at FROM feedpipe.schema_migrations").fetchall() == before
        assert len(before) >= 1


def test_publish_switches_view_retires_old_and_keeps_only_retention_tables(pg_url):
    results = [
        publish_feed(pg_url, grid_feed(5, 3, tag=f"-v{i}"), feed_date=DAY + dt.timedelta(days=i),
                     model_version=f"m{i}", run_id=f"run-{i}", retention=2)
        for i in range(4)
    ]
    with connect(pg_url) as conn:
        versions = {v["version"]: v for v in list_versions(conn)}
        current = current_version(conn)
        served = conn.execute("SELECT DISTINCT model_version, feed_date FROM feedpipe.current_feed").fetchall()
        assert read_feed(conn, "c2", limit=2) == [(p, r, s) for p, r, s in read_feed(conn, "c2")[:2]]
        assert [p for p, _, _ in read_feed(conn, "c2")] == ["p0-v3", "p1-v3", "p2-v3"]
    assert current["version"] == results[-1].version and current["run_id"] == "run-3"
    assert current["published_at"] is not None and (current["rows"], current["customers"]) == (15, 5)
    assert served == [("m3", DAY + dt.timedelta(days=3))]
    assert [versions[r.version]["status"] for r in results] == ["retired", "retired", "retired", "current"]
    assert [versions[r.version]["table_exists"] for r in results] == [False, False, True, True]
    assert results[-1].dropped_tables == (results[1].table_name,)


def test_one_customers_feed_is_an_index_only_scan_without_heap_fetches(pg_url):
    publish_feed(pg_url, grid_feed(200, 20), feed_date=DAY, model_version="m1")
    with connect(pg_url) as conn:
        conn.execute("SET enable_seqscan = off")
        conn.execute("SET enable_bitmapscan = off")
        plan = "\n".join(
            row[0]
            for row in conn.execute(
                "EXPLAIN (ANALYZE, COSTS OFF) SELECT product_id, rank, score FROM feedpipe.current_feed "
                "WHERE customer_id = %s ORDER BY rank",
                ["c17"],
            )
        )
    assert "Index Only Scan" in plan, plan
    assert "Sort" not in plan, plan
    # COPY FREEZE left every page all-visible: no VACUUM needed before the heap can be skipped.
    assert "Heap Fetches: 0" in plan, plan


def test_readers_never_see_an_empty_or_mixed_feed_while_versions_switch(pg_url):
    customers, per_customer = 50, 10
    publish_feed(pg_url, grid_feed(customers, per_customer, tag="-v0"), feed_date=DAY, model_version="m0")
    stop = threading.Event()
    problems: list[str] = []
    seen: list[str] = []
    queries = [0]

    def read_one_customer():
        with connect(pg_url, autocommit=True) as conn:
            while not stop.is_set():
                rows = conn.execute(
                    "SELECT model_version, count(*), bool_and(product_id LIKE '%%-v' || substr(model_version, 2)) "
                    "FROM feedpipe.current_feed WHERE customer_id = %s GROUP BY 1",
                    ["c7"],
                ).fetchall()
                queries[0] += 1
                if len(rows) != 1 or rows[0][1] != per_customer or not rows[0][2]:
                    problems.append(f"customer c7 read {rows}")
                elif not seen or seen[-1] != rows[0][0]:
                    seen.append(rows[0][0])

    def read_whole_view():
        with connect(pg_url, autocommit=True) as conn:
            while not stop.is_set():
                row = conn.execute(
                    "SELECT count(DISTINCT model_version), count(*) FROM feedpipe.current_feed"
                ).fetchone()
                queries[0] += 1
                if row != (1, customers * per_customer):
                    problems.append(f"whole view read {row}")

    readers = [threading.Thread(target=read_one_customer), threading.Thread(target=read_whole_view)]
    for t in readers:
        t.start()
    try:
        for i in range(1, 4):
            time.sleep(0.15)
            # retention=1 drops the previous table right after each switch, while readers are on the view.
            publish_feed(pg_url, grid_feed(customers, per_customer, tag=f"-v{i}", seed=i), feed_date=DAY,
                         model_version=f"m{i}", retention=1)
        time.sleep(0.15)
    finally:
        stop.set()
        for t in readers:
            t.join()
    assert problems == []
    assert queries[0] > 50
    assert seen[-1] == "m3" and seen == sorted(seen) and len(seen) >= 2


def test_crashed_publish_is_failed_and_its_tables_dropped_by_the_next(pg_url):
    with connect(pg_url, autocommit=True) as conn:
        init_schema(conn)
        crashed = conn.execute(
            "INSERT INTO feedpipe.feed_versions (version, table_name, status) "
            "SELECT v, 'feed_v' || v, 'loading' FROM nextval('feedpipe.feed_version_seq') v RETURNING version"
        ).fetchone()[0]
        crashed_table = sql.Identifier("feedpipe", f"feed_v{crashed}")
        conn.execute(sql.SQL("CREATE TABLE {} (customer_id text)").format(crashed_table))
        conn.execute("CREATE TABLE feedpipe.feed_v999999 (customer_id text)")  # a table no version row knows

    result = publish_feed(pg_url, grid_feed(3, 2), feed_date=DAY, model_version="m1")

    with connect(pg_url) as conn:
        statuses = {v["version"]: (v["status"], v["table_exists"]) for v in list_versions(conn)}
        tables = conn.execute(
            "SELECT tablename FROM pg_tables WHERE schemaname = 'feedpipe' AND tablename ~ '^feed_v[0-9]+$'"
        ).fetchall()
    assert statuses == {crashed: ("failed", False), result.version: ("current", True)}
    assert tables == [(f"feed_v{result.version}",)]


def test_switch_blocked_by_a_long_reader_fails_cleanly_and_keeps_serving(pg_url):
    first = publish_feed(pg_url, grid_feed(3, 2, tag="-v0"), feed_date=DAY, model_version="m0")
    with connect(pg_url) as reader:  # an open transaction holding the view, like a long report query
        reader.execute("SELECT count(*) FROM feedpipe.current_feed").fetchone()
        with pytest.raises(PublishError, match="long-running readers"):
            publish_feed(pg_url, grid_feed(3, 2, tag="-v1"), feed_date=DAY, model_version="m1",
                         lock_timeout_ms=100, switch_attempts=2)
        reader.rollback()
    with connect(pg_url) as conn:
        versions = list_versions(conn)
        assert conn.execute("SELECT DISTINCT model_version FROM feedpipe.current_feed").fetchall() == [("m0",)]
    assert [(v["status"], v["table_exists"]) for v in versions] == [("failed", False), ("current", True)]
    assert versions[1]["version"] == first.version


def test_reader_role_selects_the_two_views_and_nothing_else(pg_url):
    result = publish_feed(pg_url, grid_feed(3, 2), feed_date=DAY, model_version="m1")
    table = sql.Identifier(*result.table_name.split("."))
    with connect(pg_url) as conn:
        with conn.transaction():
            conn.execute("SET LOCAL ROLE feedpipe_reader")
            assert conn.execute("SELECT count(*) FROM feedpipe.current_feed").fetchone() == (6,)
            assert conn.execute("SELECT version, rows FROM feedpipe.current_feed_version").fetchone() == (
                result.version, 6,
            )
        denied = [
            sql.SQL("SELECT count(*) FROM {}").format(table),
            sql.SQL("SELECT count(*) FROM feedpipe.feed_versions"),
            sql.SQL("SELECT count(*) FROM feedpipe.schema_migrations"),
            sql.SQL("SELECT nextval('feedpipe.feed_version_seq')"),
            # current_feed is a simple view, so Postgres would route these writes to the version table.
            sql.SQL("INSERT INTO feedpipe.current_feed (customer_id, product_id, rank, score) VALUES ('x', 'y', 1, 0)"),
            sql.SQL("UPDATE feedpipe.current_feed SET score = 0"),
            sql.SQL("DELETE FROM feedpipe.current_feed"),
            sql.SQL("CREATE TABLE feedpipe.mine (x int)"),
            sql.SQL("CREATE OR REPLACE VIEW feedpipe.current_feed_version AS SELECT 1 AS version"),
        ]
        for statement in denied:
            with pytest.raises(psycopg.errors.InsufficientPrivilege), conn.transaction():
                conn.execute("SET LOCAL ROLE feedpipe_reader")
                conn.execute(statement)
        # What the role holds, from the catalogue: exactly SELECT on the two views, USAGE on the schema.
        grants = conn.execute(
            "SELECT table_name, privilege_type FROM information_schema.role_table_grants "
            "WHERE grantee = 'feedpipe_reader' AND table_catalog = current_database() ORDER BY 1, 2"
        ).fetchall()
        schema_privileges = conn.execute(
            "SELECT has_schema_privilege('feedpipe_reader', 'feedpipe', 'USAGE'), "
            "has_schema_privilege('feedpipe_reader', 'feedpipe', 'CREATE')"
        ).fetchone()
    assert grants == [("current_feed", "SELECT"), ("current_feed_version", "SELECT")]
    assert schema_privileges == (True, False)


def test_publish_applies_pending_migrations_and_db_init_cli_reports_none_left(pg_url, monkeypatch, capsys):
    from feedpipe.cli import main

    publish_feed(pg_url, grid_feed(3, 2), feed_date=DAY, model_version="m1")  # on a database never migrated
    with connect(pg_url) as conn:
        applied = [i for i, in conn.execute("SELECT id FROM feedpipe.schema_migrations ORDER BY id")]
    assert applied == [migration_id for migration_id, _ in MIGRATIONS]

    monkeypatch.setenv("FEEDPIPE_DATABASE_URL", pg_url)
    assert main(["db", "init"]) == 0
    assert "nothing to apply" in capsys.readouterr().out


def _documented_sql(path: Path) -> tuple[list[str], list[str]]:
    """The ```sql blocks of a doc: (administrator blocks, reader blocks)."""
    blocks = re.findall(r"```sql\n(.*?)```", path.read_text(), flags=re.DOTALL)
    admin = [b for b in blocks if b.startswith("-- as an administrator")]
    return admin, [b for b in blocks if b not in admin]


def test_sql_interface_doc_queries_run_as_a_login_user_given_the_reader_role(pg_url):
    admin_blocks, reader_blocks = _documented_sql(Path(__file__).resolve().parents[1] / "docs" / "sql-interface.md")
    assert len(admin_blocks) >= 2 and len(reader_blocks) >= 5
    ids = ["1234567", "2345678", "3456789"]
    products = [f"P{i:05d}" for i in range(1, 13)]
    publish_feed(
        pg_url,
        FeedArrays(np.repeat(ids, 4).astype(object), np.array(products, dtype=object),
                   np.tile(np.arange(1, 5), 3), np.linspace(1, 0, 12, dtype=np.float32)),
        feed_date=DAY, model_version="m1",
    )
    app_role = f"shop_app_{uuid.uuid4().hex[:8]}"  # roles are cluster-wide: unique per run
    with connect(pg_url, autocommit=True) as admin:
        admin.execute("CREATE SCHEMA shop")
        admin.execute(
            "CREATE TABLE shop.products (product_id text PRIMARY KEY, title text, price numeric, in_stock boolean)"
        )
        admin.execute(
            "INSERT INTO shop.products SELECT p, 'title ' || p, 9.99, true FROM unnest(%s::text[]) p", [products]
        )
        try:
            for block in sorted(admin_blocks, key=lambda b: "CREATE ROLE" not in b):  # the role before its grants
                admin.execute(block.replace("shop_app", app_role))
            reader_url = make_conninfo(pg_url, user=app_role, password="change-me")
            with connect(reader_url, autocommit=True) as reader, reader.cursor() as cur:
                for block in reader_blocks:
                    cur.execute(block)
                    while cur.nextset():  # PREPARE; EXECUTE: the rows are the last statement's
                        pass
                    assert cur.fetchall(), block
        finally:
            admin.execute(sql.SQL("DROP OWNED BY {}").format(sql.Identifier(app_role)))
            admin.execute(sql.SQL("DROP ROLE IF EXISTS {}").format(sql.Identifier(app_role)))


def test_second_publish_waits_for_the_lock_then_fails_naming_the_holder(pg_url):
    with connect(pg_url, autocommit=True) as holder:
        holder.execute("SELECT pg_advisory_lock(%s)", [PUBLISH_LOCK_KEY])
        holder_pid = holder.info.backend_pid
        started = time.monotonic()
        with pytest.raises(PublishLockTimeout, match=f"pid {holder_pid}"):
            publish_feed(pg_url, grid_feed(3, 2), feed_date=DAY, model_version="m1", publish_lock_wait_s=0.5)
        assert time.monotonic() - started >= 0.5
    result = publish_feed(pg_url, grid_feed(3, 2), feed_date=DAY, model_version="m1")  # holder gone: lock free
    with connect(pg_url) as conn:
        assert [v["version"] for v in list_versions(conn)] == [result.version]  # the refused one left no row


def test_version_rows_counts_what_the_database_holds(pg_url):
    result = publish_feed(pg_url, grid_feed(4, 3), feed_date=DAY, model_version="m")
    with connect(pg_url) as conn:
        assert version_rows(conn, result.version) == 12
        conn.execute(f"DELETE FROM {result.table_name} WHERE rank = 1")
        assert version_rows(conn, result.version) == 8
        with pytest.raises(LookupError):
            version_rows(conn, result.version + 1)


def test_non_ascii_ids_round_trip_on_a_latin1_database(pg_url):
    dbname = f"feedpipe_latin1_{uuid.uuid4().hex[:8]}"
    with connect(pg_url, autocommit=True) as conn:
        conn.execute(sql.SQL("CREATE DATABASE {} ENCODING 'LATIN1' LC_COLLATE 'C' LC_CTYPE 'C' TEMPLATE template0")
                     .format(sql.Identifier(dbname)))
    url = make_conninfo(pg_url, dbname=dbname)
    try:
        feed = FeedArrays(customer_id=pa.array(["café"]), product_id=pa.array(["crème"]),
                          rank=np.array([1], np.int32), score=np.array([0.5], np.float32))
        publish_feed(url, feed, feed_date=DAY, model_version="m")
        with connect(url) as conn:
            assert read_feed(conn, "café") == [("crème", 1, 0.5)]
            assert conn.execute("SELECT length(customer_id) FROM feedpipe.current_feed").fetchone()[0] == 4
    finally:
        with connect(pg_url, autocommit=True) as conn:
            conn.execute(sql.SQL("DROP DATABASE IF EXISTS {} WITH (FORCE)").format(sql.Identifier(dbname)))


def test_a_role_owning_the_schema_publishes_without_create_on_the_database(pg_url):
    publish_feed(pg_url, grid_feed(2, 2), feed_date=DAY, model_version="m0")  # the schema and reader role exist
    role = f"feedpipe_owner_{uuid.uuid4().hex[:8]}"
    owned = ("SELECT c.relname, c.relkind FROM pg_class c JOIN pg_namespace n ON n.oid = c.relnamespace "
             "WHERE n.nspname = 'feedpipe' AND c.relkind IN ('r', 'v', 'S')")
    kinds = {"r": "TABLE", "v": "VIEW", "S": "SEQUENCE"}
    with connect(pg_url, autocommit=True) as conn:
        conn.execute(sql.SQL("CREATE ROLE {} LOGIN").format(sql.Identifier(role)))  # no CREATE on the database
        conn.execute(sql.SQL("ALTER SCHEMA feedpipe OWNER TO {}").format(sql.Identifier(role)))
        for name, kind in conn.execute(owned).fetchall():
            conn.execute(sql.SQL("ALTER {} feedpipe.{} OWNER TO {}").format(
                sql.SQL(kinds[kind]), sql.Identifier(name), sql.Identifier(role)))
    try:
        result = publish_feed(make_conninfo(pg_url, user=role), grid_feed(2, 2, tag="-v1"), feed_date=DAY,
                              model_version="m1")
        with connect(pg_url) as conn:
            assert current_version(conn)["version"] == result.version
    finally:
        with connect(pg_url, autocommit=True) as conn:
            conn.execute(sql.SQL("DROP OWNED BY {} CASCADE").format(sql.Identifier(role)))
            conn.execute(sql.SQL("DROP ROLE {}").format(sql.Identifier(role)))


def test_bad_columns_are_reported_by_name_and_first_rows():
    ids = np.array(["a", "b", "c"], dtype=object)
    with pytest.raises(ValueError, match=r"'score'.*rows \[1\]"):
        FeedArrays(ids, ids, np.arange(3), np.array([0.1, np.nan, 0.3]))
    with pytest.raises(ValueError, match=r"'customer_id'.*null ids, first at rows \[2\]"):
        FeedArrays(pa.array(["a", "b", None]), ids, np.arange(3), np.zeros(3, np.float32))
    with pytest.raises(ValueError, match=r"'product_id'.*string"):
        FeedArrays(ids, pa.array([1, 2, 3]), np.arange(3), np.zeros(3, np.float32))
    with pytest.raises(ValueError, match=r"'rank'.*rows \[0\]"):
        FeedArrays(ids, ids, np.array([2**40, 1, 2]), np.zeros(3, np.float32))
    with pytest.raises(ValueError, match="differ in length"):
        FeedArrays(ids, ids, np.arange(2), np.zeros(3, np.float32))


def test_a_backfill_of_an_older_date_is_kept_but_the_newest_date_stays_served(pg_url):
    nightly = publish_feed(pg_url, grid_feed(3, 2, tag="-new"), feed_date=DAY + dt.timedelta(days=9), model_version="m10")
    backfill = publish_feed(pg_url, grid_feed(4, 2, tag="-old"), feed_date=DAY, model_version="m01")
    assert nightly.served and not backfill.served
    assert backfill.served_feed_date == DAY + dt.timedelta(days=9) and backfill.rows_loaded == 8
    with connect(pg_url) as conn:
        served = conn.execute("SELECT DISTINCT feed_date, model_version FROM feedpipe.current_feed").fetchall()
        versions = {v["version"]: v for v in list_versions(conn)}
        assert current_version(conn)["version"] == nightly.version
    assert served == [(DAY + dt.timedelta(days=9), "m10")]
    assert versions[backfill.version]["status"] == "retired" and versions[backfill.version]["table_exists"]
    rerun = publish_feed(pg_url, grid_feed(3, 2, tag="-rerun"), feed_date=DAY + dt.timedelta(days=9), model_version="m11")
    forced = publish_feed(pg_url, grid_feed(2, 2, tag="-forced"), feed_date=DAY, model_version="m02", replace_newer=True)
    assert rerun.served and forced.served and forced.served_feed_date == DAY
    with connect(pg_url) as conn:
        assert conn.execute("SELECT DISTINCT model_version FROM feedpipe.current_feed").fetchall() == [("m02",)]


def test_rows_loaded_is_what_the_servers_copy_stored(pg_url):
    result = publish_feed(pg_url, grid_feed(6, 3), feed_date=DAY, model_version="m1")
    with connect(pg_url) as conn:
        assert result.rows_loaded == version_rows(conn, result.version) == result.rows == 18


def test_a_reader_of_the_version_view_keeps_the_switch_waiting_so_its_feed_matches(pg_url):
    """docs/sql-interface.md: several statements in one transaction see one version, whichever view comes first."""
    publish_feed(pg_url, grid_feed(3, 2, tag="-v0"), feed_date=DAY, model_version="m0")
    with connect(pg_url) as reader:
        version = reader.execute("SELECT model_version FROM feedpipe.current_feed_version").fetchone()[0]
        with pytest.raises(PublishError, match="long-running readers"):
            publish_feed(pg_url, grid_feed(3, 2, tag="-v1"), feed_date=DAY + dt.timedelta(days=1), model_version="m1",
                         lock_timeout_ms=100, switch_attempts=2)
        feed = reader.execute("SELECT DISTINCT model_version FROM feedpipe.current_feed").fetchall()
        reader.rollback()
    assert version == "m0" and feed == [("m0",)]


def test_a_publisher_frozen_inside_a_transaction_is_ended_by_the_server_and_frees_its_locks(pg_url):
    from feedpipe.publishing import guard_publish_session

    frozen = connect(pg_url)
    try:
        guard_publish_session(frozen, idle_in_transaction_s=0.5)
        frozen.execute("SELECT pg_advisory_lock(%s)", [PUBLISH_LOCK_KEY])  # as a publish holds it
        frozen.execute("SELECT 1")  # inside a transaction (psycopg opens one), then nothing more
        time.sleep(1.5)
        with connect(pg_url, autocommit=True) as other:
            assert other.execute("SELECT pg_try_advisory_lock(%s)", [PUBLISH_LOCK_KEY]).fetchone()[0]
            other.execute("SELECT pg_advisory_unlock(%s)", [PUBLISH_LOCK_KEY])
        with pytest.raises(psycopg.Error, match="idle-in-transaction timeout"):
            frozen.execute("SELECT 1")
    finally:
        frozen.close()


def test_a_copy_the_server_counts_short_is_never_served(pg_url, monkeypatch):
    """The server's own row count of the COPY was only compared after the switch (a non-blocking check): a version
    with rows missing was already what readers saw."""
    from feedpipe import publishing

    served = publish_feed(pg_url, grid_feed(4, 3, tag="-v0"), feed_date=DAY, model_version="m0")
    real_load = publishing._load

    def short_load(*args, **kwargs):
        copy_s, index_s, loaded = real_load(*args, **kwargs)
        return copy_s, index_s, loaded - 1  # as if the encoder had dropped a row

    monkeypatch.setattr(publishing, "_load", short_load)
    with pytest.raises(PublishError, match=r"stored 11 of the 12 feed rows"):
        publish_feed(pg_url, grid_feed(4, 3, tag="-v1"), feed_date=DAY + dt.timedelta(days=1), model_version="m1")
    with connect(pg_url) as conn:
        assert current_version(conn)["version"] == served.version
        assert [p for p, _, _ in read_feed(conn, "c1")] == ["p0-v0", "p1-v0", "p2-v0"]
        assert [v["status"] for v in list_versions(conn) if v["version"] != served.version] == ["failed"]
