"""The database URL, defined once: where it comes from, how it is shown, how to connect with it.

`FEEDPIPE_DATABASE_URL` names a server when set. Otherwise feedpipe runs an embedded PostgreSQL (the `pgserver`
pip package) whose data directory is `<feedpipe home>/pgdata`; it keeps running after the process that started it
exits, so `psql "$(feedpipe db-url)"` works between runs, and `stop_embedded_server()` stops it.

Every URL that reaches a log line, an exception or Dagster metadata goes through `redact_url()` first.
"""

from __future__ import annotations

import atexit
import logging
import os
import platform
import re
import warnings
from collections.abc import Mapping
from pathlib import Path
from urllib.parse import quote, unquote, urlencode

import psycopg
from psycopg.conninfo import conninfo_to_dict

logger = logging.getLogger(__name__)

DATABASE_URL_ENV = "FEEDPIPE_DATABASE_URL"
HOME_ENV = "FEEDPIPE_HOME"
DEFAULT_HOME = ".feedpipe"
PGDATA_DIR = "pgdata"

# libpq's default port: the embedded server listens on a Unix socket named after it.
_DEFAULT_PORT = 5432
_REDACTED = "***"
_URL_SCHEME = re.compile(r"^(postgres|postgresql)(\+[a-z0-9_]+)?://", re.IGNORECASE)
# Any URL, redacted alike: a mistaken scheme must not show its password either.
_ANY_SCHEME = re.compile(r"^[A-Za-z][A-Za-z0-9+.-]*://")
# Where a query starts: '?' and a parameter name (a '?' with no '=' after it may sit inside a password).
_QUERY_START = re.compile(r"\?[\w%.-]+=")
# One query parameter: its value runs to the next '&name=' (a libpq keyword or any other), as a raw '&' may
# sit inside a password. Every libpq parameter that holds a secret ends in "password" (password, sslpassword).
_QUERY_PARAM = re.compile(r"(?:(?<=\?)|&)([^&=]+)=(.*?)(?=&[\w%.-]+=|\Z)", re.DOTALL)
# A password parameter whose value is anything but the redaction mark: the last check of what is shown.
_UNREDACTED_PASSWORD = re.compile(r"password\s*=\s*(?!\*\*\*(?:&|\s|$))\S", re.IGNORECASE)
# Where libpq may cut a password into the pieces it then reads as a host, port, database or parameter.
_PASSWORD_CUTS = re.compile(r"[/@?#&:\s]+")
# A quoted value, or everything up to the next "key=": in a DSN that does not parse, an unquoted space
# may sit inside the password.
_KEYWORD_PASSWORD = re.compile(r"(\b\w*password\s*=\s*)('(?:[^'\\]|\\.)*'|\S+(?:\s+(?!\w+\s*=)\S+)*)",
                               re.IGNORECASE)


class DatabaseError(RuntimeError):
    """The database could not be reached or used; the message names the server by its redacted URL."""

    def __init__(self, message: str, url: str | None = None):
        super().__init__(message)
        self.url = redact_url(url) if url is not None else None


def feedpipe_home(environ: Mapping[str, str] = os.environ) -> Path:
    """`FEEDPIPE_HOME`, or `./.feedpipe` of the working directory, as an absolute path (not created here)."""
    return Path(environ.get(HOME_ENV) or DEFAULT_HOME).expanduser().resolve()


def resolve_database_url(environ: Mapping[str, str] = os.environ) -> str:
    """The libpq URL feedpipe uses: `FEEDPIPE_DATABASE_URL`, else the embedded server's (started if needed)."""
    url = environ.get(DATABASE_URL_ENV)
    if url is not None and not url.strip():
        # An empty secret (a missing key in a mounted secret, say) would otherwise publish into an embedded
        # server nobody reads, and report success.
        raise DatabaseError(f"{DATABASE_URL_ENV} is set but empty: set it to the feed database's URL, or unset "
                            "it to use the embedded server")
    if url:
        return url
    return _embedded_server_url(feedpipe_home(environ))


