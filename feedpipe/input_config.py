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

`transactions` has no attribute columns, so it has no section. Unknown keys, unknown roles and contradictions
(a column both excluded and given a role, a multi-valued column given another role, an id column named at all) raise
`InputConfigError` naming the file and the key. Whether a named column exists is only known once the data is read,
so `feedpipe.sources` checks that and raises the same error.

`InputError` lives here rather than in `sources` so that `InputConfigError` can be one: a caller that catches
`InputError` (the CLI, an asset) turns every problem with the user's input, data or config, into one clean message.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from types import MappingProxyType
from typing import Any

import yaml

from feedpipe import contract

CONFIGURABLE_TABLES = (contract.CUSTOMERS, contract.PRODUCTS)
_TABLE_KEYS = ("exclude", "roles", "multi_valued")
_TOP_KEYS = ("delimiter", *CONFIGURABLE_TABLES)


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
        return named


@dataclass(frozen=True)
class InputConfig:
    """Typed form of the YAML input config; `InputConfig.default()` infers every role from the data."""

    delimiter: str = contract.DEFAULT_DELIMITER
    """Separator inside a multi-valued text value ("a|b|c")."""
    customers: TableInputConfig = field(default_factory=TableInputConfig)
    products: TableInputConfig = field(default_factory=TableInputConfig)
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
    return InputConfig(delimiter=delimiter, source=path, **sections)


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

    id_column = contract.ID_COLUMN[table]
    for key, columns in (("exclude", exclude), ("multi_valued", multi_valued), ("roles", tuple(roles))):
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
    return TableInputConfig(exclude=exclude, roles=roles, multi_valued=multi_valued)


def _column_list(raw: Any, key: str, fail) -> tuple[str, ...]:
    if raw is None:
        return ()
    if not isinstance(raw, list) or not all(isinstance(c, str) for c in raw):
        raise fail(key, f"expected a list of column names (strings), got {raw!r}")
    duplicates = sorted({c for c in raw if raw.count(c) > 1})
    if duplicates:
        raise fail(key, f"column(s) listed twice: {', '.join(duplicates)}")
    return tuple(raw)
