"""The command line: bad arguments end in a usage message and exit status 2, never a traceback; defaults."""

import pytest

from feedpipe.cli import main


@pytest.mark.parametrize("argv, message", [
    (["run", "--date", "2024-13-01"], "not a date YYYY-MM-DD: '2024-13-01'"),
    (["run", "--run-config", "/nonexistent/run.yaml"], "no such file: /nonexistent/run.yaml"),
    (["run", "--config", "/nonexistent/input.yaml"], "no such file: /nonexistent/input.yaml"),
    (["demo-data", "/tmp/x", "--customers", "0"], "not a whole number of at least 1: '0'"),
    (["demo-data", "/tmp/x", "--days", "two"], "not a whole number of at least 1: 'two'"),
])
def test_bad_arguments_exit_2_with_a_message(argv, message, capsys):
    with pytest.raises(SystemExit) as exited:
        main(argv)
    assert exited.value.code == 2
    err = capsys.readouterr().err
    assert message in err and "Traceback" not in err


def test_the_default_feed_date_is_the_utc_day_whatever_the_hosts_zone():
    from datetime import date, datetime, timedelta, timezone

    from feedpipe.contract import utc_today

    new_york_evening = datetime(2026, 11, 28, 21, 30, tzinfo=timezone(timedelta(hours=-5)))  # 02:30 UTC next day
    assert utc_today(new_york_evening) == date(2026, 11, 29)
    tokyo_morning = datetime(2026, 11, 28, 7, 0, tzinfo=timezone(timedelta(hours=9)))  # 22:00 UTC the day before
    assert utc_today(tokyo_morning) == date(2026, 11, 27)


def test_report_reads_the_evaluation_under_the_artifacts_root_it_is_given(tmp_path, monkeypatch, capsys):
    import contextlib
    import json

    from feedpipe import cli
    from feedpipe.model_evaluation import ModelEvaluation

    served = {"version": 3, "feed_date": "2026-12-02", "model_version": "m1", "rows": 40, "customers": 2}
    monkeypatch.setattr(cli, "resolve_database_url", lambda: "postgresql://unused")
    monkeypatch.setattr(cli, "connect", lambda url: contextlib.nullcontext(None))
    monkeypatch.setattr(cli, "_served_version", lambda conn: served)
    monkeypatch.setenv("FEEDPIPE_HOME", str(tmp_path / "home"))  # holds no evaluation
    ModelEvaluation("m1", 20, 2, {"auc": 0.9, "logloss": 0.2}, {"dlrm": {"recall": 0.5}}).save(
        tmp_path / "elsewhere" / "evaluations" / "m1")
    assert cli.main(["report", "--json"]) == 0
    assert json.loads(capsys.readouterr().out)["ranking"] is None
    assert cli.main(["report", "--json", "--artifacts", str(tmp_path / "elsewhere")]) == 0
    report = json.loads(capsys.readouterr().out)
    assert report["model"]["auc"] == 0.9 and report["ranking"]["dlrm"]["recall"] == 0.5
    # LightGBM turned off is said (null), not left out; no publish time is null, not the text "None"
    assert report["ranking"]["lightgbm"] is None and "oracle" not in report["ranking"]
    assert report["published_at"] is None
    assert cli.main(["report", "--artifacts", str(tmp_path / "elsewhere")]) == 0  # the table skips the missing
    text = capsys.readouterr().out
    assert "dlrm" in text and "ranked for 2 held-out customers with history" in text


@pytest.mark.parametrize("argv, message", [
    (["feed", "--limit", "-1"], "not a whole number of at least 1: '-1'"),
    (["feed", "--limit", "0"], "not a whole number of at least 1: '0'"),
    (["demo-data", "/tmp/x", "--seed", "-1"], "not a whole number of at least 0: '-1'"),
])
def test_bad_counts_exit_2_before_any_work(argv, message, capsys):
    with pytest.raises(SystemExit) as exited:
        main(argv)
    assert exited.value.code == 2 and message in capsys.readouterr().err


@pytest.mark.parametrize("text, message", [
    ("ops: [unclosed", "is not valid YAML"),
    ("- a\n- b\n", "must be a mapping"),
])
def test_a_bad_run_config_file_is_one_line_not_a_traceback(tmp_path, monkeypatch, capsys, text, message):
    from feedpipe import cli

    calls = []
    monkeypatch.setattr(cli, "prepare_environment", lambda: calls.append("db") or "postgresql://unused")
    bad = tmp_path / "run.yaml"
    bad.write_text(text)
    assert main(["run", "--run-config", str(bad)]) == 2
    err = capsys.readouterr().err
    assert message in err and str(bad) in err and "Traceback" not in err
    assert calls == []  # refused before the database is even resolved


