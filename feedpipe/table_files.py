"""Finding an input table's file and reading its columns as stored: the fatal half of validation.

Everything here either returns the table as stored or raises `InputError`: a missing or ambiguous file, a file that
cannot be read (truncated Parquet, a header that is not UTF-8), CSV lines with the wrong number of fields (a file cut
off mid-row, a delimiter other than the comma), a missing required column. Row-level problems are left for the
quarantine: a CSV cell or Parquet binary value that is not valid UTF-8 does not fail the read; it is marked in
`RawTable.invalid_utf8` and shown with `\\x` escapes.

Row numbers are the ones a person finds in the file: CSV "line N" counts the header as line 1, Parquet "row N" counts
data rows from 1 (see `InputError`).

`iter_columns` reads a Parquet file a chunk at a time (pyarrow record batches: memory bounded by the chunk and the
file's row group, not by the table), which is how a table larger than memory is checked. CSV comes as one chunk: its
reader must see every line to report malformed ones by line number, and a CSV export is the small-data path (a large
table comes from Postgres, spooled as Parquet in chunks, or as Parquet).
"""

from __future__ import annotations

import codecs
import contextvars
import csv
import mmap
import re
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import polars as pl
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.csv as pacsv
import pyarrow.parquet as pq

from feedpipe import contract
from feedpipe.input_config import InputError

MAX_ROWS_SHOWN = 5
# Delimiters a CSV export is often written with instead of the comma; named in the "missing column" message.
_OTHER_DELIMITERS = (";", "\t", "|")


@dataclass(frozen=True)
class StoredTable:
    """Where one input table's rows are: a CSV or Parquet file, and how messages name it.

    `name` defaults to the path; a table exported from Postgres is a spooled Parquet file named after its source
    ("postgres table sales.orders"), so messages point at the table rather than at a temporary file.
    """

    table: str
    path: Path
    name: str = ""

    def __str__(self) -> str:
        return self.name or str(self.path)

    @property
    def is_csv(self) -> bool:
        return self.path.suffix == ".csv"

    @property
    def row_label(self) -> str:
        return "line" if self.is_csv else "row"

    @property
    def first_row_number(self) -> int:
        return 2 if self.is_csv else 1  # a CSV header is line 1

    @classmethod
    def find(cls, data_dir: str | Path, table: str) -> StoredTable:
        return cls(table, find_table_file(data_dir, table))


@dataclass(frozen=True)
class RawTable:
    """The requested columns of a stored table, as stored: CSV columns are text, Parquet columns keep their dtypes
    (binary columns are decoded to text). `schema` covers every column of the file, with decoded types."""

    stored: StoredTable
    schema: pl.Schema
    frame: pl.DataFrame
    invalid_utf8: dict[str, pl.Series] = field(default_factory=dict)
    """Column -> Boolean mask of the cells that are not valid UTF-8 (only columns that have any)."""
    offset: int = 0
    """Rows of the table before these: 0, unless this is a later chunk of `iter_columns`."""


def find_table_file(data_dir: str | Path, table: str) -> Path:
    """The one `<table>.parquet` or `<table>.csv` in `data_dir`."""
    if table not in contract.TABLES:
        raise ValueError(f"unknown table {table!r}; expected one of {contract.TABLES}")
    data_dir = Path(data_dir)
    if not data_dir.is_dir():
        raise InputError(f"{data_dir}: data directory does not exist")
    candidates = [data_dir / f"{table}{suffix}" for suffix in contract.FILE_SUFFIXES]
    found = [p for p in candidates if p.is_file()]
    if len(found) > 1:
        raise InputError(f"{data_dir}: both {found[0].name} and {found[1].name} exist; keep exactly one of them")
    if not found:
        expected = " or ".join(f"{table}{suffix}" for suffix in contract.FILE_SUFFIXES)
        near = sorted(p.name for p in data_dir.glob(f"{table}*"))
        hint = f" (found {', '.join(near)})" if near else ""
        raise InputError(f"{data_dir}: missing {expected}{hint}")
    return found[0]


