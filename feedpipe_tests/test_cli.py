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