def test_a_date_outside_the_partitions_is_refused_before_demo_data_is_built(monkeypatch, capsys):
    from feedpipe import cli

    monkeypatch.setattr(cli, "_demo_directory", lambda feed_date: pytest.fail("demo data built for a refused date"))
    monkeypatch.setattr(cli, "prepare_environment", lambda: pytest.fail("database resolved for a refused date"))
    assert main(["run", "--date", "1999-06-01"]) == 2
    assert "outside the feed-date partitions" in capsys.readouterr().err


def test_run_names_an_unreachable_database_at_once(monkeypatch, capsys):
    from feedpipe import cli
    from feedpipe.database import DatabaseError

    def refuse(url):
        raise DatabaseError("could not connect to postgresql://db.invalid/feed")

    monkeypatch.setattr(cli, "prepare_environment", lambda: "postgresql://db.invalid/feed")
    monkeypatch.setattr(cli, "connect", refuse)
    monkeypatch.setattr(cli, "_demo_directory", lambda feed_date: pytest.fail("demo data built with no database"))
    assert main(["run"]) == 1
    assert "could not connect to postgresql://db.invalid/feed" in capsys.readouterr().err


def test_a_run_config_that_does_not_fit_the_job_names_the_setting(tmp_path, monkeypatch, capsys):
    from feedpipe import cli

    monkeypatch.setenv("FEEDPIPE_HOME", str(tmp_path / "home"))
    monkeypatch.setenv("DAGSTER_HOME", str(tmp_path))  # no dagster.yaml: a throwaway local instance
    monkeypatch.setattr(cli, "connect", lambda url: type("C", (), {"close": lambda self: None})())
    monkeypatch.setattr(cli, "prepare_environment", lambda: "postgresql://unused")
    monkeypatch.setattr(cli, "_demo_directory", lambda feed_date: tmp_path)
    bad = tmp_path / "run.yaml"
    bad.write_text("ops: {dlrm_model: {config: {epochs: four}}}\n")
    assert main(["run", "--run-config", str(bad)]) == 2
    err = capsys.readouterr().err
    assert "does not fit the job's config" in err and "epochs" in err and "Traceback" not in err


def test_report_json_with_nothing_served_is_still_one_object(monkeypatch, capsys):
    import contextlib
    import json

    from feedpipe import cli

    monkeypatch.setattr(cli, "resolve_database_url", lambda: "postgresql://unused")
    monkeypatch.setattr(cli, "connect", lambda url: contextlib.nullcontext(None))
    monkeypatch.setattr(cli, "_served_version", lambda conn: None)
    assert main(["report", "--json"]) == 1
    report = json.loads(capsys.readouterr().out)
    assert report["feed_version"] is None and report["error"] == "no feed published yet"


def test_a_path_mistake_is_one_line(tmp_path, capsys):
    target = tmp_path / "a_file"
    target.write_text("x")
    assert main(["demo-data", str(target), "--customers", "5", "--products", "5", "--days", "2"]) == 1
    err = capsys.readouterr().err
    assert str(target) in err and "Traceback" not in err


@pytest.mark.parametrize("url", [
    "postgresql://postgres:Sx9q/Kr7Et@127.0.0.1:{port}/db",
    "postgresql://postgres:Sx9q@Kr7Et@127.0.0.1:{port}/db",
    "postgresql://postgres@127.0.0.1:{port}/db?password=Sx9q&Kr7Et",
])
@pytest.mark.parametrize("argv", [["feed"], ["report", "--json"], ["db", "init"]])
def test_an_unreachable_database_with_an_unencoded_password_never_shows_it(url, argv, monkeypatch, capsys):
    from feedpipe_tests.test_database import _closed_port

    monkeypatch.setenv("FEEDPIPE_DATABASE_URL", url.format(port=_closed_port()))
    assert main(argv) == 1
    out, err = capsys.readouterr()
    assert "could not connect to postgresql://postgres" in err and "Traceback" not in err
    assert not [s for s in ("Sx9q", "Kr7Et") if s in out + err], err


