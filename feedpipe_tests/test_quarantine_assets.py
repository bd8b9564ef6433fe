"""The input assets under Dagster: rejected Parquet beside the outputs, counts in metadata, the policy as config, the
input checks, a failed load that leaves the feed served by the real nightly job untouched, and the CLI's message for
broken input."""

import os
import re
import shutil
import subprocess
import sys
from datetime import date, datetime, timedelta
from pathlib import Path

import dagster as dg
import polars as pl
import pytest

from feedpipe.contract import CUSTOMER_ID, CUSTOMERS, PRODUCT_ID, PRODUCTS, QUANTITY, TRANSACTIONS, TS
from feedpipe.database import DATABASE_URL_ENV, HOME_ENV, connect
from feedpipe.definitions import defs
from feedpipe.defs import ingest
from feedpipe.defs.io_manager import ArtifactIOManager
from feedpipe.defs.launchers import LAUNCHER_ENV
from feedpipe.defs.resources import ArtifactsResource, DatabaseResource, DataResource
from feedpipe.demo_data import generate_demo_data
from feedpipe.quarantine import REASON
from feedpipe.sources import FeatureSpec
from feedpipe.vocabularies import build_vocabularies
from feedpipe_tests.malformed.cases import customers, write_set

FEED_DATE = date(2024, 3, 1)
PARTITION = FEED_DATE.isoformat()
INPUTS = [ingest.customers, ingest.products, ingest.transactions]
REPO = Path(__file__).resolve().parent.parent


def daily_transactions(days: int = 21, per_day: int = 6, last_day: int | None = None) -> pl.DataFrame:
    """`per_day` transactions on each of the `days` days before the feed date (`last_day` on the last one)."""
    rows = []
    for d in range(days, 0, -1):
        n = last_day if (d == 1 and last_day is not None) else per_day
        day = datetime.combine(FEED_DATE - timedelta(days=d), datetime.min.time())
        rows += [(f"c{1 + (d + i) % 6}", f"p{1 + i % 5}", day + timedelta(hours=i), 1 + i % 3) for i in range(n)]
    return pl.DataFrame(rows, schema=[CUSTOMER_ID, PRODUCT_ID, TS, QUANTITY], orient="row")


def resources(tmp_path: Path, data_dir: Path, input_config: str = "") -> dict:
    artifacts = ArtifactsResource(root=str(tmp_path / "artifacts"))
    return {
        "data": DataResource(data_dir=str(data_dir), input_config=input_config),
        "artifacts": artifacts,
        "database": DatabaseResource(),
        "io_manager": ArtifactIOManager(artifacts=artifacts),
    }


def materialize(assets, res, run_config=None, partition=PARTITION):
    return dg.materialize(assets, partition_key=partition, resources=res, run_config=run_config or {},
                          raise_on_error=False)


def metadata(result, asset: str) -> dict:
    return {k: v.value for k, v in result.asset_materializations_for_node(asset)[0].metadata.items()}


def checks(result) -> dict:
    return {e.check_name: e for e in result.get_asset_check_evaluations()}


def lenient(fraction: float = 0.5) -> dict:
    return {"ops": {name: {"config": {"max_rejected_fraction": fraction}} for name in (TRANSACTIONS, CUSTOMERS, PRODUCTS)}}


