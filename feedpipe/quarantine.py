"""Row-level rejection: every received row is either accepted or set aside with a reason, and a policy decides.

`TableLoad` holds one table's received rows, typed, each with at most one rejection reason (the first that applies,
in the order the loader checks them), so accepted + rejected = received holds by construction. The rejected rows go
to a Parquet file with their values as stored and three more columns: `_row` (the line or row number in the source,
as in error messages), `_reason` (a code from `REASONS`) and `_column` (the column at fault).

`RejectionPolicy` fails a table whose rejected fraction is above `max_rejected_fraction` (default 1%), with a message
naming the source, each (reason, column), up to five offending rows and what was expected. The policy and the message
only need what `RejectionReport` gives (counts and the first rows of each group), so they apply unchanged to a table
checked chunk by chunk (`feedpipe.spooled_load.SpooledLoad`), whose rows are on disk rather than in a frame.
"""

from __future__ import annotations

import os
import uuid
from collections.abc import Mapping
from dataclasses import dataclass, field
from functools import cached_property
from pathlib import Path

import polars as pl

from feedpipe import contract
from feedpipe.input_config import InputError
from feedpipe.table_files import MAX_ROWS_SHOWN, StoredTable

ROW, REASON, COLUMN = contract.BOOKKEEPING_COLUMNS
INTERNAL_COLUMNS = (ROW, REASON, COLUMN)

# Reason code -> what the rejected rows do, completing "N row(s) ...". The order is the documentation's.
REASONS: dict[str, str] = {
    "invalid_utf8": "are not valid UTF-8",
    "missing_id": "have no id (null or empty)",
    "nul_in_id": "have a NUL character in an id (PostgreSQL text cannot hold one)",
    "text_too_long": "are absurdly long",
    "missing_ts": "have no timestamp",
    "invalid_ts": "are not a timestamp",
    "ts_after_feed_date": "are on or after the feed date",
    "invalid_number": "do not parse as a finite number",
    "invalid_boolean": "are not a boolean (the products' availability)",
    "non_positive_quantity": "have a quantity of zero or less",
    "duplicate_row": "repeat an earlier row exactly (the first one is kept)",
    "duplicate_id": "share their id with a different row (none of them is kept: which is right is unknown)",
    "id_matches_only_as_number": "match an id of another table only as a number (ids are compared as text)",
    "unknown_customer": "name a customer that is not among the accepted customers",
    "unknown_product": "name a product that is not among the accepted products",
}


@dataclass(frozen=True)
class RejectionPolicy:
    """What a table may hold before the run stops, and the limits that make a value absurd."""

    max_rejected_fraction: float = 0.01
    """Fail the table when rejected / received is above this (0: any rejected row fails it; 1: never)."""
    exempt_reasons: tuple[str, ...] = ()
    """Reasons whose rows are still rejected and counted but not held against the fraction (e.g. a backfill over a
    later export exempts `ts_after_feed_date`)."""
    max_id_chars: int = 256
    max_text_chars: int = 1024

    def __post_init__(self) -> None:
        if not 0.0 <= self.max_rejected_fraction <= 1.0:
            raise InputError(f"max_rejected_fraction must be between 0 and 1, got {self.max_rejected_fraction}")
        unknown = sorted(set(self.exempt_reasons) - set(REASONS))
        if unknown:
            raise InputError(f"exempt_reasons: unknown reason(s) {', '.join(unknown)}; known: {', '.join(REASONS)}")
        if self.max_id_chars < 1 or self.max_text_chars < 1:
            raise InputError("max_id_chars and max_text_chars must be at least 1")


STRICT = RejectionPolicy(max_rejected_fraction=0.0)


@dataclass(frozen=True)
class Rejection:
    """Rows of one column rejected for one reason: `mask` is a Boolean Series (or expression over `TableLoad.rows`)
    over every received row; rows already rejected keep their first reason."""

    reason: str
    column: str
    mask: pl.Series | pl.Expr
    expected: str

    def __post_init__(self) -> None:
        if self.reason not in REASONS:
            raise ValueError(f"unknown rejection reason {self.reason!r}")