@pytest.fixture
def reader_login(pg_url):
    """A served feed on `pg_url`, and a URL for a login that holds only `feedpipe_reader`, as downstream's does."""
    import uuid

    from psycopg import sql
    from psycopg.conninfo import make_conninfo

    from feedpipe.database import connect
    from feedpipe.publishing import publish_feed
    from feedpipe_tests.test_publishing import DAY, grid_feed

    publish_feed(pg_url, grid_feed(3, 2, tag="-v0"), feed_date=DAY, model_version="m0")  # creates the role
    role = f"feedpipe_login_{uuid.uuid4().hex[:10]}"
    with connect(pg_url, autocommit=True) as admin:
        admin.execute(sql.SQL("CREATE ROLE {} LOGIN IN ROLE feedpipe_reader").format(sql.Identifier(role)))
    try:
        yield make_conninfo(pg_url, user=role)
    finally:
        with connect(pg_url, autocommit=True) as admin:
            admin.execute("SELECT pg_terminate_backend(pid) FROM pg_stat_activity WHERE usename = %s", [role])
            admin.execute(sql.SQL("DROP ROLE {}").format(sql.Identifier(role)))


def test_a_login_with_only_the_reader_role_reads_the_feed_and_the_report(reader_login, monkeypatch, capsys):
    import json

    monkeypatch.setenv("FEEDPIPE_DATABASE_URL", reader_login)
    monkeypatch.setenv("FEEDPIPE_HOME", "/nonexistent/feedpipe-home")  # no evaluation to find
    assert main(["feed", "c1"]) == 0
    out = capsys.readouterr().out
    assert "feed for customer c1 (version 1, feed date 2024-03-01, model m0)" in out and "p1-v0" in out
    assert main(["report", "--json"]) == 0
    report = json.loads(capsys.readouterr().out)
    assert (report["feed_version"], report["rows"], report["customers"]) == (1, 6, 3)


def test_a_database_refusal_is_one_line_and_exit_1(reader_login, monkeypatch, capsys):
    monkeypatch.setenv("FEEDPIPE_DATABASE_URL", reader_login)
    assert main(["db", "init"]) == 1  # a reader may not create the schema's tables
    err = capsys.readouterr().err
    assert err.startswith("feedpipe: the database refused (InsufficientPrivilege): permission denied")
    assert len(err.strip().splitlines()) == 1 and "Traceback" not in err


def test_a_limit_beyond_any_rank_is_a_usage_error(capsys):
    with pytest.raises(SystemExit) as exited:
        main(["feed", "c1", "--limit", "99999999999999999999"])
    assert exited.value.code == 2
    assert "not a whole number of at most 2147483647: '99999999999999999999'" in capsys.readouterr().err


def test_a_customer_id_that_is_not_utf8_is_one_line(pg_url, monkeypatch, capsys):
    import os

    from feedpipe.publishing import publish_feed
    from feedpipe_tests.test_publishing import DAY, grid_feed

    publish_feed(pg_url, grid_feed(3, 2), feed_date=DAY, model_version="m0")
    monkeypatch.setenv("FEEDPIPE_DATABASE_URL", pg_url)
    # What Python makes of the argument bytes b"c\xff" from a Latin-1 shell.
    assert main(["feed", os.fsdecode(b"c\xff")]) == 2
    err = capsys.readouterr().err
    assert "feedpipe: an argument is not valid UTF-8 text" in err and "Traceback" not in err


def test_a_retention_of_0_is_refused_by_the_config_class():
    import pydantic

    from feedpipe.defs.feed import FeedConfig

    with pytest.raises(pydantic.ValidationError, match="retention"):
        FeedConfig(retention=0)
    assert FeedConfig(retention=1).retention == 1


def test_a_retention_of_0_fails_feedpipe_run_before_any_work(tmp_path, monkeypatch, capsys):
    from feedpipe import cli

    monkeypatch.setattr(cli, "prepare_environment", lambda: pytest.fail("database resolved for a refused config"))
    monkeypatch.setattr(cli, "_demo_directory", lambda feed_date: pytest.fail("demo data built for a refused config"))
    bad = tmp_path / "run.yaml"
    bad.write_text("ops: {ranked_feed: {config: {retention: 0}}}\n")
    assert main(["run", "--run-config", str(bad)]) == 2
    err = capsys.readouterr().err
    assert "does not fit the job's config" in err and "ranked_feed.retention: Input should be greater than or equal to 1" in err