def test_rejected_rows_go_to_parquet_beside_the_outputs_with_counts_per_reason(tmp_path):
    tx = pl.concat([daily_transactions(), pl.DataFrame(
        {CUSTOMER_ID: ["c9", "c1", ""], PRODUCT_ID: ["p1", "p1", "p1"],
         TS: [datetime(2024, 2, 20), datetime(2024, 3, 2), datetime(2024, 2, 20)], QUANTITY: [1, 1, 1]})])
    write_set(tmp_path / "data", "csv", transactions=tx, customers=pl.concat([customers(), customers()[0]]))

    result = materialize(INPUTS, resources(tmp_path, tmp_path / "data"), lenient())

    assert result.success
    meta = metadata(result, TRANSACTIONS)
    assert (meta["rows_received"], meta["rows_accepted"], meta["rows_rejected"]) == (129, 126, 3)
    assert meta["dagster/row_count"] == 126
    assert meta["rejected_counts"] == {"missing_id": 1, "ts_after_feed_date": 1, "unknown_customer": 1}
    assert "| ts_after_feed_date | ts | 1 |" in meta["rejected_by_reason"]
    rejected = pl.read_parquet(meta["rejected_rows"])
    assert Path(meta["rejected_rows"]) == tmp_path / "artifacts" / "rejected" / TRANSACTIONS / f"{PARTITION}.parquet"
    assert sorted(rejected.get_column(REASON)) == ["missing_id", "ts_after_feed_date", "unknown_customer"]
    assert metadata(result, CUSTOMERS)["rejected_counts"] == {"duplicate_row": 1}
    assert pl.read_parquet(metadata(result, PRODUCTS)["rejected_rows"]).is_empty()  # written even when empty
    found = checks(result)
    assert found["referential_integrity"].passed and found["freshness"].passed and found["daily_volume"].passed
    assert found["referential_integrity"].metadata["accepted_rows_with_unknown_ids"].value == 0
    # The accepted rows were written in chunks and moved into place; the spool is empty again.
    assert pl.read_parquet(tmp_path / "artifacts" / TRANSACTIONS / f"{PARTITION}.parquet").height == 126
    assert not list((tmp_path / "artifacts" / "spool").iterdir())


def test_policy_breach_fails_the_asset_with_the_message_and_counts(tmp_path):
    tx = daily_transactions().with_columns(pl.when(pl.col(TS).dt.day() == 10).then(0).otherwise(pl.col(QUANTITY)).alias(QUANTITY))
    write_set(tmp_path / "data", "csv", transactions=tx)

    result = materialize(INPUTS, resources(tmp_path, tmp_path / "data"))

    assert not result.success
    failure = next(e for e in result.all_events if e.is_step_failure)
    assert failure.step_key == TRANSACTIONS
    message = failure.step_failure_data.error.message
    assert "transactions.csv: 6 of 126 transactions rows rejected (4.8%)" in message
    assert "column 'quantity'" in message and "non_positive_quantity" in message
    assert failure.step_failure_data.user_failure_data.metadata["rejected_counts"].value == {"non_positive_quantity": 6}
    assert pl.read_parquet(tmp_path / "artifacts" / "rejected" / TRANSACTIONS / f"{PARTITION}.parquet").height == 6
    assert not result.asset_materializations_for_node(TRANSACTIONS)
    assert not (tmp_path / "artifacts" / TRANSACTIONS).exists()
    assert not list((tmp_path / "artifacts" / "spool").iterdir())  # the accepted rows spooled before the breach: gone

    relaxed = materialize(INPUTS, resources(tmp_path, tmp_path / "data"), lenient(0.05))
    assert relaxed.success


def test_a_rerun_replaces_the_rejected_file_of_its_partition(tmp_path):
    write_set(tmp_path / "data", "csv", customers=pl.concat([customers(), customers()[0]]))
    materialize([ingest.customers], resources(tmp_path, tmp_path / "data"), {"ops": {CUSTOMERS: {"config": {"max_rejected_fraction": 0.5}}}})
    path = tmp_path / "artifacts" / "rejected" / CUSTOMERS / f"{PARTITION}.parquet"
    assert pl.read_parquet(path).height == 1

    write_set(tmp_path / "data", "csv")
    assert materialize([ingest.customers], resources(tmp_path, tmp_path / "data")).success
    assert pl.read_parquet(path).is_empty()


def test_stale_export_fails_freshness_and_a_thin_day_warns_on_volume(tmp_path):
    write_set(tmp_path / "data", "parquet", transactions=daily_transactions(last_day=1))
    write_set(tmp_path / "stale", "parquet", transactions=daily_transactions().filter(pl.col(TS) < datetime(2024, 2, 25)))

    thin = checks(materialize(INPUTS, resources(tmp_path, tmp_path / "data")))
    stale = checks(materialize(INPUTS, resources(tmp_path / "s", tmp_path / "stale")))

    assert not thin["daily_volume"].passed and thin["daily_volume"].severity == dg.AssetCheckSeverity.WARN
    assert thin["daily_volume"].metadata["trailing_median"].value == 6.0 and thin["freshness"].passed
    assert not stale["freshness"].passed and stale["freshness"].severity == dg.AssetCheckSeverity.ERROR
    assert stale["freshness"].metadata["age_days"].value == 5.79  # newest: 2024-02-24 05:00