def _embedded_server_url(home: Path) -> str:
    home.mkdir(parents=True, exist_ok=True)
    # cleanup_mode=None: the server outlives this process, so psql and the next run find it up.
    return embedded_server_url(home / PGDATA_DIR, cleanup_mode=None)


def import_pgserver():
    """The `pgserver` module, imported without its platformdirs noise.

    pgserver resolves a runtime directory at import; where `XDG_RUNTIME_DIR` is unset (containers, cron, sudo)
    platformdirs warns about the fallback on every CLI call, though pgserver never uses that directory for anything
    a user must act on. Imported lazily: unneeded when FEEDPIPE_DATABASE_URL names a server.
    """
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message="XDG_RUNTIME_DIR")
        import pgserver
        import pgserver.postgres_server
        import pgserver.utils
    return pgserver


def embedded_server_url(pgdata: Path | str, *, cleanup_mode: str | None = None) -> str:
    """Start (or find running) the pgserver instance of `pgdata` and return its libpq URL.

    `cleanup_mode` is pgserver's: None leaves the server running at exit, 'stop' stops it, 'delete' also removes
    `pgdata` (what a test session wants).
    """
    pgserver = import_pgserver()
    server = pgserver.get_server(Path(pgdata), cleanup_mode=cleanup_mode)
    info = server.get_postmaster_info()
    if info.socket_dir is None:  # Windows: pgserver listens on TCP there
        return f"postgresql://postgres@{info.hostname}:{info.port}/postgres"
    # pgserver's own get_uri() gives `postgres:@/postgres?host=...` with the socket path unquoted; a path with a space
    # or '&' would break it, so build the URL here.
    url = f"postgresql://postgres@/postgres?host={quote(str(info.socket_dir), safe='/')}"
    if info.port and info.port != _DEFAULT_PORT:
        url += f"&port={info.port}"
    logger.debug("embedded PostgreSQL at %s (pgdata %s)", url, pgdata)
    return url


def stop_embedded_server(home: Path | str | None = None) -> bool:
    """Stop the embedded server of `home` (default: `feedpipe_home()`); True if one was running."""
    pgserver = import_pgserver()
    PostgresServer = pgserver.postgres_server.PostgresServer
    PostmasterInfo = pgserver.utils.PostmasterInfo

    pgdata = (Path(home).expanduser().resolve() if home is not None else feedpipe_home()) / PGDATA_DIR
    info = PostmasterInfo.read_from_pgdata(pgdata) if pgdata.exists() else None
    # pgserver caches one handle per pgdata in-process and would hand back the stopped server's URL: forget it, and
    # its exit hook, which would otherwise fail on the missing cache entry.
    cached = PostgresServer._instances.pop(pgdata, None)
    if cached is not None:
        atexit.unregister(cached._cleanup)
    if info is None or not info.is_running():
        return False
    # As root, pgserver runs postgres as its own `pgserver` system user; pg_ctl must run as that user too.
    user = "pgserver" if platform.system() != "Windows" and os.geteuid() == 0 else None
    pgserver.pg_ctl(["-w", "-m", "fast", "stop"], pgdata=pgdata, user=user)
    logger.info("stopped embedded PostgreSQL (pgdata %s)", pgdata)
    return True


def sqlalchemy_psycopg2_url(url: str) -> str:
    """`url` with the `postgresql+psycopg2://` scheme, for Dagster's run storage.

    SQLAlchemy 2.1 maps a bare `postgresql://` to psycopg 3, under which dagster-postgres fails on its
    `NOTIFY run_events, $1`; psycopg2 interpolates parameters client-side and works.
    A key=value DSN, or a URL naming several hosts (which SQLAlchemy's URL parser cannot read), becomes
    libpq's own parameters in the query of an empty URL; psycopg2 passes them to libpq as they are.
    """
    try:  # libpq knows no "+driver" in a scheme
        params = {k: v for k, v in conninfo_to_dict(_URL_SCHEME.sub("postgresql://", url, count=1)).items()
                  if v is not None}
    except (psycopg.Error, TypeError, ValueError):
        raise DatabaseError(f"the database URL {redact_url(url)} does not parse (special characters in a password "
                            "must be percent-encoded, e.g. % as %25)", url) from None
    hosts = params.get("host", "").split(",")
    if _URL_SCHEME.match(url) and len(hosts) == 1:
        return _URL_SCHEME.sub("postgresql+psycopg2://", url, count=1)
    if len(hosts) > 1 and "," not in params.get("port", ","):  # libpq: one port for every host; SQLAlchemy: one each
        params["port"] = ",".join([params.get("port", str(_DEFAULT_PORT))] * len(hosts))
    return "postgresql+psycopg2:///?" + urlencode(params)


