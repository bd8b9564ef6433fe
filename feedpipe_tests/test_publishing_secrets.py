"""The database URL's password never reaches logs, stdout/stderr, exceptions or Dagster metadata and events."""

from __future__ import annotations

import datetime as dt
import logging
import socket
import traceback
import uuid
from urllib.parse import quote, urlsplit, urlunsplit

import dagster as dg
import polars as pl
import pytest
from psycopg import sql

from feedpipe.database import DATABASE_URL_ENV, DatabaseError, connect
from feedpipe.publishing import PUBLISH_LOCK_KEY, PublishLockTimeout, publish_feed
from feedpipe_tests.test_publishing import grid_feed

DAY = dt.date(2024, 3, 1)
# '/' and '@' must be percent-encoded in a URL: both the raw and the encoded spelling must stay hidden.
PASSWORD = "Sekr1t/p@ss-" + uuid.uuid4().hex[:8]
PASSWORD_FORMS = (PASSWORD, quote(PASSWORD, safe=""))


def _closed_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _with_user(url: str, user: str, password: str) -> str:
    parts = urlsplit(url)
    host = parts.netloc.rpartition("@")[2]
    netloc = f"{quote(user, safe='')}:{quote(password, safe='')}@{host}"
    return urlunsplit((parts.scheme, netloc, parts.path, parts.query, parts.fragment))


def assert_no_password(*texts: str) -> None:
    for text in texts:
        for form in PASSWORD_FORMS:
            assert form not in text, f"password ({form!r}) leaked in: {text[:2000]}"


def rendered(exc: BaseException) -> str:
    return "".join(traceback.format_exception(exc)) + repr(exc) + repr(getattr(exc, "url", ""))


@pytest.fixture
def password_url(pg_url):
    """`pg_url` as a login role with a password (the password is checked under any auth method, unused under trust)."""
    role = f"feedpipe_pw_{uuid.uuid4().hex[:10]}"
    dbname = urlsplit(pg_url).path.lstrip("/")
    with connect(pg_url, autocommit=True) as admin:
        admin.execute(sql.SQL("CREATE ROLE {} LOGIN PASSWORD {}").format(sql.Identifier(role), sql.Literal(PASSWORD)))
        admin.execute(sql.SQL("GRANT CREATE ON DATABASE {} TO {}").format(sql.Identifier(dbname), sql.Identifier(role)))
    try:
        yield _with_user(pg_url, role, PASSWORD)
    finally:
        with connect(pg_url, autocommit=True) as admin:
            admin.execute(
                "SELECT pg_terminate_backend(pid) FROM pg_stat_activity WHERE usename = %s AND pid <> pg_backend_pid()",
                [role],
            )
            admin.execute(sql.SQL("DROP OWNED BY {}").format(sql.Identifier(role)))
            admin.execute(sql.SQL("DROP ROLE {}").format(sql.Identifier(role)))


def test_publish_and_its_failures_never_show_the_password(password_url, caplog, capfd):
    caplog.set_level(logging.DEBUG)  # every logger, psycopg's included
    errors: list[BaseException] = []

    publish_feed(password_url, grid_feed(4, 3, tag="-v0"), feed_date=DAY, model_version="m0")
    # retention=1: a retired table is dropped, so every log line of a successful publish is exercised.
    publish_feed(password_url, grid_feed(4, 3, tag="-v1"), feed_date=DAY, model_version="m1", retention=1)
    with connect(password_url, autocommit=True) as holder:
        holder.execute("SELECT pg_advisory_lock(%s)", [PUBLISH_LOCK_KEY])
        with pytest.raises(PublishLockTimeout) as locked:
            publish_feed(password_url, grid_feed(4, 3), feed_date=DAY, model_version="m2", publish_lock_wait_s=0.2)
        errors.append(locked.value)
    unreachable = _with_user(f"postgresql://127.0.0.1:{_closed_port()}/feeds", "u", PASSWORD)
    with pytest.raises(DatabaseError) as refused:
        publish_feed(unreachable, grid_feed(4, 3), feed_date=DAY, model_version="m2")
    errors.append(refused.value)

    captured = capfd.readouterr()
    assert_no_password(caplog.text, captured.out, captured.err, *map(rendered, errors))
    assert "published feedpipe.feed_v" in caplog.text  # the log lines checked are really there
    assert ":***@" in str(locked.value) and ":***@127.0.0.1" in str(refused.value)