class RejectionReport:
    """What the policy and an operator see of a loaded table, whether its rows are in memory or on disk.

    A subclass has `table`, `source`, `row_label`, `received` and `expected` (as `TableLoad` does) and gives
    `counts()` and `rejected_examples()`.
    """

    def counts(self) -> pl.DataFrame:
        """reason, column, rows: one line per (reason, column), in `REASONS` order."""
        raise NotImplementedError

    def rejected_examples(self) -> pl.DataFrame:
        """Rejected rows as in `TableLoad.rejected`, in source order; at least the first `MAX_ROWS_SHOWN` of each
        (reason, column)."""
        raise NotImplementedError

    @property
    def rejected_rows(self) -> int:
        return int(self.counts().get_column("rows").sum())

    def counts_by_reason(self) -> dict[str, int]:
        totals: dict[str, int] = {}
        for reason, _, rows in self.counts().iter_rows():
            totals[reason] = totals.get(reason, 0) + rows
        return totals

    def describe_rejections(self, exclude_reasons: tuple[str, ...] = ()) -> str:
        """Per (reason, column): the count, up to five rows with their stored value, and what was expected."""
        rejected = self.rejected_examples().filter(~pl.col(REASON).is_in(list(exclude_reasons)))
        parts = []
        for reason, column, rows in self.counts().iter_rows():
            if reason in exclude_reasons:
                continue
            group = rejected.filter((pl.col(REASON) == reason) & (pl.col(COLUMN) == column))
            shown = group.head(MAX_ROWS_SHOWN)
            values = _listed(shown.get_column(column)) if column in shown.columns else [None] * shown.height
            lines = [f"    {self.row_label} {n}: {_show(v)}" for n, v in zip(shown.get_column(ROW), values)]
            if rows > shown.height:
                lines.append(f"    ... and {rows - shown.height} more")
            expected = self.expected.get((reason, column), "")
            parts.append(
                f"  column '{column}': {rows} row(s) {REASONS[reason]} [{reason}]; expected {expected}:\n"
                + "\n".join(lines)
            )
        return "\n".join(parts)


# The stored integers of the dates and times Python can hold (0001-01-01 to 9999-12-31 23:59:59.999999), per unit.
_PY_TIME_RANGE = {"ms": (-62_135_596_800_000, 253_402_300_799_999),
                  "us": (-62_135_596_800_000_000, 253_402_300_799_999_999), "days": (-719_162, 2_932_896)}


def _listed(series: pl.Series) -> list:
    """The values of `series` for a message. A date or time outside Python's range (a rejected `ts` of year
    292 million) is shown as its stored integer: converting it panics in polars."""
    dtype = series.dtype
    unit = "days" if dtype == pl.Date else dtype.time_unit if isinstance(dtype, pl.Datetime) else None
    if unit not in _PY_TIME_RANGE:  # ns always fits
        return series.to_list()
    stored = series.to_physical()
    lo, hi = _PY_TIME_RANGE[unit]
    outside = ((stored < lo) | (stored > hi)).fill_null(False)
    if not outside.any():
        return series.to_list()
    inside = series.to_frame().select(pl.when(~outside).then(pl.col(series.name))).to_series().to_list()
    return [f"{raw} ({dtype}, outside the years 1-9999)" if out else v
            for v, raw, out in zip(inside, stored.to_list(), outside.to_list())]


def count_rejections(rejected: pl.DataFrame) -> pl.DataFrame:
    """reason, column, rows: the rows of `rejected` (with `_reason` and `_column`) per (reason, column)."""
    counts = rejected.group_by(REASON, COLUMN).agg(pl.len().alias("rows"))
    return order_counts(counts.rename({REASON: "reason", COLUMN: "column"}))


def order_counts(counts: pl.DataFrame) -> pl.DataFrame:
    """reason, column, rows summed per (reason, column) (counts of several chunks add up), in `REASONS` order."""
    order = {reason: i for i, reason in enumerate(REASONS)}
    counts = counts.group_by("reason", "column").agg(pl.col("rows").sum().cast(pl.Int64))
    counts = counts.with_columns(pl.col("reason").replace_strict(order, return_dtype=pl.Int64).alias("_order"))
    return counts.sort("_order", "column").drop("_order")