def read_schema(stored: StoredTable) -> pl.Schema:
    """Column names and dtypes without reading the data; every CSV column is text, binary columns count as text."""
    path = stored.path
    try:
        if stored.is_csv:
            # The header alone, through the csv module: it sees duplicate names (polars renames them) and a BOM. Lines
            # are decoded one at a time, so a data line that is not UTF-8 is left to the row checks.
            with path.open("rb") as f:
                start = f.read(1 << 16)
                if b"\r" in start.rstrip(b"\r") and b"\n" not in start:
                    raise InputError(f"{stored}: its lines end in a bare carriage return (CR, as old Mac OS wrote "
                                     "them); save it with LF or CRLF line endings")
                f.seek(0)
                lines = (line.decode("utf-8-sig" if i == 0 else "utf-8") for i, line in enumerate(f))
                header = next(csv.reader(lines), None)
            if header is None:
                raise InputError(f"{stored}: empty file; expected a header line")
            if not header:  # csv.reader gives [] for a blank line: pyarrow would take the next line as the header
                raise InputError(f"{stored}: the first line is blank; the header (the column names) must be line 1")
            duplicates = sorted({c for c in header if header.count(c) > 1})
            if duplicates:
                raise InputError(f"{stored}: duplicate column name(s) in the header: {_quoted(duplicates)}")
            return pl.Schema({c: pl.Utf8 for c in header})
        utc = _offset_zones_as_utc(pq.read_schema(path))
        if utc:
            schema = pl.from_arrow(utc.empty_table()).schema
        else:
            schema = pl.scan_parquet(path).collect_schema()
        return pl.Schema({c: _as_text_type(t) for c, t in schema.items()})
    except (OSError, UnicodeDecodeError, csv.Error, pa.ArrowException, pl.exceptions.PolarsError,
            pl.exceptions.PanicException) as exc:
        raise InputError(f"{stored}: cannot read the file ({_expected_format(stored)}): {exc}") from exc


def check_reserved_columns(stored: StoredTable, columns: list[str]) -> None:
    """Refuse read columns named like the rejected rows' own or the products' availability (their values would be
    overwritten, or taken for something else, unannounced)."""
    reserved = [c for c in columns if c in contract.RESERVED_COLUMNS]
    if reserved:
        raise InputError(f"{stored}: column name(s) {_quoted(reserved)} are reserved for feedpipe's record of "
                         "rejected rows and the products' availability; rename the column(s) or exclude them in "
                         "the input config")


def check_required_columns(stored: StoredTable, schema: pl.Schema) -> None:
    missing = [c for c in contract.REQUIRED_COLUMNS[stored.table] if c not in schema]
    if not missing:
        return
    hint = ""
    if stored.is_csv and len(schema) == 1:
        header = next(iter(schema))
        used = [d for d in _OTHER_DELIMITERS if d in header]
        if used:
            hint = f"; the header is one column {header!r}: the file looks {used[0]!r}-separated, expected commas"
    raise InputError(
        f"{stored}: missing required column(s) {_quoted(missing)}; found {_quoted(schema) or 'no columns'}{hint}"
    )


def _quoted(names) -> str:
    return ", ".join(f"'{n}'" for n in names)


def read_columns(stored: StoredTable, schema: pl.Schema, columns: list[str]) -> RawTable:
    """The named columns as stored (CSV: all text, empty cells as ""), invalid UTF-8 cells marked, not fatal."""
    try:
        if stored.is_csv:
            if _ends_inside_quotes(stored.path):
                raise InputError(f"{stored}: the file ends inside a quoted value (a '\"' is never closed): "
                                 "a truncated file?")
            table = _read_csv(stored, schema, columns)
        elif utc := _offset_zones_as_utc(pq.read_schema(stored.path)):
            table = _zoned_as_utc(pq.read_table(stored.path, columns=columns), utc)
            table.validate(full=True)  # the UTF-8 check polars' read makes
        else:
            table = pl.scan_parquet(stored.path).select(columns).collect().to_arrow()
    except (OSError, pa.ArrowException, pl.exceptions.PolarsError, pl.exceptions.PanicException) as exc:
        raise InputError(f"{stored}: cannot read the file ({_expected_format(stored)}): {exc}") from exc
    return _as_stored(stored, schema, table)