def test_feed_prints_the_header_and_rows_of_one_version_when_a_publish_lands_between_the_reads(
    pg_url, monkeypatch, capsys
):
    import datetime as dt
    import threading
    import time

    from feedpipe import publishing
    from feedpipe.database import connect
    from feedpipe_tests.test_publishing import DAY, grid_feed

    publishing.publish_feed(pg_url, grid_feed(3, 2, tag="-v0"), feed_date=DAY, model_version="m0")
    monkeypatch.setenv("FEEDPIPE_DATABASE_URL", pg_url)
    real_read_feed, published = publishing.read_feed, {}

    def publish():
        published["result"] = publishing.publish_feed(pg_url, grid_feed(3, 2, tag="-v1"),
                                                      feed_date=DAY + dt.timedelta(days=1), model_version="m1")

    publisher = threading.Thread(target=publish)

    def read_after_a_publish(conn, customer, limit=None):
        publisher.start()
        with connect(pg_url, autocommit=True) as watcher:  # until it has switched, or waits on our reads
            while publisher.is_alive() and not watcher.execute(
                "SELECT count(*) FROM pg_stat_activity WHERE application_name = 'feedpipe' "
                "AND wait_event_type = 'Lock'"
            ).fetchone()[0]:
                time.sleep(0.02)
        return real_read_feed(conn, customer, limit=limit)

    monkeypatch.setattr(publishing, "read_feed", read_after_a_publish)
    assert main(["feed", "c1"]) == 0
    publisher.join(30)
    out = capsys.readouterr().out
    assert "(version 1, feed date 2024-03-01, model m0)" in out and "p0-v0" in out and "-v1" not in out
    assert published["result"].served  # and the publish went through once the reads were done


def test_a_run_config_that_is_not_utf8_or_not_a_mapping_of_mappings_is_one_line(tmp_path, capsys):
    from feedpipe.cli import main

    latin1 = tmp_path / "run.yaml"
    latin1.write_bytes("ops: {dlrm_model: {config: {epochs: 3}}}  # caf\xe9\n".encode("latin-1"))
    assert main(["run", "--run-config", str(latin1)]) == 2
    assert "is not UTF-8 text" in capsys.readouterr().err
    for text in ("ops: {ranked_feed: 3}\n", "ops: [ranked_feed]\n"):
        odd = tmp_path / "odd.yaml"
        odd.write_text(text)
        code = main(["run", "--run-config", str(odd)])
        assert code == 2, text
        assert "Traceback" not in capsys.readouterr().err


def test_report_json_carries_no_nan():
    """One class in the test half gives no AUC: JSON has null for it, not the NaN json.dumps writes by default."""
    import json

    from feedpipe.cli import _finite_or_null

    report = {"model": {"auc": float("nan"), "logloss": 0.25}, "ranking": {"dlrm": {"recall": float("inf")}}, "k": [1.0]}
    text = json.dumps(_finite_or_null(report), allow_nan=False)
    assert json.loads(text) == {"model": {"auc": None, "logloss": 0.25}, "ranking": {"dlrm": {"recall": None}}, "k": [1.0]}


def test_a_failed_check_that_did_not_stop_the_run_is_listed_with_what_it_says():
    import dagster as dg

    from feedpipe.cli import _failed_checks

    @dg.asset(check_specs=[dg.AssetCheckSpec("freshness", asset="tx"), dg.AssetCheckSpec("volume", asset="tx")])
    def tx():
        yield dg.Output(1)
        yield dg.AssetCheckResult(check_name="freshness", passed=False, severity=dg.AssetCheckSeverity.ERROR,
                                  description="the newest transaction is 3 days old", metadata={"age_days": 3})
        yield dg.AssetCheckResult(check_name="volume", passed=True)

    result = dg.materialize([tx])
    assert result.success
    assert _failed_checks(result) == ["  check tx.freshness failed (ERROR): the newest transaction is 3 days old"]


