from __future__ import annotations

import socket
from pathlib import Path

import pytest
import psycopg

from feedpipe.database import (
    DatabaseError,
    connect,
    feedpipe_home,
    redact_url,
    resolve_database_url,
    sqlalchemy_psycopg2_url,
)


def _closed_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]  # free once the socket closes: nothing listens there


def test_connect_error_names_redacted_url_and_never_the_password():
    url = f"postgresql://feeder:hunter2-s3cret@127.0.0.1:{_closed_port()}/feeds"
    with pytest.raises(DatabaseError) as caught:
        connect(url, connect_timeout=2)
    error = caught.value
    assert "postgresql://feeder:***@127.0.0.1" in str(error)
    assert error.url.startswith("postgresql://feeder:***@")
    rendered = f"{error!s} {error!r} {error.__cause__!r} {error.__context__!r}"
    assert "hunter2-s3cret" not in rendered
    assert error.__cause__ is None and error.__suppress_context__


def test_redact_url_hides_every_password_form():
    redacted = "postgresql://u:***@h:5432/db?sslmode=require"
    assert redact_url("postgresql://u:p%40ss@h:5432/db?sslmode=require") == redacted
    assert redact_url("postgresql://u@h/db?password=pw&x=1") == "postgresql://u@h/db?password=***&x=1"
    assert redact_url("host=h password='a b' user=u") == "host=h password=*** user=u"
    assert redact_url("postgresql://postgres@/postgres?host=/tmp/s") == "postgresql://postgres@/postgres?host=/tmp/s"
    assert redact_url("postgresql://u@h/db?sslpassword=keypass") == "postgresql://u@h/db?sslpassword=***"
    assert redact_url("host=h password=two words sslpassword=k user=u") == "host=h password=*** sslpassword=*** user=u"


@pytest.mark.parametrize("url, secrets", [
    ("postgresql://feeder:Sup3r%Secret@127.0.0.1:{port}/feeds", ["Sup3r", "Secret"]),  # '%' not percent-encoded
    ("host=127.0.0.1 port={port} user=feeder password=two words", ["two", "words"]),  # unquoted space
    ("postgresql://feeder@127.0.0.1:{port}/feeds?sslpassword=Key-s3cret&password=pw-s3cret", ["s3cret"]),
])
def test_a_url_that_does_not_parse_or_carries_other_secrets_never_shows_them(url, secrets):
    with pytest.raises(DatabaseError) as caught:
        connect(url.format(port=_closed_port()), connect_timeout=2)
    rendered = f"{caught.value!s} {caught.value.url}"
    assert "could not connect to" in rendered
    assert not [s for s in secrets if s in rendered], rendered


def test_sqlalchemy_url_uses_psycopg2_and_keeps_the_rest():
    assert sqlalchemy_psycopg2_url("postgresql://u:p@h:5/d?host=/s") == "postgresql+psycopg2://u:p@h:5/d?host=/s"
    assert sqlalchemy_psycopg2_url("postgres://u@h/d") == "postgresql+psycopg2://u@h/d"
    assert sqlalchemy_psycopg2_url("postgresql+psycopg://u@h/d") == "postgresql+psycopg2://u@h/d"
    with pytest.raises(DatabaseError, match=r"\*\*\*") as caught:
        sqlalchemy_psycopg2_url("mysql://u:secret@h/d")
    assert "secret" not in str(caught.value)


def test_a_keyword_dsn_and_a_multi_host_url_reach_dagsters_storage_too(pg_url):
    """`feedpipe run` hands Dagster a SQLAlchemy URL: the DSN forms libpq takes must survive the translation."""
    import sqlalchemy as sa
    from psycopg.conninfo import conninfo_to_dict

    p = {k: v for k, v in conninfo_to_dict(pg_url).items() if v}
    host, port = p.get("host", "127.0.0.1"), p.get("port", "5432")
    keyword = " ".join(f"{k}={v}" for k, v in p.items())
    # A second host that nothing listens on: libpq tries the first, which answers.
    forms = [keyword, " ".join(f"{k}={v}" for k, v in {**p, "host": f"{host},{host}", "port": f"{port},1"}.items()),
             " ".join(f"{k}={v}" for k, v in {**p, "host": f"{host},{host}", "port": port}.items())]  # one port for both
    if not host.startswith("/"):  # a socket directory cannot be written in a URL's host list
        forms.append(f"postgresql://{p.get('user', 'postgres')}@{host}:{port},{host}:1/{p['dbname']}")
    for dsn in forms:
        engine = sa.create_engine(sqlalchemy_psycopg2_url(dsn))
        try:
            with engine.connect() as conn:
                assert conn.execute(sa.text("select current_database()")).scalar() == p["dbname"], dsn
        finally:
            engine.dispose()


def test_explicit_database_url_wins_and_home_defaults_to_dot_feedpipe(tmp_path, monkeypatch):
    assert resolve_database_url({"FEEDPIPE_DATABASE_URL": "postgresql://x@y/z"}) == "postgresql://x@y/z"
    monkeypatch.chdir(tmp_path)
    assert feedpipe_home({}) == tmp_path.resolve() / ".feedpipe"
    assert feedpipe_home({"FEEDPIPE_HOME": "rel"}) == tmp_path.resolve() / "rel"