def iter_columns(stored: StoredTable, schema: pl.Schema, columns: list[str],
                 chunk_rows: int | None) -> Iterator[RawTable]:
    """`read_columns` in chunks of at most `chunk_rows` rows (Parquet; CSV and `chunk_rows=None`: one chunk)."""
    if stored.is_csv or chunk_rows is None:
        yield read_columns(stored, schema, columns)
        return
    offset = 0
    try:
        # pre_buffer=False: with pyarrow's default read-ahead, iter_batches keeps every row group it has read in its
        # cache until the file is closed, so memory grows with the file (measured: +20 MB per 2.5M spooled rows).
        parquet = pq.ParquetFile(stored.path, pre_buffer=False)
        batches = parquet.iter_batches(batch_size=chunk_rows, columns=columns)
        utc = _offset_zones_as_utc(parquet.schema_arrow)
    except (OSError, pa.ArrowException) as exc:
        raise InputError(f"{stored}: cannot read the file ({_expected_format(stored)}): {exc}") from exc
    while True:
        try:
            batch = next(batches, None)  # a damaged row group shows only when it is read
            if batch is not None:
                # iter_batches does not check UTF-8 where polars' whole-file read does; unchecked bytes would
                # reach the quarantine file and make it unreadable.
                batch.validate(full=True)
                if utc:
                    batch = _zoned_as_utc(batch, utc)
        except (OSError, pa.ArrowException) as exc:
            raise InputError(f"{stored}: cannot read the file ({_expected_format(stored)}): {exc}") from exc
        if batch is None:
            return
        yield _as_stored(stored, schema, batch, offset)
        offset += batch.num_rows


def _offset_zones_as_utc(schema: pa.Schema) -> pa.Schema | None:
    """`schema` with each timestamp zoned at a fixed offset ("+05:30") zoned UTC instead, or None when there is
    none. Arrow stores the UTC instant either way, so the values are the same; polars parses some offsets
    ("+01:00") and panics on others ("+05:30"), taking the whole file down, not just its `ts` column."""
    def utc(t: pa.DataType) -> pa.DataType:
        return pa.timestamp(t.unit, tz="UTC") if pa.types.is_timestamp(t) and t.tz and t.tz[0] in "+-" else t

    fields = [f.with_type(utc(f.type)) for f in schema]
    return pa.schema(fields, schema.metadata) if any(f.type != g.type for f, g in zip(fields, schema)) else None


def _zoned_as_utc(data: pa.Table | pa.RecordBatch, utc: pa.Schema) -> pa.Table | pa.RecordBatch:
    """`data` (some of the file's columns) cast to `_offset_zones_as_utc`'s schema."""
    return data.cast(pa.schema([utc.field(name) for name in data.schema.names]))


def _as_text_type(dtype: pl.DataType) -> pl.DataType:
    """Binary and lists of binary as text: some Parquet writers store strings without their UTF-8 annotation."""
    if dtype == pl.Binary:
        return pl.Utf8
    if isinstance(dtype, pl.List) and dtype.inner == pl.Binary:
        return pl.List(pl.Utf8)
    return dtype


def _is_binary(t: pa.DataType) -> bool:
    return pa.types.is_binary(t) or pa.types.is_large_binary(t)


def _as_stored(stored: StoredTable, schema: pl.Schema, table: pa.Table | pa.RecordBatch, offset: int = 0) -> RawTable:
    decoded, invalid = {}, {}
    for name in table.column_names:
        values = table.column(name)
        if _is_binary(values.type):
            decoded[name], bad = decode_utf8(values)
            if bad is not None:
                invalid[name] = bad
        elif (pa.types.is_list(values.type) or pa.types.is_large_list(values.type)) and _is_binary(values.type.value_type):
            decoded[name], bad = decode_utf8_lists(values)
            if bad is not None:
                invalid[name] = bad
        else:
            decoded[name] = pl.from_arrow(values)
    # A dict keeps an empty column name (a header "a,b,"); a list of Series would rename it "column_0".
    frame = pl.DataFrame({name: decoded[name] for name in table.column_names})
    return RawTable(stored, schema, frame, invalid, offset)


