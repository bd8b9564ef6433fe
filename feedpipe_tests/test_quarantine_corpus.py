"""The malformed-input corpus (feedpipe_tests/malformed/cases.py): each case ends in its stated outcome."""

from __future__ import annotations

import re

import polars as pl
import pytest
from polars.testing import assert_frame_equal

from feedpipe import contract
from feedpipe.input_config import InputError
from feedpipe.input_tables import load_input_tables
from feedpipe.quarantine import REASON, RejectionPolicy, write_rejected
from feedpipe.table_files import StoredTable
from feedpipe_tests.malformed.cases import CASES, FEED_DATE, Accepted, Case, Fatal


def load(case: Case, directory):
    case.write(directory)
    stored = {table: StoredTable.find(directory, table) for table in contract.TABLES}
    policy = RejectionPolicy(max_rejected_fraction=case.max_rejected_fraction)
    return load_input_tables(stored, case.config, {t: policy for t in contract.TABLES}, FEED_DATE)


def test_the_corpus_has_at_least_25_cases_in_both_formats():
    assert len(CASES) >= 25
    assert len({c.name for c in CASES}) == len(CASES)
    assert {c.formats for c in CASES} == {"csv", "parquet", "mixed"}
    assert sum(isinstance(c.expected, Fatal) for c in CASES) >= 10
    assert sum(isinstance(c.expected, Accepted) for c in CASES) >= 10


@pytest.mark.parametrize("case", [c for c in CASES if isinstance(c.expected, Fatal)], ids=str)
def test_fatal_case_stops_with_a_message_naming_file_and_column(case, tmp_path):
    expected: Fatal = case.expected

    with pytest.raises(InputError) as err:
        load(case, tmp_path)

    message = str(err.value)
    assert expected.file in message
    if expected.column is not None:
        assert f"'{expected.column}'" in message
    assert re.search(expected.match, message, flags=re.DOTALL), message
    assert "Traceback" not in message


@pytest.mark.parametrize("case", [c for c in CASES if isinstance(c.expected, Accepted)], ids=str)
def test_row_level_case_is_accepted_with_exact_rejected_counts(case, tmp_path):
    tables = load(case, tmp_path / "data")

    counts = {table: load_.counts_by_reason() for table, load_ in tables.loads().items()}
    expected = {table: dict(case.expected.rejected.get(table, {})) for table in contract.TABLES}
    assert counts == expected
    for table, load_ in tables.loads().items():
        assert load_.accepted.height + load_.rejected.height == load_.received
        path = write_rejected(load_, tmp_path / "rejected" / f"{table}.parquet")
        on_disk = pl.read_parquet(path)
        assert on_disk.height == load_.rejected.height
        assert on_disk.get_column(REASON).null_count() == 0


def load_outcome(case: Case, directory, spool_dir=None):
    """What loading ends in: the message of the error it raises, or every table's counts, rows and policy message."""
    try:
        stored = {table: StoredTable.find(directory, table) for table in contract.TABLES}
        policy = RejectionPolicy(max_rejected_fraction=case.max_rejected_fraction)
        tables = load_input_tables(stored, case.config, {t: policy for t in contract.TABLES}, FEED_DATE,
                                   spool_dir=spool_dir, chunk_rows=2)
    except InputError as exc:
        return type(exc).__name__, str(exc)
    return {table: (load_.received, load_.counts().rows(), load_.accepted, load_.rejected,
                    load_.describe_rejections()) for table, load_ in tables.loads().items()}


@pytest.mark.parametrize("case", CASES, ids=str)
def test_streamed_transactions_load_exactly_like_the_whole_table(case, tmp_path):
    case.write(tmp_path / "data")

    whole = load_outcome(case, tmp_path / "data")
    streamed = load_outcome(case, tmp_path / "data", spool_dir=tmp_path / "spool")

    if isinstance(whole, tuple):
        assert streamed == whole
        if whole[0] != "RejectedRowsError":  # a policy breach keeps its rejected rows to look at; a fatal, nothing
            assert not list((tmp_path / "spool").glob("*"))
        return
    for table in contract.TABLES:
        received, counts, accepted, rejected, message = whole[table]
        assert streamed[table][:2] == (received, counts)
        assert_frame_equal(streamed[table][2], accepted)
        assert_frame_equal(streamed[table][3], rejected)
        assert streamed[table][4] == message