def test_vocabulary_drift_warns_when_values_are_unknown_to_the_last_vocabularies(tmp_path):
    specs = [FeatureSpec(CUSTOMER_ID, CUSTOMERS, "categorical"), FeatureSpec("region", CUSTOMERS, "categorical")]
    earlier = build_vocabularies({CUSTOMERS: customers()}, specs, min_count=1)
    earlier.save(tmp_path / "artifacts" / "vocabularies" / "2024-02-29")
    renamed = customers().with_columns(pl.col("region").str.to_uppercase())
    write_set(tmp_path / "data", "csv", customers=renamed)

    result = materialize([ingest.customers], resources(tmp_path, tmp_path / "data"))

    drift = checks(result)["vocabulary_drift"]
    assert result.success and not drift.passed and drift.severity == dg.AssetCheckSeverity.WARN
    assert drift.metadata["baseline"].value == "2024-02-29"
    assert "customers.region 100.0%" in drift.description and "customer_id" not in drift.description


# The nightly job as test_assets.py runs it on tiny data: few epochs, no LightGBM, no popularity gate (tiny data).
FAST_NIGHT = {"ops": {
    "training_examples": {"config": {"negatives_per_positive": 4}},
    "dlrm_model": {"config": {"epochs": 2, "min_validation_auc": 0.5}},
    "model_evaluation": {"config": {"lightgbm": False, "min_margin_over_popularity": -1.0}},
}}
SERVED_DEMO_DATE, NEXT_NIGHT = "2026-03-31", "2026-04-01"


@pytest.fixture
def nightly(tmp_path, pg_url, monkeypatch):
    """Runs the real `nightly_feed` job with its own resources, which read the environment as under `feedpipe run`."""
    monkeypatch.setenv(DATABASE_URL_ENV, pg_url)
    monkeypatch.setenv(HOME_ENV, str(tmp_path / "home"))
    for name in ("FEEDPIPE_INPUT_CONFIG", LAUNCHER_ENV):
        monkeypatch.delenv(name, raising=False)
    job, instance = defs.resolve_job_def("nightly_feed"), dg.DagsterInstance.ephemeral()

    def run(data_dir: Path, feed_date: str):
        monkeypatch.setenv("FEEDPIPE_DATA_DIR", str(data_dir))
        return job.execute_in_process(partition_key=feed_date, run_config=FAST_NIGHT, instance=instance,
                                      raise_on_error=False)

    return run


def served_bytes(url: str) -> bytes:
    """Everything a reader or the next publish sees, as bytes: the served rows (binary COPY, in key order), every
    version's bookkeeping row, the view's definition and the feed tables that exist."""
    queries = [
        "COPY (SELECT * FROM feedpipe.current_feed ORDER BY customer_id, rank) TO STDOUT (FORMAT binary)",
        "COPY (SELECT * FROM feedpipe.feed_versions ORDER BY version) TO STDOUT (FORMAT binary)",
        "COPY (SELECT pg_get_viewdef('feedpipe.current_feed'), string_agg(tablename, ',' ORDER BY tablename) "
        "FROM pg_tables WHERE schemaname = 'feedpipe') TO STDOUT",
    ]
    dump = bytearray()
    with connect(url) as conn, conn.cursor() as cur:
        for query in queries:
            with cur.copy(query) as copy:
                for block in copy:
                    dump += block
    return bytes(dump)