# A quoted field: a '"' where a field starts (the file's start, or after a comma or a line break), then
# anything with '""' as an escaped quote, then the closing '"' (absent: the file ended inside the field).
# Unrolled ("[^"]*" runs between escapes): `(?:[^"]|"")*` kept the regex engine's state per character, 2.4 GB
# for one 20 MB quoted field.
_QUOTED_FIELD = re.compile(rb'(?:^|(?<=[,\r\n]))"[^"]*(?:""[^"]*)*(")?')


def _ends_inside_quotes(path: Path) -> bool:
    """Whether the file ends inside a quoted value (only a file without a final newline can).

    pyarrow reads an unclosed quote at the end of the file as a complete value, so a file cut off inside
    its last quoted field would load with that field shortened. Quotes are followed the way the parser
    reads them: a '"' opens a value only where a field starts (an inch mark in `27" monitor` is text), so
    counting every '"' called such a file truncated, and missed a cut quoted value after one.
    """
    with open(path, "rb") as f:
        if f.seek(0, 2) == 0:
            return False
        f.seek(-1, 2)
        if f.read(1) in (b"\n", b"\r"):
            return False
        with mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ) as data:
            last = None
            for last in _QUOTED_FIELD.finditer(data):  # noqa: B007 (the last one is the one that counts)
                pass
            return last is not None and last.group(1) is None


def _read_csv(stored: StoredTable, schema: pl.Schema, columns: list[str], use_threads: bool = True) -> pa.Table:
    # pyarrow rather than polars for CSV: polars pads a row with too few fields with nulls, so a file cut off mid-row
    # loads silently; pyarrow reports such rows. Cells are read as bytes so that one cell that is not UTF-8 is a
    # rejected row rather than an unreadable file.
    try:
        table, invalid = _parse_csv(stored.path, schema, columns, use_threads)
    except pa.ArrowInvalid:
        # pyarrow decodes a malformed row's text as UTF-8 before handing it to the handler; when that fails it
        # raises a bare "Expected 3 columns, got 2" without the line. The same bytes read as Latin-1 (one
        # character per byte: the same delimiters, quotes and newlines) have the same malformed lines, and say which.
        # pyarrow skips a UTF-8 BOM; transcoded, it would become part of the first column's name.
        data = stored.path.read_bytes().removeprefix(codecs.BOM_UTF8)
        transcoded = pa.BufferReader(data.decode("latin-1").encode("utf-8"))
        _, invalid = _parse_csv(transcoded, schema, columns, use_threads=False)
        if not invalid:
            raise
        for row in invalid:
            row.text = row.text.encode("latin-1").decode("utf-8", "backslashreplace")
        use_threads = False
    if invalid:
        if use_threads:  # a threaded read does not know row numbers; only the error path pays for a serial reread
            return _read_csv(stored, schema, columns, use_threads=False)
        shown = "\n".join(f"  line {r.number}: {r.actual_columns} fields: {r.text!r}" for r in invalid[:MAX_ROWS_SHOWN])
        more = f"\n  ... and {len(invalid) - MAX_ROWS_SHOWN} more" if len(invalid) > MAX_ROWS_SHOWN else ""
        raise InputError(
            f"{stored}: {len(invalid)} line(s) do not have the header's {len(schema)} fields "
            f"(a truncated file, a value with an unquoted comma, or a delimiter other than the comma):\n{shown}{more}"
        )
    return table


@dataclass
class _MalformedRow:
    number: int
    actual_columns: int
    text: str


def _parse_csv(source, schema: pl.Schema, columns: list[str], use_threads: bool) -> tuple[pa.Table, list[_MalformedRow]]:
    invalid: list[_MalformedRow] = []

    def on_invalid(row: pacsv.InvalidRow) -> str:
        invalid.append(_MalformedRow(row.number, row.actual_columns, row.text))
        return "skip"

    table = pacsv.read_csv(
        source,
        read_options=pacsv.ReadOptions(use_threads=use_threads),
        parse_options=pacsv.ParseOptions(newlines_in_values=True, invalid_row_handler=on_invalid),
        convert_options=pacsv.ConvertOptions(
            column_types={c: pa.binary() for c in schema},
            include_columns=columns,
            strings_can_be_null=False,
            quoted_strings_can_be_null=False,
        ),
    )
    return table, invalid


def _expected_format(stored: StoredTable) -> str:
    return "expected CSV in UTF-8 with a header line" if stored.is_csv else "expected a Parquet file"


