"""The CLI as a user runs it: demo data -> `feedpipe run` through the Dagster instance (dagster-postgres
storage) -> a feed in Postgres; then a rerun of the same date while a reader polls the view."""

import os
import subprocess
import sys
import threading
from datetime import date
from pathlib import Path

import psycopg
import pytest

from feedpipe.demo_data import generate_demo_data

FEEDPIPE = str(Path(sys.executable).parent / "feedpipe")
FEED_DATE = "2026-03-31"
CUSTOMERS = 250


def _run(args, env, timeout=300):
    return subprocess.run([FEEDPIPE, *args], env=env, capture_output=True, text=True, timeout=timeout)


@pytest.fixture
def cli_env(tmp_path, pg_url):
    env = {k: v for k, v in os.environ.items() if k not in ("DAGSTER_HOME", "FEEDPIPE_DAGSTER_STORAGE_URL")}
    env.update(FEEDPIPE_HOME=str(tmp_path / "home"), FEEDPIPE_DATABASE_URL=pg_url)
    run_config = tmp_path / "run.yaml"
    run_config.write_text(
        "ops:\n"
        "  training_examples: {config: {negatives_per_positive: 4}}\n"
        "  dlrm_model: {config: {epochs: 3, min_validation_auc: 0.5}}\n"
        "  model_evaluation: {config: {lightgbm: false, min_margin_over_popularity: -1.0}}\n"
    )
    return env, run_config


def test_cli_run_on_csv_data_publishes_a_feed_and_a_rerun_replaces_it_atomically(tmp_path, cli_env, pg_url):
    env, run_config = cli_env
    data = tmp_path / "data"
    generate_demo_data(data, customers=CUSTOMERS, products=70, days=40, end_date=date(2026, 3, 30), seed=5, file_format="csv")

    first = _run(["run", "--data", str(data), "--date", FEED_DATE, "--run-config", str(run_config)], env)
    assert first.returncode == 0, first.stderr[-3000:]
    assert "ranked_feed" in first.stdout and "SUCCESS" in first.stdout

    with psycopg.connect(pg_url) as conn:
        assert conn.execute("select count(*), count(distinct customer_id) from feedpipe.current_feed").fetchone() == (CUSTOMERS * 20, CUSTOMERS)
        (v1,) = conn.execute("select distinct model_version from feedpipe.current_feed").fetchone()
        # the run is in Dagster's run history on the same server (dagster-postgres storage)
        assert conn.execute("select count(*) from runs where status = 'SUCCESS'").fetchone()[0] == 1

    feed = _run(["feed", "1", "--limit", "5"], env)
    assert feed.returncode == 0 and feed.stdout.count("\n") == 7, feed.stdout + feed.stderr

    import json

    report = _run(["report", "--json"], env)
    assert report.returncode == 0, report.stderr[-2000:]
    served = json.loads(report.stdout)
    assert (served["rows"], served["customers"], served["model_version"]) == (CUSTOMERS * 20, CUSTOMERS, v1)
    assert 0.5 < served["model"]["auc"] <= 1.0
    assert served["ranking"]["k"] == 20 and {"dlrm", "popularity", "oracle"} <= set(served["ranking"])
    assert set(served["ranking"]["dlrm"]) >= {"recall", "ndcg", "map", "hit_rate"}

    # Rerun the same date while a reader polls: every read sees one whole version, never none.
    observations, stop = [], threading.Event()

    def reader():
        with psycopg.connect(pg_url, autocommit=True) as conn:
            while not stop.is_set():
                rows = conn.execute(
                    "select count(*), count(distinct model_version), min(model_version) from feedpipe.current_feed"
                ).fetchone()
                observations.append(rows)

    t = threading.Thread(target=reader)
    t.start()
    try:
        second = _run(["run", "--data", str(data), "--date", FEED_DATE, "--run-config", str(run_config)], env)
    finally:
        stop.set()
        t.join()
    assert second.returncode == 0, second.stderr[-3000:]
    assert observations and all(n == CUSTOMERS * 20 and versions == 1 for n, versions, _ in observations)
    seen = {v for *_, v in observations}
    with psycopg.connect(pg_url) as conn:
        (v2,) = conn.execute("select distinct model_version from feedpipe.current_feed").fetchone()
    assert v2 != v1 and seen <= {v1, v2}


def test_cli_db_url_is_accepted_by_psycopg(cli_env):
    env, _ = cli_env
    out = _run(["db-url"], env)
    assert out.returncode == 0
    with psycopg.connect(out.stdout.strip()) as conn:
        assert conn.execute("select 1").fetchone() == (1,)
