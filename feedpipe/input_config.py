"""The optional YAML config that tells the loader how to read the attribute columns of the input tables.

Schema (every key optional; an empty or absent file means "infer everything"):

```yaml
delimiter: "|"            # splits multi-valued text columns into lists (default "|")
customers:
  exclude: [email]         # columns dropped on load (never features)
  roles: {zip: categorical}  # dense | categorical | multi_categorical; overrides the role inferred from the dtype
  multi_valued: [segments]  # text columns split by `delimiter` into lists (same as role multi_categorical)
products:
  multi_valued: [tags]
  roles: {price: dense}
```

The tables come from the data directory unless a `source` section names a Postgres database (see
`PostgresSource`): each table is a table (optionally in a schema) or a SQL query, and `columns` renames source
columns to the contract's names. The URL is never written here: `url_env` names the environment variable holding it.

```yaml
source:
  postgres:
    url_env: SALES_DATABASE_URL   # default FEEDPIPE_SOURCE_DATABASE_URL
    chunk_rows: 50000             # rows per fetch and per checked chunk of transactions
    transactions: {schema: sales, table: orders, columns: {customer_id: cust_no, ts: ordered_at}}
    customers: {query: "select id as customer_id, age, region from crm.customers where active"}
    products: {table: products}
```

Schema, table and column names are validated here (non-empty, at most 63 bytes, no NUL) and always quoted as
identifiers when used, so a name can never become SQL. A query is SQL by design: it runs read-only.

`transactions` has no attribute columns, so it has no section at the top level. Unknown keys, unknown roles and contradictions
(a column both excluded and given a role, a multi-valued column given another role, an id column named at all) raise
`InputConfigError` naming the file and the key. Whether a named column exists is only known once the data is read,
so `feedpipe.sources` checks that and raises the same error.

`InputError` lives here rather than in `sources` so that `InputConfigError` can be one: a caller that catches
`InputError` (the CLI, an asset) turns every problem with the user's input, data or config, into one clean message.
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from dataclasses import dataclass, field, replace
from pathlib import Path
from types import MappingProxyType
from typing import Any

import yaml

from feedpipe import contract

CONFIGURABLE_TABLES = (contract.CUSTOMERS, contract.PRODUCTS)
_TABLE_KEYS = ("exclude", "roles", "multi_valued", "available")
_TOP_KEYS = ("delimiter", *CONFIGURABLE_TABLES, "source")
_POSTGRES_KEYS = ("url_env", "chunk_rows", *contract.TABLES)
_POSTGRES_TABLE_KEYS = ("schema", "table", "query", "columns")
DEFAULT_SOURCE_URL_ENV = "FEEDPIPE_SOURCE_DATABASE_URL"
# Rows per fetch from Postgres and per chunk when transactions are checked: what bounds the load's memory.
DEFAULT_CHUNK_ROWS = 50_000
# PostgreSQL truncates identifiers longer than NAMEDATALEN - 1 bytes, which would silently name another object.
MAX_IDENTIFIER_BYTES = 63
_ENV_VAR_NAME = re.compile(r"^[A-Za-z_][A-Za-z0-9_]*$")


class InputError(ValueError):
    """The input data (or its config) is not what the contract expects.

    The message names the file, the column, up to five offending rows and what was expected. Rows are numbered as a
    person finds them in the file: for CSV "line N" counts the header as line 1 (the editor's line number, unless a
    quoted value spans lines or blank lines, which the reader skips, come before it); for Parquet "row N" counts data
    rows from 1.
    """


class InputConfigError(InputError):
    """The YAML input config is malformed or does not fit the data; the message names the config file and key."""


@dataclass(frozen=True)
class TableInputConfig:
    """How to read the attribute columns of one table (customers or products)."""

    exclude: tuple[str, ...] = ()
    """Columns dropped on load; they never become features."""
    roles: Mapping[str, str] = field(default_factory=dict, hash=False)
    """Column -> role (`contract.DENSE`, `CATEGORICAL` or `MULTI_CATEGORICAL`); overrides the inferred role."""
    multi_valued: tuple[str, ...] = ()
    """Text columns split by the delimiter into lists of categories (role `MULTI_CATEGORICAL`)."""
    available: str | None = None
    """Products only: the column saying whether a product may be recommended (true/false; empty counts as false).
    It is not a feature: an unavailable product still trains the model on its history, and is never in a feed."""

    def __post_init__(self) -> None:
        # Read-only view, so a frozen config cannot be changed through its dict either.
        object.__setattr__(self, "roles", MappingProxyType(dict(self.roles)))
        for column, role in self.roles.items():
            if role not in contract.ROLES:
                expected = ", ".join(contract.ROLES)
                raise InputConfigError(f"roles.{column}: unknown role {role!r}; expected one of {expected}")

    def role_override(self, column: str) -> str | None:
        """The role the config fixes for `column`, or None when it is left to inference."""
        if column in self.roles:
            return self.roles[column]
        if column in self.multi_valued:
            return contract.MULTI_CATEGORICAL
        return None

    def named_columns(self) -> dict[str, str]:
        """Every column this section names -> the config key that names it (for "no such column" errors)."""
        named = {c: "exclude" for c in self.exclude}
        named.update({c: "multi_valued" for c in self.multi_valued})
        named.update({c: f"roles.{c}" for c in self.roles})
        if self.available is not None:
            named[self.available] = "available"
        return named


def is_env_var_name(value: object) -> bool:
    """A name a shell could export (what the config's `*_env` keys must hold, never the secret itself)."""
    return isinstance(value, str) and bool(_ENV_VAR_NAME.match(value))


def check_identifier(value: object, key: str) -> str:
    """`value` if it can be a PostgreSQL identifier (quoted: any text, but not empty, NUL or over 63 bytes)."""
    if not isinstance(value, str) or not value:
        raise InputConfigError(f"key '{key}': expected a non-empty name, got {value!r}")
    if "\x00" in value:
        raise InputConfigError(f"key '{key}': a name cannot contain the NUL character: {value!r}")
    if len(value.encode("utf-8")) > MAX_IDENTIFIER_BYTES:
        raise InputConfigError(
            f"key '{key}': {value[:40]!r}... is over {MAX_IDENTIFIER_BYTES} bytes; PostgreSQL would truncate it"
        )
    return value


@dataclass(frozen=True)
class PostgresTableSource:
    """Where one input table is in Postgres: `table` (in `schema`, else the search path) or `query`."""

    table: str | None = None
    schema: str | None = None
    query: str | None = None
    columns: Mapping[str, str] = field(default_factory=dict, hash=False)
    """Name in feedpipe (a contract or attribute column) -> column name in the source."""
    key: str = "source.postgres"
    """Where this section is in the config, for messages."""

    def __post_init__(self) -> None:
        object.__setattr__(self, "columns", MappingProxyType(dict(self.columns)))
        if (self.table is None) == (self.query is None):
            raise InputConfigError(f"key '{self.key}': give exactly one of 'table' or 'query'")
        if self.query is not None:
            if not isinstance(self.query, str) or not self.query.strip():
                raise InputConfigError(f"key '{self.key}.query': expected SQL text, got {self.query!r}")
            if self.schema is not None:
                raise InputConfigError(f"key '{self.key}.schema': a schema goes with 'table', not with 'query'")
        else:
            check_identifier(self.table, f"{self.key}.table")
        if self.schema is not None:
            check_identifier(self.schema, f"{self.key}.schema")
        for name, column in self.columns.items():
            check_identifier(name, f"{self.key}.columns")
            check_identifier(column, f"{self.key}.columns.{name}")
        if len(set(self.columns.values())) < len(self.columns):
            raise InputConfigError(f"key '{self.key}.columns': two names map to the same source column")

    def describe(self) -> str:
        if self.query is not None:
            return f"postgres query ({self.key}.query)"
        return f"postgres table {self.schema + '.' if self.schema else ''}{self.table}"


@dataclass(frozen=True)
class PostgresSource:
    """The three input tables read from a Postgres database whose URL is in the environment variable `url_env`."""

    tables: Mapping[str, PostgresTableSource]
    url_env: str = DEFAULT_SOURCE_URL_ENV
    chunk_rows: int = DEFAULT_CHUNK_ROWS
    """Rows fetched per round trip from a server-side cursor, and per chunk when transactions are checked: what
    bounds the load's memory."""

    def __post_init__(self) -> None:
        # Each table's section knows where it sits in the config, for messages.
        tables = {t: spec if spec.key != "source.postgres" else replace(spec, key=f"source.postgres.{t}")
                  for t, spec in self.tables.items()}
        object.__setattr__(self, "tables", MappingProxyType(tables))
        missing = [t for t in contract.TABLES if t not in self.tables]
        if missing:
            raise InputConfigError(f"key 'source.postgres': missing section(s) for {', '.join(missing)}")
        if not is_env_var_name(self.url_env):
            # Not echoed: what is written here by mistake is most often the URL itself, password included.
            raise InputConfigError("key 'source.postgres.url_env': expected the name of an environment variable "
                                   "(letters, digits and underscores) that holds the URL, not the URL itself; the "
                                   "value given is not shown, as it may be a secret")
        if not isinstance(self.chunk_rows, int) or isinstance(self.chunk_rows, bool) or self.chunk_rows < 1:
            raise InputConfigError(f"key 'source.postgres.chunk_rows': expected a positive integer, got {self.chunk_rows!r}")


@dataclass(frozen=True)
class InputConfig:
    """Typed form of the YAML input config; `InputConfig.default()` infers every role from the data."""

    delimiter: str = contract.DEFAULT_DELIMITER
    """Separator inside a multi-valued text value ("a|b|c")."""
    customers: TableInputConfig = field(default_factory=TableInputConfig)
    products: TableInputConfig = field(default_factory=TableInputConfig)
    postgres: PostgresSource | None = None
    """Read the tables from Postgres instead of the data directory."""
    source: Path | None = None
    """The YAML file this came from, for error messages; None for the default config."""

    def __post_init__(self) -> None:
        if not self.delimiter:
            raise InputConfigError("delimiter: expected a non-empty string")

    @classmethod
    def default(cls) -> InputConfig:
        return cls()

    def table(self, table: str) -> TableInputConfig:
        """The section for `table`; transactions has no attributes, so it gets an empty section."""
        if table == contract.CUSTOMERS:
            return self.customers
        if table == contract.PRODUCTS:
            return self.products
        return TableInputConfig()

    def describe_source(self) -> str:
        return str(self.source) if self.source is not None else "input config (defaults)"

    @property
    def chunk_rows(self) -> int:
        """Rows per chunk when transactions are checked: the Postgres source's `chunk_rows`, else the default."""
        return self.postgres.chunk_rows if self.postgres is not None else DEFAULT_CHUNK_ROWS


def load_input_config(path: str | Path | None) -> InputConfig:
    """Read and validate the YAML input config at `path`; None gives `InputConfig.default()`."""
    if path is None:
        return InputConfig.default()
    path = Path(path)
    try:
        text = path.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as exc:
        raise InputConfigError(f"{path}: cannot read the input config: {exc}") from exc
    try:
        raw = yaml.safe_load(text)
    except yaml.YAMLError as exc:
        raise InputConfigError(f"{path}: not valid YAML: {exc}") from exc
    if raw is None:
        return InputConfig(source=path)
    return _parse_config(raw, path)


def _parse_config(raw: Any, path: Path) -> InputConfig:
    def fail(key: str, message: str) -> InputConfigError:
        return InputConfigError(f"{path}: key '{key}': {message}")

    if not isinstance(raw, dict):
        raise InputConfigError(
            f"{path}: expected a mapping at the top level (keys {', '.join(_TOP_KEYS)}), got {type(raw).__name__}"
        )
    for key in raw:
        if key == contract.TRANSACTIONS:
            sections = ", ".join(CONFIGURABLE_TABLES)
            raise fail(key, f"transactions has no attribute columns to configure; sections exist for {sections}")
        if key not in _TOP_KEYS:
            raise fail(key, f"unknown key; expected one of {', '.join(_TOP_KEYS)}")

    delimiter = raw.get("delimiter", contract.DEFAULT_DELIMITER)
    if not isinstance(delimiter, str) or delimiter == "":
        raise fail("delimiter", f"expected a non-empty string, got {delimiter!r}")

    sections = {table: _parse_table(table, raw.get(table), fail) for table in CONFIGURABLE_TABLES}
    postgres = _parse_source(raw.get("source"), path, fail)
    return InputConfig(delimiter=delimiter, source=path, postgres=postgres, **sections)


def _parse_source(raw: Any, path: Path, fail) -> PostgresSource | None:
    if raw is None:
        return None
    if not isinstance(raw, dict) or set(raw) != {"postgres"}:
        raise fail("source", "expected a mapping with the one key 'postgres'")
    section = raw["postgres"]
    if not isinstance(section, dict):
        raise fail("source.postgres", f"expected a mapping with keys {', '.join(_POSTGRES_KEYS)}")
    for key in section:
        if key not in _POSTGRES_KEYS:
            raise fail(f"source.postgres.{key}", f"unknown key; expected one of {', '.join(_POSTGRES_KEYS)}")
    try:
        tables = {}
        for table in contract.TABLES:
            spec = section.get(table)
            key = f"source.postgres.{table}"
            if spec is None:
                continue
            if not isinstance(spec, dict):
                raise fail(key, f"expected a mapping with keys {', '.join(_POSTGRES_TABLE_KEYS)}")
            for k in spec:
                if k not in _POSTGRES_TABLE_KEYS:
                    raise fail(f"{key}.{k}", f"unknown key; expected one of {', '.join(_POSTGRES_TABLE_KEYS)}")
            columns = spec.get("columns") or {}
            if not isinstance(columns, dict):
                raise fail(f"{key}.columns", "expected a mapping: name in feedpipe -> column in the source")
            tables[table] = PostgresTableSource(spec.get("table"), spec.get("schema"), spec.get("query"), columns, key)
        return PostgresSource(
            tables, section.get("url_env", DEFAULT_SOURCE_URL_ENV), section.get("chunk_rows", DEFAULT_CHUNK_ROWS)
        )
    except InputConfigError as exc:
        if str(exc).startswith(str(path)):
            raise
        raise InputConfigError(f"{path}: {exc}") from None


def _parse_table(table: str, raw: Any, fail) -> TableInputConfig:
    if raw is None:
        return TableInputConfig()
    if not isinstance(raw, dict):
        raise fail(table, f"expected a mapping with keys {', '.join(_TABLE_KEYS)}, got {type(raw).__name__}")
    for key in raw:
        if key not in _TABLE_KEYS:
            raise fail(f"{table}.{key}", f"unknown key; expected one of {', '.join(_TABLE_KEYS)}")

    exclude = _column_list(raw.get("exclude"), f"{table}.exclude", fail)
    multi_valued = _column_list(raw.get("multi_valued"), f"{table}.multi_valued", fail)
    roles_raw = raw.get("roles") or {}
    if not isinstance(roles_raw, dict):
        raise fail(f"{table}.roles", f"expected a mapping column -> role, got {type(roles_raw).__name__}")
    roles: dict[str, str] = {}
    for column, role in roles_raw.items():
        key = f"{table}.roles.{column}"
        if not isinstance(column, str):
            raise fail(key, f"column names must be strings (quote it: '{column}')")
        if role not in contract.ROLES:
            raise fail(key, f"unknown role {role!r}; expected one of {', '.join(contract.ROLES)}")
        roles[column] = role

    available = raw.get("available")
    if available is not None:
        if table != contract.PRODUCTS:
            raise fail(f"{table}.available", "only products have an availability column")
        if not isinstance(available, str) or not available:
            raise fail(f"{table}.available", f"expected a column name, got {available!r}")
        if available in exclude or available in roles or available in multi_valued:
            message = f"column '{available}' is the availability column; it is not a feature, so it takes no role"
            raise fail(f"{table}.available", message)

    id_column = contract.ID_COLUMN[table]
    for key, columns in (("exclude", exclude), ("multi_valued", multi_valued), ("roles", tuple(roles)),
                         ("available", (available,) if available else ())):
        if id_column in columns:
            message = f"'{id_column}' is the id column; it is always loaded as text and is not a feature"
            raise fail(f"{table}.{key}", message)
    for column in exclude:
        if column in roles or column in multi_valued:
            message = f"column '{column}' is excluded but also given a role or listed as multi_valued"
            raise fail(f"{table}.exclude", message)
    for column in multi_valued:
        if roles.get(column, contract.MULTI_CATEGORICAL) != contract.MULTI_CATEGORICAL:
            message = f"column '{column}' is listed in multi_valued but given role {roles[column]!r}"
            raise fail(f"{table}.roles.{column}", message)
    return TableInputConfig(exclude=exclude, roles=roles, multi_valued=multi_valued, available=available)


def _column_list(raw: Any, key: str, fail) -> tuple[str, ...]:
    if raw is None:
        return ()
    if not isinstance(raw, list) or not all(isinstance(c, str) for c in raw):
        raise fail(key, f"expected a list of column names (strings), got {raw!r}")
    duplicates = sorted({c for c in raw if raw.count(c) > 1})
    if duplicates:
        raise fail(key, f"column(s) listed twice: {', '.join(duplicates)}")
    return tuple(raw)