def test_url_connects_with_psycopg_and_sqlalchemy_psycopg2(pg_url):
    import sqlalchemy as sa

    with connect(pg_url) as conn:
        assert conn.execute("select 1").fetchone() == (1,)
    engine = sa.create_engine(sqlalchemy_psycopg2_url(pg_url))
    try:
        with engine.connect() as conn:
            assert conn.execute(sa.text("select 1")).scalar() == 1
            assert engine.dialect.driver == "psycopg2"
    finally:
        engine.dispose()


def test_embedded_server_outlives_its_handle_until_stopped(tmp_path: Path):
    from feedpipe.database import stop_embedded_server

    home = tmp_path / "home"
    url = resolve_database_url({"FEEDPIPE_HOME": str(home)})
    try:
        assert url.startswith("postgresql://postgres@/postgres?host=")
        assert (home / "pgdata" / "PG_VERSION").exists()
        with connect(url) as conn:
            assert conn.execute("select current_database()").fetchone() == ("postgres",)
        assert resolve_database_url({"FEEDPIPE_HOME": str(home)}) == url  # found running, not restarted
    finally:
        assert stop_embedded_server(home) is True
    assert stop_embedded_server(home) is False
    with pytest.raises(DatabaseError):
        connect(url, connect_timeout=2)


@pytest.mark.parametrize("url", [
    "postgresql://postgres:pa#Sekr1t@127.0.0.1/feed",  # '#': urlsplit reads a fragment, libpq a password
    "postgresql://u:pa?Sekr1t@h/db",
    "postgresql://u@h/db?%70assword=Sekr1t",  # a percent-encoded parameter name
    "postgresql://u@h/db?password=ab#Sekr1t",
    "postgresql://u:Se[kr1t@h/db",  # urlsplit raises on the '['
    "postgresql://u:Sekr1t@[::1/db",  # neither parses it
])
def test_redact_url_never_shows_a_password_libpq_would_read_and_never_raises(url):
    from psycopg.conninfo import conninfo_to_dict

    shown = redact_url(url)
    assert "Sekr1t" not in shown
    try:
        read = conninfo_to_dict(shown)
    except psycopg.Error:
        return
    assert read.get("password") in (None, "***")


@pytest.mark.parametrize("value", ["", "  "])
def test_a_set_but_empty_database_url_is_refused_not_read_as_embedded(value, tmp_path):
    """An empty secret would otherwise publish into an embedded server nobody reads, and report success."""
    from feedpipe.database import DATABASE_URL_ENV, HOME_ENV, DatabaseError, resolve_database_url

    with pytest.raises(DatabaseError, match=f"{DATABASE_URL_ENV} is set but empty"):
        resolve_database_url({DATABASE_URL_ENV: value, HOME_ENV: str(tmp_path)})
    assert not (tmp_path / "pgdata").exists()  # no embedded server was started


# A raw '/', '@' or '&' inside a password: libpq and urlsplit cut the password there and read the rest as the
# host, port, database or a parameter, so neither parser sees a password to hide.
UNENCODED_PASSWORD_URLS = [
    ("postgresql://postgres:Sx9q/Kr7Et@127.0.0.1:{port}/db", "postgresql://postgres:***@127.0.0.1:{port}/db"),
    ("postgresql://postgres:Sx9q@Kr7Et@127.0.0.1:{port}/db", "postgresql://postgres:***@127.0.0.1:{port}/db"),
    ("postgresql://postgres@127.0.0.1:{port}/db?password=Sx9q&Kr7Et",
     "postgresql://postgres@127.0.0.1:{port}/db?password=***"),
    ("postgresql://postgres@127.0.0.1:{port}/db?password=Sx9q&Kr7Et&sslmode=disable",
     "postgresql://postgres@127.0.0.1:{port}/db?password=***&sslmode=disable"),
]


@pytest.mark.parametrize("url, redacted", UNENCODED_PASSWORD_URLS)
def test_a_password_with_an_unencoded_slash_at_or_ampersand_is_redacted_whole(url, redacted):
    port = _closed_port()
    assert redact_url(url.format(port=port)) == redacted.format(port=port)
    with pytest.raises(DatabaseError) as caught:
        connect(url.format(port=port), connect_timeout=2)
    rendered = f"{caught.value!s} {caught.value!r} {caught.value.url}"
    assert rendered.startswith(f"could not connect to {redacted.format(port=port)}")
    assert "Sx9q" not in rendered and "Kr7Et" not in rendered, rendered


def test_an_at_sign_in_the_query_does_not_end_the_user_info():
    assert redact_url("postgresql://u:pw@h/db?host=/tmp/a@b&password=x&y") == (
        "postgresql://u:***@h/db?host=/tmp/a@b&password=***"
    )


@pytest.mark.parametrize("url", [
    "postgresql://db:5432/feed?user=app&password=Sx9q@Kr7EtTail",  # no user info; an '@' inside the password
    "postgresql://[::1]:5432/db?password=Sx9q@Kr7EtTail",
    "postgresql://127.0.0.1:1/feed?user=me@corp&password=Sx9qKr7EtTail&connect_timout=3",  # libpq refuses it
])
def test_an_at_sign_before_or_inside_a_query_password_never_shows_it(url):
    shown = redact_url(url)
    assert "Sx9q" not in shown and "Kr7Et" not in shown and "Tail" not in shown, shown
    with pytest.raises(DatabaseError) as caught:
        connect(url, connect_timeout=2)
    rendered = f"{caught.value!s} {caught.value!r} {caught.value.url}"
    assert "Sx9q" not in rendered and "Kr7Et" not in rendered and "Tail" not in rendered, rendered
