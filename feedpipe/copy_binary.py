"""A feed as typed columns, and those columns in PostgreSQL's binary COPY format, built without a row loop.

`FeedArrays` checks and converts the columns once; `encode_copy_rows()` turns a row range into COPY's wire bytes
with whole-column numpy and Arrow (about 17M rows/s on one core, ~42 bytes a row for realistic ids);
`copy_stream()` frames the chunks with COPY's signature and trailer, for `COPY ... FROM STDIN` or a file the
server reads.
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from feedpipe.feed_schema import TABLE_COLUMNS


def _as_large_strings(name: str, values: Any) -> pa.LargeStringArray:
    if hasattr(values, "to_arrow"):  # a polars Series
        values = values.to_arrow()
    try:
        if isinstance(values, (pa.Array, pa.ChunkedArray)):
            if not (pa.types.is_string(values.type) or pa.types.is_large_string(values.type)
                    or pa.types.is_string_view(values.type)):
                raise ValueError(f"feed column {name!r}: expected a string array, got {values.type}")
            values = values.cast(pa.large_string())
        else:
            values = pa.array(np.asarray(values, dtype=object), type=pa.large_string())
    except (pa.ArrowInvalid, pa.ArrowTypeError, pa.ArrowNotImplementedError) as exc:
        raise ValueError(f"feed column {name!r}: expected strings ({exc})") from None
    if isinstance(values, pa.ChunkedArray):
        values = values.combine_chunks()
    if values.null_count:
        bad = np.flatnonzero(values.is_null().to_numpy(zero_copy_only=False))[:5].tolist()
        raise ValueError(f"feed column {name!r}: {values.null_count} null ids, first at rows {bad}")
    return values


def _as_numbers(name: str, values: Any, dtype: np.dtype) -> np.ndarray:
    values = np.asarray(values)
    if dtype.kind == "i":
        if values.dtype.kind not in "iu":
            raise ValueError(f"feed column {name!r}: expected integers, got dtype {values.dtype}")
        info = np.iinfo(dtype)
        bad = np.flatnonzero((values < info.min) | (values > info.max))
    else:
        if values.dtype.kind not in "fiu":
            raise ValueError(f"feed column {name!r}: expected floats, got dtype {values.dtype}")
        # Cast first: a float64 that overflows float32 becomes inf, which is as unservable as NaN.
        values = values.astype(dtype, copy=False)
        bad = np.flatnonzero(~np.isfinite(values))
    if bad.size:
        raise ValueError(
            f"feed column {name!r}: {bad.size} values not representable as finite {dtype}, "
            f"first at rows {bad[:5].tolist()}: {values[bad[:5]].tolist()}"
        )
    return np.ascontiguousarray(values, dtype=dtype)


@dataclass
class FeedArrays:
    """A feed as equal-length columns, converted once on construction.

    `customer_id`, `product_id`: pyarrow string arrays, numpy object arrays of str (or polars Series), held as
    `pa.LargeStringArray`; `rank`: integers, held as int32; `score`: floats, held as float32 and finite.
    """

    customer_id: Any
    product_id: Any
    rank: Any
    score: Any

    def __post_init__(self) -> None:
        for column in TABLE_COLUMNS:
            values = getattr(self, column.name)
            if column.numpy_dtype is None:
                setattr(self, column.name, _as_large_strings(column.name, values))
            else:
                setattr(self, column.name, _as_numbers(column.name, values, column.numpy_dtype))
        lengths = {column.name: len(getattr(self, column.name)) for column in TABLE_COLUMNS}
        if len(set(lengths.values())) > 1:
            raise ValueError(f"feed columns differ in length: {lengths}")

    def __len__(self) -> int:
        return len(self.rank)

    def customers(self) -> int:
        return pc.count_distinct(self.customer_id).as_py() if len(self) else 0


# --- binary COPY -------------------------------------------------------------------------------------------------
# Format: https://www.postgresql.org/docs/current/sql-copy.html#id-1.9.3.55.9.4 -- a signature, flags and header
# extension length, then per row an int16 field count and per field an int32 byte length and the value in network
# byte order (text as its UTF-8 bytes), then an int16 -1.
COPY_SIGNATURE = b"PGCOPY\n\xff\r\n\x00" + (0).to_bytes(4, "big") + (0).to_bytes(4, "big")
COPY_TRAILER = (-1).to_bytes(2, "big", signed=True)


def _row_segments() -> tuple[np.dtype | str, ...]:
    """One row in wire order, as runs of fixed-width fields (a packed structured dtype) between text columns (by
    name): the field count and each length word and number are fixed; only the text bytes vary in length."""
    segments: list[np.dtype | str] = []
    fields: list[tuple[str, str | np.dtype]] = [("nfields", ">i2")]
    for column in TABLE_COLUMNS:
        fields.append((f"{column.name}_len", ">i4"))
        if column.numpy_dtype is None:
            segments += [np.dtype(fields), column.name]
            fields = []
        else:
            fields.append((column.name, column.numpy_dtype.newbyteorder(">")))
    if fields:
        segments.append(np.dtype(fields))
    return tuple(segments)


_ROW_SEGMENTS = _row_segments()
_LENGTH_SUFFIX = "_len"
_NO_SEPARATOR = pa.scalar(b"", pa.large_binary())


def _as_binary_values(fixed: np.ndarray) -> pa.LargeBinaryArray:
    """Each record of a structured array as one binary value, sharing the array's memory."""
    width = fixed.dtype.itemsize
    offsets = np.arange(0, (len(fixed) + 1) * width, width, dtype=np.int64)
    return pa.LargeBinaryArray.from_buffers(
        pa.large_binary(), len(fixed), [None, pa.py_buffer(offsets), pa.py_buffer(fixed.view(np.uint8))]
    )