@dataclass(frozen=True)
class TableLoad(RejectionReport):
    """One table's received rows: typed (`rows`, with `_row`, `_reason`, `_column`) and as stored (`raw`)."""

    table: str
    source: str
    row_label: str
    rows: pl.DataFrame
    raw: pl.DataFrame
    expected: Mapping[tuple[str, str], str] = field(default_factory=dict)

    @classmethod
    def build(cls, stored: StoredTable, raw: pl.DataFrame, typed: pl.DataFrame, rejections: list[Rejection],
              offset: int = 0) -> TableLoad:
        """`offset`: how many rows of the table come before these (a chunk's rows keep the whole table's numbers)."""
        first = stored.first_row_number + offset
        numbers = pl.int_range(first, first + typed.height, dtype=pl.Int64)
        rows = typed.with_columns(numbers.alias(ROW), pl.lit(None, pl.Utf8).alias(REASON), pl.lit(None, pl.Utf8).alias(COLUMN))
        raw = raw.with_columns(numbers.alias(ROW))
        return cls(stored.table, str(stored), stored.row_label, rows, raw).reject(*rejections)

    def reject(self, *rejections: Rejection) -> TableLoad:
        """This load with each rejection applied to the rows not rejected yet, first rejection first."""
        if not rejections:
            return self

        def first(attribute: str) -> pl.Expr:
            return pl.coalesce(
                pl.col(REASON if attribute == "reason" else COLUMN),
                *(pl.when(_as_expr(r.mask)).then(pl.lit(getattr(r, attribute))) for r in rejections),
            )

        rows = self.rows.with_columns(first("reason").alias(REASON), first("column").alias(COLUMN))
        expected = dict(self.expected) | {(r.reason, r.column): r.expected for r in rejections}
        return TableLoad(self.table, self.source, self.row_label, rows, self.raw, expected)

    @property
    def received(self) -> int:
        return self.rows.height

    @cached_property
    def accepted(self) -> pl.DataFrame:
        """The typed rows that passed, without the bookkeeping columns."""
        return self.rows.filter(pl.col(REASON).is_null()).drop(INTERNAL_COLUMNS)

    @cached_property
    def rejected(self) -> pl.DataFrame:
        """`_row`, `_reason`, `_column`, then the rejected rows' values as stored; in source order."""
        reasons = self.rows.filter(pl.col(REASON).is_not_null()).select(INTERNAL_COLUMNS)
        return reasons.join(self.raw, on=ROW, how="left", maintain_order="left")

    def counts(self) -> pl.DataFrame:
        return count_rejections(self.rejected)

    def rejected_examples(self) -> pl.DataFrame:
        return self.rejected


class RejectedRowsError(InputError):
    """More rows were rejected than the policy allows; `load` holds them all (or, spooled, says where they are)."""

    def __init__(self, message: str, load: RejectionReport):
        super().__init__(message)
        self.load = load


def enforce_policy(load: RejectionReport, policy: RejectionPolicy, rejected_path: Path | None = None) -> None:
    """Raise `RejectedRowsError` when the rejected fraction (exempt reasons not counted) is above the policy's."""
    by_reason = load.counts_by_reason()
    exempt = sum(by_reason.get(reason, 0) for reason in policy.exempt_reasons)
    counted = load.rejected_rows - exempt
    if counted == 0 or counted <= policy.max_rejected_fraction * load.received:
        return
    share = counted / load.received
    allowed = f"at most {policy.max_rejected_fraction:.1%}" if policy.max_rejected_fraction else "none"
    where = f"; every rejected row, with its reason, is in {rejected_path}" if rejected_path is not None else ""
    besides = f" (and {exempt:,} more for exempt reasons)" if exempt else ""
    message = (
        f"{load.source}: {counted:,} of {load.received:,} {load.table} rows rejected ({share:.1%}){besides}; "
        f"the rejection policy allows {allowed}{where}:\n{load.describe_rejections(policy.exempt_reasons)}"
    )
    raise RejectedRowsError(message, load)


def write_rejected(load: TableLoad, path: Path) -> Path:
    """The rejected rows as Parquet at `path`, written atomically (an empty file when none were rejected)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f"{path.name}.{os.getpid()}-{uuid.uuid4().hex[:12]}.tmp")  # this write's own: runs overlap
    load.rejected.write_parquet(tmp)
    tmp.replace(path)
    return path


def _as_expr(mask: pl.Series | pl.Expr) -> pl.Expr:
    return mask.fill_null(False) if isinstance(mask, pl.Expr) else pl.lit(mask.fill_null(False))


def _show(value: object) -> str:
    if value is None or value == "":
        return "empty"
    text = repr(value)
    if len(text) > 80:
        length = f"{len(value):,} characters" if isinstance(value, str) else "truncated"
        return f"{text[:60]}... ({length})"
    return text
