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