def broken_copy(demo: Path, target: Path, breakage: str) -> Path:
    """The demo set with its transactions broken: a `ts` format no parser knows (fatal: a verdict on the whole
    column, reached after the last chunk), or 5% of quantities zero (row-level, over the default 1% policy)."""
    shutil.copytree(demo, target)
    tx = pl.read_parquet(demo / f"{TRANSACTIONS}.parquet")
    if breakage == "fatal":
        tx = tx.with_columns(pl.col(TS).dt.strftime("%m/%d/%Y"))  # an export whose date format changed
    else:
        tx = tx.with_columns(pl.when(pl.int_range(pl.len()) % 20 == 0).then(0).otherwise(pl.col(QUANTITY))
                             .cast(tx.schema[QUANTITY]).alias(QUANTITY))
    tx.write_parquet(target / f"{TRANSACTIONS}.parquet")
    return target


def step_failure_message(result, step: str) -> str:
    failure = next(e for e in result.all_events if e.is_step_failure)
    assert failure.step_key == step
    return failure.step_failure_data.error.message


def test_a_failed_load_leaves_the_feed_served_by_the_real_nightly_job_byte_for_byte_unchanged(nightly, pg_url,
                                                                                              tmp_path):
    demo = tmp_path / "demo"
    generate_demo_data(demo, customers=150, products=40, days=30, end_date=date(2026, 3, 30), seed=5)
    published = nightly(demo, SERVED_DEMO_DATE)
    assert published.success, [e.step_failure_data.error.message for e in published.all_events if e.is_step_failure]
    before = served_bytes(pg_url)
    with connect(pg_url) as conn:  # what was dumped is the feed: every customer, up to 20 products each
        served = "select count(distinct customer_id), count(*) from feedpipe.current_feed"
        customers_served, rows = conn.execute(served).fetchone()
    assert customers_served == 150 and rows == metadata(published, "ranked_feed")["dagster/row_count"] > 150 * 19

    fatal = nightly(broken_copy(demo, tmp_path / "fatal", "fatal"), NEXT_NIGHT)
    above_policy = nightly(broken_copy(demo, tmp_path / "above_policy", "above_policy"), NEXT_NIGHT)

    fatal_file, policy_file = (re.escape(str(tmp_path / d / "transactions.parquet")) for d in ("fatal", "above_policy"))
    assert re.search(rf"{fatal_file}: column 'ts': none of its 7,\d\d\d value\(s\) is a timestamp; expected .*\n"
                     r"    row 1: '0\d/\d\d/2026'", step_failure_message(fatal, TRANSACTIONS))
    assert re.search(rf"{policy_file}: \d+ of 7,\d\d\d transactions rows rejected \(5\.0%\); the rejection policy "
                     r"allows at most 1\.0%.*column 'quantity'.*\[non_positive_quantity\]",
                     step_failure_message(above_policy, TRANSACTIONS), flags=re.DOTALL)
    for failed in (fatal, above_policy):
        assert not failed.success
        assert not failed.asset_materializations_for_node("dlrm_model")
        assert not failed.asset_materializations_for_node("ranked_feed")
        assert served_bytes(pg_url) == before
    # The control: the same job on the good data of that night does publish, and the dump sees it.
    assert nightly(demo, NEXT_NIGHT).success
    after = served_bytes(pg_url)
    assert after != before and len(after) > len(before)  # one more version row, the same rows per customer


def test_postgres_source_feeds_the_input_assets(tmp_path, pg_url, monkeypatch):
    with connect(pg_url, autocommit=True) as conn:
        conn.execute("create table tx (customer_id text, product_id text, ts timestamp, quantity int)")
        with conn.cursor().copy("copy tx from stdin") as copy:
            for row in daily_transactions().iter_rows():
                copy.write_row(row)
        conn.execute("create table cu as select 'c' || i as customer_id, 20 + i as age from generate_series(1, 6) i;"
                     "create table pr as select 'p' || i as product_id, i * 1.5 as price from generate_series(1, 5) i")
    monkeypatch.setenv("SALES_URL", pg_url)
    config = tmp_path / "input.yaml"
    config.write_text("source:\n  postgres:\n    url_env: SALES_URL\n    chunk_rows: 50\n"
                      "    transactions: {table: tx}\n    customers: {table: cu}\n    products: {query: select * from pr}\n")

    result = materialize(INPUTS, resources(tmp_path, tmp_path / "no-data-dir", str(config)))

    assert result.success
    meta = metadata(result, TRANSACTIONS)
    assert meta["source"] == "postgres table tx" and meta["rows_accepted"] == meta["rows_received"] == 126


