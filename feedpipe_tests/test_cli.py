"""Bad command-line arguments end in a usage message and exit status 2, never a traceback."""

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