def redact_url(url: str) -> str:
    """`url` with any password (in the user info, a `password=` query parameter or a key=value DSN) as `***`.

    Never raises, and never returns a string from which libpq would read a password. The URL's own text is
    redacted (see `_secret_spans`: a raw '/', '@', '?', '#' or '&' in a password is hidden too, though libpq
    would cut the password there); where libpq's reading of that still shows a password (a percent-encoded
    parameter name, say) the URL is rebuilt from libpq's reading of the original.
    """
    try:
        params = {k: v for k, v in conninfo_to_dict(url).items() if v is not None}
    except (psycopg.Error, TypeError, ValueError):
        params = None
    shown = _redacted_text(url)
    if params is not None and _shows_a_password(shown, params):
        shown = _rebuilt_url(params)
    if _UNREDACTED_PASSWORD.search(shown):  # a reading neither rule foresaw: show nothing rather than a secret
        return "<a database URL with a password, not shown>"
    return shown


def redact_message(message: str, url: str) -> str:
    """`message` (a driver's or server's error) without any secret of `url` that it may quote.

    libpq quotes what it read as the host, port or database name, which is a piece of the password when the
    password holds an unencoded '/' or '@': so every piece of every candidate password is scrubbed too.
    """
    text = _KEYWORD_PASSWORD.sub(rf"\g<1>{_REDACTED}", message)
    for secret in sorted(_candidate_secrets(url), key=len, reverse=True):
        text = text.replace(secret, _REDACTED)
    for piece in sorted(_secret_pieces(url), key=len, reverse=True):
        # Bounded, so a short piece does not blank every word it occurs in; libpq splits at the same
        # characters, so a piece it quotes is bounded by one of them or by the quote.
        text = re.sub(rf"(?<![A-Za-z0-9]){re.escape(piece)}(?![A-Za-z0-9])", _REDACTED, text)
    return text


def _candidate_secrets(url: str) -> set[str]:
    """Every password of `url` as its text spells it and as libpq reads it, raw and percent-decoded."""
    found = {url[start:end] for start, end in _secret_spans(url)}
    try:
        found |= {v for k, v in conninfo_to_dict(url).items() if k.endswith("password") and v}
    except (psycopg.Error, TypeError, ValueError):
        pass
    found |= {unquote(s) for s in found}
    return {s.strip("'") for s in found if s.strip("'") and s != _REDACTED}


def _secret_pieces(url: str) -> set[str]:
    return {p for s in _candidate_secrets(url) for p in _PASSWORD_CUTS.split(s) if p} - {_REDACTED}


def _shows_a_password(shown: str, params: Mapping[str, str]) -> bool:
    secrets = [v for k, v in params.items() if k.endswith("password") and v and v != _REDACTED]
    if any(s in shown for s in secrets):
        return True
    try:
        read = conninfo_to_dict(shown)
    except (psycopg.Error, TypeError, ValueError):
        return False
    return any(k.endswith("password") and v not in (None, "", _REDACTED) for k, v in read.items())