def test_cli_run_on_broken_input_exits_nonzero_with_file_and_column_and_no_traceback(tmp_path, pg_url):
    write_set(tmp_path / "data", "csv", transactions=daily_transactions().drop(TS))
    env = {**os.environ, "FEEDPIPE_HOME": str(tmp_path / "home"), "FEEDPIPE_DATABASE_URL": pg_url}
    env.pop("DAGSTER_HOME", None)
    feedpipe = Path(sys.executable).parent / "feedpipe"

    run = subprocess.run([str(feedpipe), "run", "--data", str(tmp_path / "data"), "--date", PARTITION],
                         capture_output=True, text=True, env=env, cwd=REPO, timeout=300)

    assert run.returncode != 0
    assert f"{tmp_path / 'data' / 'transactions.csv'}: missing required column(s) 'ts'" in run.stderr
    assert "Traceback" not in run.stderr and "Stack Trace" not in run.stderr


def test_the_spool_sweep_removes_what_killed_steps_left_and_keeps_live_entries(tmp_path):
    import os
    import time

    from feedpipe.defs.ingest import STALE_SPOOL_SECONDS, sweep_spool

    spool = tmp_path / "spool"
    (spool / "feedpipe-transactions-abc").mkdir(parents=True)  # a killed Postgres export
    (spool / "feedpipe-transactions-abc" / "transactions.parquet").write_bytes(b"x" * 100)
    (spool / "transactions-2024-03-01-run1.parquet.partial").write_bytes(b"x")  # a killed chunked load
    live = spool / "transactions-2024-03-02-run2.parquet.partial"
    live.write_bytes(b"x")
    old = time.time() - STALE_SPOOL_SECONDS - 60
    for entry in [spool / "feedpipe-transactions-abc", spool / "transactions-2024-03-01-run1.parquet.partial"]:
        os.utime(entry, (old, old))

    removed = sweep_spool(spool)

    assert sorted(p.name for p in removed) == ["feedpipe-transactions-abc", "transactions-2024-03-01-run1.parquet.partial"]
    assert [p.name for p in spool.iterdir()] == [live.name]
    assert sweep_spool(tmp_path / "absent") == []



WRITER = """
import sys
import dagster as dg
import polars as pl
from feedpipe.defs.io_manager import ArtifactIOManager
from feedpipe.defs.resources import ArtifactsResource
root, i = sys.argv[1], int(sys.argv[2])
manager = ArtifactIOManager(artifacts=ArtifactsResource(root=root))
frame = pl.DataFrame({"x": list(range(i * 300_000, (i + 1) * 300_000))})
print("ready", flush=True)
sys.stdin.readline()  # both start writing together
for _ in range(8):
    manager.handle_output(dg.build_output_context(asset_key=dg.AssetKey("pair_scores"), partition_key="2026-03-01"),
                          frame)
"""


def test_two_runs_writing_one_partition_at_once_leave_a_whole_file(tmp_path):
    """The schedule and a manual rerun of one date, as two processes: each write has its own temporary file,
    so whichever rename lands last leaves a readable, complete frame (a shared temporary name corrupted it)."""
    import subprocess
    import sys

    writers = [subprocess.Popen([sys.executable, "-c", WRITER, str(tmp_path), str(i)], stdin=subprocess.PIPE,
                                stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True) for i in range(2)]
    for w in writers:
        assert w.stdout.readline().strip() == "ready"
    for w in writers:
        w.stdin.write("go\n")
        w.stdin.flush()
    results = [w.communicate(timeout=120) for w in writers]
    assert [w.returncode for w in writers] == [0, 0], [err[-2000:] for _, err in results]
    stored = pl.read_parquet(tmp_path / "pair_scores" / "2026-03-01.parquet")
    expected = [pl.DataFrame({"x": list(range(i * 300_000, (i + 1) * 300_000))}) for i in range(2)]
    assert any(stored.equals(f) for f in expected)
    assert not list((tmp_path / "pair_scores").glob("*.tmp"))