# --- UTF-8 -----------------------------------------------------------------------------------------------------------

_ERROR_POSITIONS: contextvars.ContextVar[list[int]] = contextvars.ContextVar("feedpipe_utf8_error_positions")


def _record_utf8_error(exc: UnicodeError) -> tuple[str, int]:
    _ERROR_POSITIONS.get().append(exc.start)
    return "", exc.end


codecs.register_error("feedpipe.record_utf8_error", _record_utf8_error)


def decode_utf8(values: pa.Array | pa.ChunkedArray) -> tuple[pl.Series, pl.Series | None]:
    """Binary values -> (text, mask of the values that are not UTF-8 or None when all are).

    Invalid values come back as text with `\\x` escapes (`b"caf\\xe9"` -> `"caf\\\\xe9"`), for messages and the
    rejected file.
    """
    if isinstance(values, pa.ChunkedArray):
        values = values.combine_chunks()
    try:
        return pl.from_arrow(values.cast(pa.string())), None  # arrow validates the whole column in C++
    except pa.ArrowInvalid:
        pass
    bad = _invalid_utf8_mask(values)
    good = pc.if_else(pa.array(bad), pa.scalar(None, values.type), values).cast(pa.string())
    # A Python loop, but over the invalid values only.
    shown = [v.decode("utf-8", "backslashreplace") for v in values.filter(pa.array(bad)).to_pylist()]
    text = pl.from_arrow(good).scatter(np.flatnonzero(bad), shown)
    return text, pl.Series(bad)


def decode_utf8_lists(values: pa.Array | pa.ChunkedArray) -> tuple[pl.Series, pl.Series | None]:
    """Lists of binary values -> (lists of text, mask of the rows holding a value that is not UTF-8, or None)."""
    if isinstance(values, pa.ChunkedArray):
        values = values.combine_chunks()
    values = values.cast(pa.large_list(pa.large_binary()))
    # The list's own offsets cover the values buffer; flatten() would drop the slots under null lists.
    offsets = np.frombuffer(values.buffers()[1], dtype=np.int64)[values.offset : values.offset + len(values) + 1]
    items = values.values.slice(int(offsets[0]), int(offsets[-1] - offsets[0]))
    text, bad = decode_utf8(items)
    lists = pa.LargeListArray.from_arrays(pa.array(offsets - offsets[0], pa.int64()), text.to_arrow(),
                                          mask=values.is_null())
    if bad is None:
        return pl.from_arrow(lists), None
    per_item = np.concatenate([[0], np.cumsum(bad.to_numpy(), dtype=np.int64)])
    rows_bad = (per_item[offsets[1:] - offsets[0]] - per_item[offsets[:-1] - offsets[0]]) > 0
    return pl.from_arrow(lists), pl.Series(rows_bad)


def _invalid_utf8_mask(values: pa.Array) -> np.ndarray:
    """Which values are not valid UTF-8, in one decode of the whole column.

    The values' bytes are decoded as one buffer with a NUL after each value, so no multi-byte sequence can straddle
    two values; an error handler records where each invalid sequence starts, and the offsets map it to its row.
    """
    values = values.cast(pa.large_binary())
    n = len(values)
    offsets = np.frombuffer(values.buffers()[1], dtype=np.int64)[values.offset : values.offset + n + 1]
    data_buffer = values.buffers()[2]
    data = np.frombuffer(data_buffer, dtype=np.uint8) if data_buffer is not None else np.zeros(0, np.uint8)
    data = data[offsets[0] : offsets[-1]]
    relative = offsets - offsets[0]
    separated = np.insert(data, relative[1:], 0)
    positions: list[int] = []
    token = _ERROR_POSITIONS.set(positions)
    try:
        separated.tobytes().decode("utf-8", errors="feedpipe.record_utf8_error")
    finally:
        _ERROR_POSITIONS.reset(token)
    bad = np.zeros(n, dtype=bool)
    if positions:
        separator_at = relative[1:] + np.arange(n)  # where the NUL after value i landed
        bad[np.searchsorted(separator_at, np.asarray(positions), side="right")] = True
    valid = values.is_valid().to_numpy(zero_copy_only=False)
    return bad & valid
