"""`feedpipe ui` starts the Dagster webserver on the same instance, with the job and schedule loaded."""

import json
import os
import signal
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

FEEDPIPE = str(Path(sys.executable).parent / "feedpipe")
QUERY = (
    "{ workspaceOrError { ... on Workspace { locationEntries { locationOrLoadError { __typename "
    "... on RepositoryLocation { repositories { jobs { name } schedules { name cronSchedule } } } } } } } }"
)


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_ui_serves_the_nightly_job_and_its_schedule(tmp_path, pg_url):
    env = {k: v for k, v in os.environ.items() if k not in ("DAGSTER_HOME", "FEEDPIPE_DAGSTER_STORAGE_URL")}
    env.update(FEEDPIPE_HOME=str(tmp_path / "home"), FEEDPIPE_DATABASE_URL=pg_url, FEEDPIPE_DATA_DIR=str(tmp_path))
    port = _free_port()
    proc = subprocess.Popen(
        [FEEDPIPE, "ui", "--port", str(port)], env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
        start_new_session=True,  # dagster dev starts children: stop the whole group
    )
    try:
        body, deadline = None, time.monotonic() + 120
        while time.monotonic() < deadline and body is None:
            time.sleep(1)
            try:
                req = urllib.request.Request(
                    f"http://127.0.0.1:{port}/graphql", data=json.dumps({"query": QUERY}).encode(),
                    headers={"Content-Type": "application/json"},
                )
                body = json.loads(urllib.request.urlopen(req, timeout=5).read())
                entry = body["data"]["workspaceOrError"]["locationEntries"][0]["locationOrLoadError"]
                if entry["__typename"] != "RepositoryLocation":
                    body = None  # still loading
            except OSError:
                continue
        assert body is not None, "the webserver did not answer within 120 s"
        repo = entry["repositories"][0]
        assert "nightly_feed" in {j["name"] for j in repo["jobs"]}
        assert {"name": "nightly_feed_0200", "cronSchedule": "0 2 * * *"} in repo["schedules"]
    finally:
        os.killpg(proc.pid, signal.SIGTERM)
        try:
            proc.wait(timeout=30)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)


def test_the_uis_runs_read_the_given_data_or_the_environments_or_the_demo_data(tmp_path, monkeypatch):
    """The schedule and the launchpad's runs read FEEDPIPE_DATA_DIR: `feedpipe ui` sets it as `feedpipe run` does."""
    from feedpipe import cli

    started = []
    monkeypatch.setattr(cli, "prepare_environment", lambda: None)
    monkeypatch.setattr(cli.os, "execv", lambda path, argv: started.append(argv))
    monkeypatch.setattr(cli.os, "chdir", lambda path: None)
    monkeypatch.setattr(cli, "_demo_directory", lambda feed_date: tmp_path / "demo")
    (tmp_path / "demo").mkdir()
    (tmp_path / "mine").mkdir()
    for key in ("FEEDPIPE_DATA_DIR", "FEEDPIPE_INPUT_CONFIG"):
        monkeypatch.delenv(key, raising=False)

    assert cli.main(["ui"]) == 0 and os.environ["FEEDPIPE_DATA_DIR"] == str(tmp_path / "demo")
    monkeypatch.setenv("FEEDPIPE_DATA_DIR", "/srv/nightly")
    assert cli.main(["ui"]) == 0 and os.environ["FEEDPIPE_DATA_DIR"] == "/srv/nightly"  # the deployment's, kept
    assert cli.main(["ui", "--data", str(tmp_path / "mine")]) == 0
    assert os.environ["FEEDPIPE_DATA_DIR"] == str(tmp_path / "mine") and len(started) == 3
    assert cli.main(["ui", "--data", str(tmp_path / "absent")]) == 2
