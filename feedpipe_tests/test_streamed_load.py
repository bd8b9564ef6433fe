"""Transactions checked chunk by chunk (`stream_transactions`): the whole table's rows, reasons, numbers and messages,
and nothing left behind when a later chunk turns out fatal."""

from __future__ import annotations

from datetime import date, datetime
from pathlib import Path

import polars as pl
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from polars.testing import assert_frame_equal

from feedpipe.contract import CUSTOMER_ID, PRODUCT_ID, QUANTITY, TRANSACTIONS, TS
from feedpipe.input_config import InputError
from feedpipe.input_tables import References, stream_transactions
from feedpipe.quarantine import STRICT, RejectedRowsError, enforce_policy
from feedpipe.sources import load_transactions
from feedpipe.table_files import StoredTable

FEED_DATE = date(2024, 3, 1)
REFERENCES = References.of(pl.DataFrame({CUSTOMER_ID: ["c1", "c2", "c3", "7"]}),
                           pl.DataFrame({PRODUCT_ID: ["p1", "p2"]}))


def messy_transactions() -> pl.DataFrame:
    """23 rows: good ones between every kind of row-level problem, and seven bad timestamps (more than a message
    shows) spread over the table."""
    rows = []
    for i in range(23):
        customer, product, ts, quantity = f"c{1 + i % 3}", f"p{1 + i % 2}", f"2024-02-{1 + i:02d}", 1.0
        if i % 3 == 2:
            ts = f"2024-02-{30 + i}"  # not a date
        problems = {4: (CUSTOMER_ID, None), 6: (CUSTOMER_ID, "c9"), 9: (PRODUCT_ID, "p9"), 10: (QUANTITY, 0.0),
                    12: (TS, "2024-03-02"), 13: (CUSTOMER_ID, "007"), 15: (QUANTITY, float("nan"))}
        if i in problems:
            column, value = problems[i]
            customer, product, ts, quantity = {CUSTOMER_ID: (value, product, ts, quantity),
                                               PRODUCT_ID: (customer, value, ts, quantity),
                                               TS: (customer, product, value, quantity),
                                               QUANTITY: (customer, product, ts, value)}[column]
        rows.append((customer, product, ts, quantity))
    return pl.DataFrame(rows, schema=[CUSTOMER_ID, PRODUCT_ID, TS, QUANTITY], orient="row")


def write_parquet(tmp_path: Path, frame: pl.DataFrame, **options) -> StoredTable:
    path = tmp_path / f"{TRANSACTIONS}.parquet"
    frame.write_parquet(path, **options)
    return StoredTable(TRANSACTIONS, path)


def stream(stored: StoredTable, spool: Path, chunk_rows: int):
    return stream_transactions(stored, REFERENCES, spool / "accepted.parquet", spool / "rejected.parquet",
                               feed_date=FEED_DATE, chunk_rows=chunk_rows)


def policy_message(load) -> str:
    with pytest.raises(RejectedRowsError) as err:
        enforce_policy(load, STRICT)
    return str(err.value)


@pytest.mark.parametrize("chunk_rows", [1, 4, 7, 10_000])
def test_chunks_give_the_whole_tables_rows_reasons_numbers_and_message(chunk_rows, tmp_path):
    stored = write_parquet(tmp_path, messy_transactions())
    whole = REFERENCES.reject_unknown(load_transactions(stored, feed_date=FEED_DATE))

    streamed = stream(stored, tmp_path / "spool", chunk_rows)

    assert streamed.received == whole.received == 23
    assert streamed.counts().rows() == whole.counts().rows()
    assert whole.counts_by_reason()["invalid_ts"] == 7
    assert_frame_equal(streamed.accepted, whole.accepted)
    assert_frame_equal(streamed.rejected, whole.rejected)
    assert streamed.accepted_rows + streamed.rejected_rows == streamed.received
    message = policy_message(streamed)
    assert message == policy_message(whole)
    assert "... and 2 more" in message and "row 24" not in message  # rows numbered in the table, not the chunk


def test_a_ts_column_that_never_parses_fails_after_the_last_chunk_naming_the_first_rows(tmp_path):
    garbage = messy_transactions().with_columns(pl.format("day {}", pl.int_range(pl.len())).alias(TS))
    stored = write_parquet(tmp_path, garbage)
    with pytest.raises(InputError) as whole:
        load_transactions(stored, feed_date=FEED_DATE)

    with pytest.raises(InputError) as streamed:
        stream(stored, tmp_path / "spool", chunk_rows=2)

    assert str(streamed.value) == str(whole.value)
    assert "none of its 23 value(s) is a timestamp" in str(streamed.value)
    assert "row 1: 'day 0'" in str(streamed.value) and "... and 18 more" in str(streamed.value)
    assert not list((tmp_path / "spool").iterdir())  # neither the accepted nor the rejected rows were kept