def test_ranked_feed_resource_config_metadata_and_failures_never_show_the_password(
    password_url, monkeypatch, caplog, capfd, tmp_path
):
    from feedpipe.defs.feed import ranked_feed
    from feedpipe.defs.partitions import feed_date_partitions
    from feedpipe.defs.resources import ArtifactsResource, DatabaseResource
    from feedpipe.training import TrainedModel

    caplog.set_level(logging.DEBUG)
    scores = pl.DataFrame(
        {"customer_id": ["c1", "c1", "c2"], "product_id": ["p1", "p2", "p1"], "rank": [1, 2, 1],
         "score": [0.9, 0.5, 0.7]},
        schema={"customer_id": pl.Utf8, "product_id": pl.Utf8, "rank": pl.Int32, "score": pl.Float32},
    )
    # ranked_feed reads only the model's version; the rest of a TrainedModel is irrelevant here.
    model = TrainedModel(model=None, customer_specs=[], product_specs=[], vocabularies=None, version="m-test")
    upstream = {"pair_scores": scores, "dlrm_model": model}

    class UpstreamValues(dg.IOManager):
        def handle_output(self, context, obj):
            raise AssertionError("ranked_feed writes Postgres, not the IO manager")

        def load_input(self, context):
            return upstream[context.asset_key.path[-1]]

    database = DatabaseResource()
    # The resource config, which the launchpad and the run record show, names the variable, never the URL.
    assert database.model_dump() == {"url_env_var": DATABASE_URL_ENV}

    def materialize(url: str):
        monkeypatch.setenv(DATABASE_URL_ENV, url)
        return dg.materialize(
            [ranked_feed, *(dg.SourceAsset(key, partitions_def=feed_date_partitions) for key in upstream)],
            partition_key=DAY.isoformat(),
            resources={"database": database, "io_manager": UpstreamValues(),
                       "artifacts": ArtifactsResource(root=str(tmp_path / "artifacts"))},
            instance=instance,
            raise_on_error=False,
        )

    instance = dg.DagsterInstance.ephemeral()
    ok = materialize(password_url)
    unreachable = _with_user(f"postgresql://127.0.0.1:{_closed_port()}/feeds", "u", PASSWORD)
    failed = materialize(unreachable)

    assert ok.success and not failed.success
    metadata = ok.asset_materializations_for_node("ranked_feed")[0].metadata
    assert metadata["dagster/row_count"].value == 3
    events = [repr(e) for run in (ok, failed) for e in instance.all_logs(run.run_id)]
    failure = next(e for e in failed.all_events if e.is_step_failure).step_failure_data.error
    captured = capfd.readouterr()
    assert_no_password(repr(metadata), *events, caplog.text, captured.out, captured.err)
    assert ":***@127.0.0.1" in failure.to_string()  # the operator still learns which server failed


def test_a_named_database_variable_that_is_unset_fails_instead_of_falling_back(monkeypatch):
    from feedpipe.defs.resources import DatabaseResource

    monkeypatch.setenv(DATABASE_URL_ENV, "postgresql://u@staging-db/feeds")
    monkeypatch.delenv("SHOP_FEED_DB_URL", raising=False)
    with pytest.raises(dg.Failure, match="SHOP_FEED_DB_URL"):
        DatabaseResource(url_env_var="SHOP_FEED_DB_URL").url()
    monkeypatch.setenv("SHOP_FEED_DB_URL", "postgresql://u@prod-db/feeds")
    assert DatabaseResource(url_env_var="SHOP_FEED_DB_URL").url() == "postgresql://u@prod-db/feeds"
    assert DatabaseResource().url() == "postgresql://u@staging-db/feeds"


def test_a_url_given_where_a_variable_name_belongs_is_refused_without_repeating_it(monkeypatch, tmp_path):
    """`url_env_var: {env: SHOP_FEED_DB_URL}` (Dagster's way with secrets) hands the resource the URL itself; the
    message quoted it, password and all, into the console and the run's stored events. The same for the input
    config's `url_env`."""
    from feedpipe.defs.resources import DatabaseResource
    from feedpipe.input_config import InputConfigError, load_input_config

    secret = "postgresql://feed:S3cretPw@db.internal:5432/feeds"
    monkeypatch.setenv("SHOP_FEED_DB_URL", secret)
    result = dg.materialize(
        [_uses_database], resources={"database": DatabaseResource(url_env_var=dg.EnvVar("SHOP_FEED_DB_URL"))},
        instance=dg.DagsterInstance.ephemeral(), raise_on_error=False,
    )
    (failure,) = result.get_step_failure_events()
    message = failure.step_failure_data.error.message
    assert "NAME of an environment variable" in message and "S3cretPw" not in message
    stored = [str(e) for e in result.all_events]
    assert not [e for e in stored if "S3cretPw" in e]

    config = tmp_path / "input.yaml"
    config.write_text(f"source:\n  postgres:\n    url_env: '{secret}'\n    transactions: {{table: orders}}\n"
                      "    customers: {table: customers}\n    products: {table: products}\n")
    with pytest.raises(InputConfigError, match="not the URL itself") as err:
        load_input_config(config)
    assert "S3cretPw" not in str(err.value)


@dg.asset(required_resource_keys={"database"})
def _uses_database(context) -> None:
    context.resources.database.url()