def _rebuilt_url(params: Mapping[str, str]) -> str:
    """A postgresql:// URL of libpq's parameters with every password as `***`."""
    user = quote(params.get("user", ""), safe="")
    userinfo = f"{user}:{_REDACTED}@" if params.get("password") else (f"{user}@" if user else "")
    host = params.get("host", "")
    netloc = userinfo + ("" if host.startswith("/") else quote(host, safe=":[],"))
    if params.get("port"):
        netloc += f":{params['port']}"
    query = [(k, _REDACTED if k.endswith("password") else v) for k, v in params.items()
             if k not in ("user", "password", "port", "dbname") and not (k == "host" and not host.startswith("/"))]
    tail = "&".join(f"{k}={v if v == _REDACTED else quote(v, safe='/')}" for k, v in query)
    return f"postgresql://{netloc}/{quote(params.get('dbname', ''), safe='')}" + (f"?{tail}" if tail else "")


def _redacted_text(url: str) -> str:
    shown, last = [], 0
    for start, end in _secret_spans(url):
        shown += [url[last:start], _REDACTED]
        last = end
    return "".join(shown) + url[last:]


def _secret_spans(url: str) -> list[tuple[int, int]]:
    """Where the passwords sit in `url`'s text, in order, merged over the two ways the text can be meant.

    libpq and urlsplit both end the user info at the first '/' (libpq also at the first '@'), so a password
    holding either is, to them, a host, port or path. A person may have meant either of two things, and both
    readings are redacted (their spans merged), the price of never under-redacting:
    - user info first: the password runs from `scheme://user:` to the last '@' before the query (the first
      `?name=` after the first '@'), and the query follows that '@';
    - query first: the query starts at the first `?name=`, and only an '@' before it ends a user info.
    A `password=` query value runs to the next `&name=` or the end.
    """
    scheme = _ANY_SCHEME.match(url)
    if scheme is None:
        return [m.span(2) for m in _KEYWORD_PASSWORD.finditer(url)]
    base = scheme.end()
    rest = url[base:]
    spans = []
    first_at = rest.find("@")
    after_user = _QUERY_START.search(rest, first_at + 1) if first_at >= 0 else None
    first_query = _QUERY_START.search(rest)
    for query_start in (after_user.start() if after_user else len(rest), first_query.start() if first_query else len(rest)):
        last_at = rest.rfind("@", 0, query_start)
        colon = rest.find(":", 0, last_at) if last_at >= 0 else -1
        if 0 <= colon < last_at - 1:
            spans.append((colon + 1, last_at))
        query = rest.find("?", last_at + 1) if query_start == len(rest) else query_start
        if query >= 0:
            for m in _QUERY_PARAM.finditer(rest, query + 1):
                if unquote(m.group(1)).lower().endswith("password") and m.group(2):
                    spans.append(m.span(2))
    merged: list[list[int]] = []
    for start, end in sorted(spans):
        if merged and start <= merged[-1][1]:
            merged[-1][1] = max(merged[-1][1], end)
        else:
            merged.append([start, end])
    return [(base + start, base + end) for start, end in merged]


def connect(url: str, **kwargs) -> psycopg.Connection:
    """A psycopg 3 connection to `url`; keyword arguments go to `psycopg.connect` (e.g. `autocommit=True`).

    Any failure to connect raises `DatabaseError` naming the redacted URL. The original exception is not chained:
    a traceback printer or Dagster's error serializer must never have a path to the password.
    """
    try:
        params = conninfo_to_dict(url)
    except psycopg.Error:
        # libpq's parse errors quote the offending text, which may be the password itself (a '%' that is
        # not percent-encoded, an unquoted space): say what to check instead of repeating it.
        message = (f"could not connect to {redact_url(url)}: the database URL does not parse (special "
                   "characters in a password must be percent-encoded, e.g. % as %25)")
        raise DatabaseError(message, url) from None
    try:
        kwargs.setdefault("application_name", "feedpipe")
        # The feed's binary COPY sends ids as UTF-8 bytes; a LATIN1 database's default client encoding
        # would store them garbled.
        kwargs.setdefault("client_encoding", "utf8")
        if "connect_timeout" not in params:
            kwargs.setdefault("connect_timeout", 10)
        return psycopg.connect(url, **kwargs)
    except psycopg.Error as exc:
        message = f"could not connect to {redact_url(url)}: {redact_message(str(exc).strip(), url)}"
    raise DatabaseError(message, url) from None