def test_a_damaged_row_group_fails_with_the_file_named_and_leaves_no_partial_file(tmp_path):
    stored = write_parquet(tmp_path, messy_transactions(), row_group_size=5)
    column = pq.ParquetFile(stored.path).metadata.row_group(3).column(0)
    content = bytearray(stored.path.read_bytes())
    content[column.data_page_offset:column.data_page_offset + column.total_compressed_size] = (
        b"\xff" * column.total_compressed_size)
    stored.path.write_bytes(bytes(content))

    with pytest.raises(InputError, match=rf"{stored.path}: cannot read the file \(expected a Parquet file\)"):
        stream(stored, tmp_path / "spool", chunk_rows=5)

    assert not list((tmp_path / "spool").iterdir())


def test_accepted_rows_are_written_a_chunk_at_a_time_in_the_contract_types(tmp_path):
    many = pl.DataFrame({CUSTOMER_ID: ["c1", "c2"] * 500, PRODUCT_ID: ["p1"] * 1000,
                         TS: [datetime(2024, 2, 1)] * 1000, QUANTITY: [2] * 1000})
    stored = write_parquet(tmp_path, many)

    streamed = stream(stored, tmp_path / "spool", chunk_rows=300)

    accepted = pq.ParquetFile(streamed.accepted_path)
    assert accepted.metadata.num_row_groups == 4 and accepted.metadata.num_rows == 1000
    assert streamed.scan_accepted().collect_schema() == pl.Schema(
        {CUSTOMER_ID: pl.Utf8, PRODUCT_ID: pl.Utf8, TS: pl.Datetime("us"), QUANTITY: pl.Float64})
    assert pq.read_schema(streamed.rejected_path).names[:3] == ["_row", "_reason", "_column"]
    assert pa.types.is_integer(pq.read_schema(streamed.rejected_path).field(QUANTITY).type)  # as stored


def test_invalid_utf8_in_a_parquet_string_column_fails_like_a_whole_load(tmp_path):
    """A writer that does not check UTF-8 can store bytes a string column may not hold; polars refuses such a
    file, and the chunked reader must too, not quarantine rows the rejected file then cannot hold."""
    ids = pa.array([b"c1", b"c\xff", b"c2"], type=pa.binary()).view(pa.string())  # .view: no validation
    table = pa.table({CUSTOMER_ID: ids, PRODUCT_ID: ["p1", "p1", "p2"],
                      TS: pa.array([datetime(2024, 2, d) for d in (1, 2, 3)], pa.timestamp("us")),
                      QUANTITY: [1.0, 1.0, 2.0]})
    stored = StoredTable(TRANSACTIONS, tmp_path / f"{TRANSACTIONS}.parquet")
    pq.write_table(table, stored.path)

    expected = rf"{stored.path}: cannot read the file \(expected a Parquet file\)"
    with pytest.raises(InputError, match=expected):
        load_transactions(stored, feed_date=FEED_DATE)
    with pytest.raises(InputError, match=expected):
        stream(stored, tmp_path / "spool", chunk_rows=2)
    assert not (tmp_path / "spool").exists() or not list((tmp_path / "spool").iterdir())


def test_two_loads_of_one_partition_at_once_both_finish(tmp_path):
    """The schedule and a manual rerun write the same rejected file: each load spools under its own names."""
    import threading

    stored = write_parquet(tmp_path, pl.concat([messy_transactions()] * 200))
    start, results = threading.Barrier(2), []

    def load(name: str) -> None:
        start.wait()
        try:
            results.append(stream_transactions(stored, REFERENCES, tmp_path / name / "accepted.parquet",
                                               tmp_path / "rejected.parquet", feed_date=FEED_DATE, chunk_rows=50))
        except Exception as exc:  # noqa: BLE001 (reported below)
            results.append(exc)

    threads = [threading.Thread(target=load, args=(n,)) for n in ("a", "b")]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert all(not isinstance(r, Exception) for r in results), results
    assert pl.read_parquet(tmp_path / "rejected.parquet").height == results[0].rejected_rows
    assert not list(tmp_path.glob("*.partial"))


def test_a_killed_loads_partial_file_is_removed_by_a_later_load_once_stale(tmp_path):
    import os
    import time

    from feedpipe.spooled_load import STALE_PARTIAL_S

    rejected = tmp_path / "rejected.parquet"
    stale, live = tmp_path / "rejected.parquet.111-aaaa.partial", tmp_path / "rejected.parquet.222-bbbb.partial"
    for f in (stale, live):
        f.write_bytes(b"x")
    old = time.time() - STALE_PARTIAL_S - 60
    os.utime(stale, (old, old))
    stream_transactions(write_parquet(tmp_path, messy_transactions()), REFERENCES, tmp_path / "a.parquet", rejected,
                        feed_date=FEED_DATE, chunk_rows=5)
    assert not stale.exists() and live.exists()  # a recent one may be another load's, still writing
