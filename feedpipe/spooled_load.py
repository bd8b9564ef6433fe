"""A table checked chunk by chunk: accepted and rejected rows written to Parquet as they go, only counts kept.

`LoadSpooler` takes one `TableLoad` per chunk (rows numbered as in the whole table) and appends its accepted rows
to one Parquet file and its rejected rows (values as stored, with `_row`, `_reason`, `_column`) to another, so what
it holds at any time is one chunk plus the counts per (reason, column) and the first `MAX_ROWS_SHOWN` rejected rows
of each, which is all the rejection policy and its message need (`RejectionReport`). `finish()` moves both files into
place and returns a `SpooledLoad`; a load that fails (a fatal problem found in a later chunk) leaves neither file.

The files hold exactly what `TableLoad.accepted` and `TableLoad.rejected` would, in the same order and types, so a
loader may switch between the two forms freely; the equivalence is pinned by tests on the malformed corpus.
"""

from __future__ import annotations

import contextlib
import glob
import os
import time
import uuid
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from types import TracebackType

import polars as pl
import pyarrow.parquet as pq

from feedpipe.quarantine import COLUMN, REASON, ROW, RejectionReport, TableLoad, count_rejections, order_counts
from feedpipe.table_files import MAX_ROWS_SHOWN


@dataclass(frozen=True)
class SpooledParquet:
    """A Parquet file written by a step, to be moved (not copied) where its output belongs."""

    path: Path


@dataclass(frozen=True)
class SpooledLoad(RejectionReport):
    """One table's load whose rows are on disk: `accepted_path` (typed accepted rows) and `rejected_path`."""

    table: str
    source: str
    row_label: str
    received: int
    accepted_path: Path
    rejected_path: Path
    rejection_counts: pl.DataFrame
    examples: pl.DataFrame
    expected: Mapping[tuple[str, str], str]

    @property
    def accepted_rows(self) -> int:
        return self.received - self.rejected_rows

    def scan_accepted(self) -> pl.LazyFrame:
        return pl.scan_parquet(self.accepted_path)

    @property
    def accepted(self) -> pl.DataFrame:
        """The accepted rows read whole (tests, small tables); `scan_accepted()` is the bounded way."""
        return pl.read_parquet(self.accepted_path)

    @property
    def rejected(self) -> pl.DataFrame:
        return pl.read_parquet(self.rejected_path)

    def counts(self) -> pl.DataFrame:
        return self.rejection_counts

    def rejected_examples(self) -> pl.DataFrame:
        return self.examples


class LoadSpooler:
    """Collects chunk loads into a `SpooledLoad`; use as a context manager so a failure removes the partial files."""

    def __init__(self, accepted_path: Path, rejected_path: Path):
        self.accepted_path, self.rejected_path = Path(accepted_path), Path(rejected_path)
        # This load's own partial names: two runs of one partition at once (the schedule and a manual
        # rerun) sharing one name wrote one file and the second rename found it gone.
        self._unique = f"{os.getpid()}-{uuid.uuid4().hex[:12]}"
        self._writers: dict[Path, pq.ParquetWriter] = {}
        self._counts: list[pl.DataFrame] = []
        self._examples: pl.DataFrame | None = None
        self._expected: dict[tuple[str, str], str] = {}
        self._received = 0
        self._first: TableLoad | None = None

    def __enter__(self) -> LoadSpooler:
        return self

    def __exit__(self, kind: type[BaseException] | None, error: BaseException | None,
                 traceback: TracebackType | None) -> None:
        self._close()
        if kind is not None:
            for path in (self.accepted_path, self.rejected_path):
                self._partial(path).unlink(missing_ok=True)

    def add(self, chunk: TableLoad) -> None:
        """Append one chunk's rows; chunks must come in table order (row numbers increasing)."""
        self._first = self._first or chunk
        self._received += chunk.received
        rejected = chunk.rejected
        self._write(self.accepted_path, chunk.accepted)
        self._write(self.rejected_path, rejected)
        self._counts.append(count_rejections(rejected))
        self._expected.update(chunk.expected)
        examples = rejected if self._examples is None else pl.concat([self._examples, rejected], how="vertical_relaxed")
        # Chunks arrive in table order, so the first rows of each group across chunks are the table's first.
        self._examples = examples.filter(pl.col(ROW).cum_count().over(REASON, COLUMN) <= MAX_ROWS_SHOWN)

    def finish(self) -> SpooledLoad:
        """Close both files, move them into place (each rename is atomic) and return the load."""
        if self._first is None:
            raise ValueError("LoadSpooler.finish() before any add(): the loader must reject a table without rows")
        self._close()
        for path in (self.accepted_path, self.rejected_path):
            self._partial(path).replace(path)
            _remove_stale_partials(path)
        first = self._first
        return SpooledLoad(
            first.table, first.source, first.row_label, self._received, self.accepted_path, self.rejected_path,
            order_counts(pl.concat(self._counts)), self._examples, dict(self._expected),
        )

    def _write(self, path: Path, frame: pl.DataFrame) -> None:
        table = frame.to_arrow()
        writer = self._writers.get(path)
        if writer is None:
            path.parent.mkdir(parents=True, exist_ok=True)
            writer = self._writers[path] = pq.ParquetWriter(self._partial(path), table.schema)
        elif table.schema != writer.schema:
            table = table.cast(writer.schema)  # one file, one schema: the first chunk's
        if table.num_rows:
            writer.write_table(table)

    def _partial(self, path: Path) -> Path:  # see _remove_stale_partials
        return path.with_name(f"{path.name}.{self._unique}.partial")

    def _close(self) -> None:
        for writer in self._writers.values():
            writer.close()
        self._writers.clear()


# A load killed mid-write leaves its own partial file behind (each load's name is its own, so no later load
# overwrites it). One not written to for this long is no live load's: a live one writes a chunk every few seconds.
STALE_PARTIAL_S = 6 * 3600


def _remove_stale_partials(path: Path, now: float | None = None) -> list[Path]:
    """Remove `path`'s partial files (`<name>.<pid>-<id>.partial`) untouched for STALE_PARTIAL_S; returns them."""
    now = time.time() if now is None else now
    removed = []
    for partial in path.parent.glob(f"{glob.escape(path.name)}.*.partial"):
        with contextlib.suppress(FileNotFoundError):
            if now - partial.stat().st_mtime > STALE_PARTIAL_S:
                partial.unlink()
                removed.append(partial)
    return removed