def encode_copy_rows(feed: FeedArrays, start: int = 0, stop: int | None = None) -> np.ndarray:
    """Rows [start, stop) of `feed` in PostgreSQL's binary COPY row format (no signature or trailer), as uint8.

    Each run of fixed-width fields is one structured numpy array filled column by column; Arrow's
    `binary_join_element_wise` then concatenates, row by row in C++, those runs and the text columns' bytes.
    About 17M rows/s on one core (10M realistic rows in 0.57 s), 3.3x the earlier all-numpy encoder that labelled
    every output byte with its source and filled them by masked assignment.
    """
    stop = len(feed) if stop is None else stop
    n = stop - start
    if n <= 0:
        return np.empty(0, dtype=np.uint8)
    texts = {c.name: getattr(feed, c.name).slice(start, n) for c in TABLE_COLUMNS if c.numpy_dtype is None}
    parts = []
    for segment in _ROW_SEGMENTS:
        if isinstance(segment, str):
            parts.append(texts[segment].cast(pa.large_binary()))  # same layout: no copy
            continue
        fixed = np.empty(n, dtype=segment)
        for name in segment.names:
            column = name.removesuffix(_LENGTH_SUFFIX)
            if name == "nfields":
                fixed[name] = len(TABLE_COLUMNS)
            elif name == column:
                fixed[name] = getattr(feed, name)[start:stop]
            elif column in texts:
                fixed[name] = pc.binary_length(texts[column]).to_numpy()
            else:
                fixed[name] = segment.fields[column][0].itemsize
        parts.append(_as_binary_values(fixed))
    rows = pc.binary_join_element_wise(*parts, _NO_SEPARATOR)
    _, offsets, data = rows.buffers()
    end = int(np.frombuffer(offsets, dtype=np.int64, count=n + 1, offset=rows.offset * 8)[n])
    return np.frombuffer(data, dtype=np.uint8, count=end)


# Chunks bound memory (~42 bytes a row, about twice that while a chunk is built): 200k rows is ~8 MB, which loopback
# socket buffers mostly hold, so the server parses one chunk while the next is encoded.
DEFAULT_CHUNK_ROWS = 200_000


def copy_stream(feed: FeedArrays, chunk_rows: int = DEFAULT_CHUNK_ROWS) -> Iterator[memoryview]:
    """The whole binary COPY input for `feed`: the signature, rows in chunks of `chunk_rows`, the trailer."""
    if chunk_rows < 1:
        raise ValueError(f"chunk_rows must be >= 1, got {chunk_rows}")
    yield memoryview(COPY_SIGNATURE)
    for start in range(0, len(feed), chunk_rows):
        yield memoryview(encode_copy_rows(feed, start, min(start + chunk_rows, len(feed))))
    yield memoryview(COPY_TRAILER)