@pytest.mark.parametrize("ops, named", [
    ({"pair_scores": {"config": {"dtype": "fp16"}}}, "pair_scores.dtype"),
    ({"pair_scores": {"config": {"top_n": 0}}}, "pair_scores.top_n"),
    ({"ranked_feed": {"config": {"k": 200}}}, "ranked_feed.k: 200 is more than pair_scores.top_n (100)"),
    ({"model_evaluation": {"config": {"k": 0}}}, "model_evaluation.k"),
    ({"ranked_feed": {"config": {"k": 50}}}, "model_evaluation.k: 20 is not ranked_feed.k (50)"),
    ({"dlrm_model": {"config": {"preset": "bogus"}}}, "dlrm_model: Value error, training preset must be one of"),
    ({"dlrm_model": {"config": {"epochs": 0}}}, "dlrm_model: Value error, training config: epochs must be >= 1"),
    ({"training_examples": {"config": {"window_days": 0}}}, "training_examples: Value error, example config"),
    ({"transactions": {"config": {"max_rejected_fraction": 5}}}, "transactions: Value error, max_rejected_fraction"),
    ({"products": {"config": {"exempt_reasons": ["nope"]}}}, "products: Value error, exempt_reasons: unknown"),
    ({"vocabularies": {"config": {"min_count": -3}}}, "vocabularies.min_count"),
    ({"pair_scores": {"config": {"exclude_purchased": False}}},
     "model_evaluation.exclude_purchased: True is not pair_scores.exclude_purchased (False)"),
    ({"model_evaluation": {"config": {"exclude_window_days": 30}}},
     "model_evaluation.exclude_window_days: 30 is not pair_scores.exclude_window_days (90)"),
])
def test_config_mistakes_of_late_steps_are_refused_before_any_work(tmp_path, capsys, ops, named):
    import yaml

    from feedpipe.cli import main

    path = tmp_path / "run.yaml"
    path.write_text(yaml.safe_dump({"ops": ops}))
    assert main(["run", "--run-config", str(path)]) == 2
    err = capsys.readouterr().err
    assert named in err and "generating demo data" not in err


def test_run_checks_the_run_configs_own_database_and_data_directory_before_any_work(tmp_path, monkeypatch, capsys):
    """The early checks and the header used $FEEDPIPE_DATABASE_URL and --data whatever the run config's resources
    said: an unset url_env_var failed ranked_feed only after training, and the header named the wrong directory."""
    from feedpipe import cli

    connected = []
    monkeypatch.setattr(cli, "prepare_environment", lambda: "postgresql://u@storage-db/dagster")
    monkeypatch.setattr(cli, "connect", lambda url: connected.append(url) or type("C", (), {"close": lambda s: None})())
    monkeypatch.setattr(cli, "_demo_directory", lambda feed_date: pytest.fail("demo data built for a refused run"))
    monkeypatch.delenv("SHOP_FEED_DB_URL", raising=False)
    config = tmp_path / "run.yaml"
    config.write_text("resources: {database: {config: {url_env_var: SHOP_FEED_DB_URL}}}\n")
    assert main(["run", "--run-config", str(config)]) == 2
    err = capsys.readouterr().err
    assert "resources.database" in err and "SHOP_FEED_DB_URL" in err and "not set" in err

    monkeypatch.setenv("SHOP_FEED_DB_URL", "postgresql://feed:S3cretPw@feed-db/feeds")
    config.write_text("resources: {database: {config: {url_env_var: {env: SHOP_FEED_DB_URL}}}}\n")  # the value
    assert main(["run", "--run-config", str(config)]) == 2
    err = capsys.readouterr().err
    assert "NAME of an environment variable" in err and "S3cretPw" not in err

    missing = tmp_path / "no-such-dir"
    config.write_text(f"resources: {{database: {{config: {{url_env_var: SHOP_FEED_DB_URL}}}}, "
                      f"data: {{config: {{data_dir: '{missing}'}}}}}}\n")
    assert main(["run", "--run-config", str(config), "--data", str(tmp_path)]) == 2
    assert f"data directory {missing} does not exist" in capsys.readouterr().err
    assert connected[-1] == "postgresql://feed:S3cretPw@feed-db/feeds"  # the feed's database was reached first


@pytest.mark.parametrize("setting", ["volume_trailing_days: 0", "volume_max_change: -0.5", "max_age_days: -1"])
def test_an_input_check_setting_that_would_make_its_check_always_pass_fails_run_before_any_work(
        tmp_path, monkeypatch, capsys, setting):
    """At volume_trailing_days 0 the daily_volume check had no median and passed with 'n/a', whatever came in."""
    from feedpipe import cli

    monkeypatch.setattr(cli, "prepare_environment", lambda: pytest.fail("database resolved for a refused config"))
    bad = tmp_path / "run.yaml"
    bad.write_text(f"ops: {{transactions: {{config: {{{setting}}}}}}}\n")
    assert main(["run", "--run-config", str(bad)]) == 2
    err = capsys.readouterr().err
    assert "does not fit the job's config" in err and f"transactions.{setting.split(':')[0]}" in err
