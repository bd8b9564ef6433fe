"""Property: whatever is done to a valid input set, loading ends in a clean `InputError` or in accepted + rejected =
received for every table, with the accepted rows honouring the contract; never in another exception."""

from __future__ import annotations

import re
import tempfile
from datetime import date, datetime
from pathlib import Path

import polars as pl
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from feedpipe import contract
from feedpipe.contract import CUSTOMER_ID, PRODUCT_ID, QUANTITY, TS
from feedpipe.input_config import InputError
from feedpipe.input_tables import load_input_tables
from feedpipe.quarantine import REASON, REASONS, RejectionPolicy
from feedpipe.table_files import StoredTable
from feedpipe_tests.malformed.cases import BASE, FEED_DATE, write_table

TABLES = contract.TABLES
COLUMNS = {t: BASE[t]().columns for t in TABLES}
CELL_VALUES = st.one_of(
    st.none(),
    st.text(max_size=12),
    st.integers(-3, 3),
    st.floats(allow_nan=True, allow_infinity=True),
    st.datetimes(min_value=datetime(1900, 1, 1), max_value=datetime(2100, 1, 1)),
    st.sampled_from(["", " ", "007", "c1", "p1", "nan", "-1", "2024-13-01", "2024-02-10", "2099-01-01T00:00:00Z",
                     "x" * 2000, "a,b", 'q"uote', "line\nbreak", "\x00", "caf\u00e9"]),
)


def frame_mutations(table: str):
    columns, rows = COLUMNS[table], BASE[table]().height
    column, row = st.sampled_from(columns), st.integers(0, rows - 1)
    return st.one_of(
        st.tuples(st.just("set_cell"), st.just(table), row, column, CELL_VALUES),
        st.tuples(st.just("drop_column"), st.just(table), column),
        st.tuples(st.just("rename_column"), st.just(table), column, st.sampled_from(["CUSTOMER_ID", "ts ", "id", ""])),
        st.tuples(st.just("duplicate_row"), st.just(table), row),
        st.tuples(st.just("keep_rows"), st.just(table), st.integers(0, rows)),
        st.tuples(st.just("cast_column"), st.just(table), column,
                  st.sampled_from(["str", "float", "int", "bool", "date", "list"])),
    )


def byte_mutations(table: str):
    position = st.floats(0, 1)
    return st.one_of(
        st.tuples(st.just("truncate"), st.just(table), position),
        st.tuples(st.just("insert_bytes"), st.just(table), position,
                  st.one_of(st.binary(min_size=1, max_size=6),
                            st.sampled_from([b",", b"\n", b'"', b"\xff", b"\xc3", b";", b"\r", b"\x00"]))),
        st.tuples(st.just("replace_delimiter"), st.just(table), st.sampled_from([b";", b"\t", b"|"])),
    )


MUTATION = st.sampled_from(TABLES).flatmap(lambda t: st.one_of(frame_mutations(t), byte_mutations(t)))
CASTS = {"str": pl.Utf8, "float": pl.Float64, "int": pl.Int64, "bool": pl.Boolean, "date": pl.Date}


def set_cell(frame: pl.DataFrame, row: int, column: str, value) -> pl.DataFrame:
    series = frame.get_column(column)
    if isinstance(series.dtype, pl.List):  # a column cast to lists earlier: polars cannot scatter into it
        values = series.to_list()
        values[row] = None if value is None else [str(value)]
        return frame.with_columns(pl.Series(column, values, dtype=pl.List(pl.Utf8)))
    if value is not None and pl.Series([value]).dtype != series.dtype:
        series, value = series.cast(pl.Utf8), str(value)
    return frame.with_columns(series.clone().scatter(row, value))


def apply_to_frame(frame: pl.DataFrame, mutation: tuple, fmt: str) -> pl.DataFrame:
    kind, _, *args = mutation
    if kind == "set_cell" and args[1] in frame.columns and args[0] < frame.height:
        return set_cell(frame, *args)
    if kind == "drop_column" and args[0] in frame.columns:
        return frame.drop(args[0])
    if kind == "rename_column" and args[0] in frame.columns and args[1] not in frame.columns:
        return frame.rename({args[0]: args[1]})
    if kind == "duplicate_row":
        return pl.concat([frame, frame[min(args[0], frame.height - 1):][:1]]) if frame.height else frame
    if kind == "keep_rows":
        return frame.head(args[0])
    if kind == "cast_column" and args[0] in frame.columns and not isinstance(frame.schema[args[0]], pl.List):
        column, to = args
        if to == "list":  # Parquet only: CSV has no lists
            return frame.with_columns(pl.col(column).cast(pl.Utf8).str.split("1")) if fmt == "parquet" else frame
        try:
            return frame.with_columns(pl.col(column).cast(CASTS[to], strict=False))
        except pl.exceptions.PolarsError:  # a cast polars does not do (text -> bool): go through numbers
            return frame.with_columns(pl.col(column).cast(pl.Utf8).str.len_chars().cast(CASTS[to], strict=False))
    return frame


def apply_to_bytes(content: bytes, mutation: tuple, is_csv: bool) -> bytes:
    kind, _, *args = mutation
    at = int(args[0] * len(content)) if kind in ("truncate", "insert_bytes") else 0
    if kind == "truncate":
        return content[:at]
    if kind == "insert_bytes":
        return content[:at] + args[1] + content[at:]
    return content.replace(b",", args[0]) if is_csv else content


def check_accepted_rows_honour_the_contract(tables, policies) -> None:
    loads = tables.loads()
    for table, load in loads.items():
        assert load.accepted.height + load.rejected.height == load.received
        assert load.rejected.get_column(REASON).null_count() == 0
        assert set(load.rejected.get_column(REASON)) <= set(REASONS)
        assert load.rejected.height <= policies[table].max_rejected_fraction * load.received
    tx, customers, products = tables.transactions.accepted, tables.customers.accepted, tables.products.accepted
    for frame, column in ((tx, CUSTOMER_ID), (tx, PRODUCT_ID), (customers, CUSTOMER_ID), (products, PRODUCT_ID)):
        ids = frame.get_column(column)
        assert ids.dtype == pl.Utf8 and ids.null_count() == 0 and not (ids == "").any()
    assert customers.get_column(CUSTOMER_ID).is_unique().all() and products.get_column(PRODUCT_ID).is_unique().all()
    assert tx.get_column(CUSTOMER_ID).is_in(customers.get_column(CUSTOMER_ID)).all()
    assert tx.get_column(PRODUCT_ID).is_in(products.get_column(PRODUCT_ID)).all()
    assert tx.get_column(TS).null_count() == 0
    assert (tx.get_column(TS) < datetime.combine(FEED_DATE, datetime.min.time())).all()
    assert (tx.get_column(QUANTITY) > 0).all() and tx.get_column(QUANTITY).is_finite().all()


def write_mutated_set(directory: Path, formats: dict, mutations: list) -> dict[str, int | None]:
    """The base set with `mutations` applied; table -> rows written (None where bytes were changed)."""
    written_rows = {}
    for table in TABLES:
        frame = BASE[table]()
        for m in mutations:
            if m[1] == table and m[0] not in ("truncate", "insert_bytes", "replace_delimiter"):
                frame = apply_to_frame(frame, m, formats[table])
        path = write_table(directory, table, frame, formats[table])
        written_rows[table] = frame.height
        for m in mutations:
            if m[1] == table and m[0] in ("truncate", "insert_bytes", "replace_delimiter"):
                path.write_bytes(apply_to_bytes(path.read_bytes(), m, formats[table] == "csv"))
                written_rows[table] = None  # the file's rows are no longer known here
    return written_rows


@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(
    formats=st.fixed_dictionaries({t: st.sampled_from(["csv", "parquet"]) for t in TABLES}),
    mutations=st.lists(MUTATION, min_size=1, max_size=4),
    fraction=st.sampled_from([0.0, 0.01, 0.3, 1.0]),
)
def test_any_mutation_ends_in_a_clean_error_or_exact_accounting(formats, mutations, fraction):
    policies = {t: RejectionPolicy(max_rejected_fraction=fraction) for t in TABLES}
    with tempfile.TemporaryDirectory() as directory:
        directory = Path(directory)
        written_rows = write_mutated_set(directory, formats, mutations)
        try:
            stored = {t: StoredTable.find(directory, t) for t in TABLES}
            tables = load_input_tables(stored, None, policies, FEED_DATE)
        except InputError as exc:
            assert str(exc).strip() and "Traceback" not in str(exc)
            return
        check_accepted_rows_honour_the_contract(tables, policies)
        for table, load in tables.loads().items():
            if written_rows[table] is not None:
                assert load.received == written_rows[table]


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(mutations=st.lists(MUTATION, min_size=1, max_size=4), fraction=st.sampled_from([0.01, 1.0]))
def test_any_mutation_loads_the_same_streamed_in_chunks_as_whole(mutations, fraction):
    policies = {t: RejectionPolicy(max_rejected_fraction=fraction) for t in TABLES}
    with tempfile.TemporaryDirectory() as directory:
        directory = Path(directory)
        write_mutated_set(directory, {t: "parquet" for t in TABLES}, mutations)  # Parquet: what is read in chunks
        outcomes = []
        for spool_dir in (None, directory / "spool"):
            try:
                stored = {t: StoredTable.find(directory, t) for t in TABLES}
                tables = load_input_tables(stored, None, policies, FEED_DATE, spool_dir=spool_dir, chunk_rows=3)
                tx = tables.transactions
                outcomes.append((tx.received, tx.counts().rows(), tx.describe_rejections(), tx.accepted, tx.rejected))
            except InputError as exc:
                # A damaged file is reported by whichever reader met it (polars whole, pyarrow in chunks), each in
                # its own words after ours.
                message = re.sub(r"(expected a Parquet file\)): .*", r"\1", str(exc), flags=re.DOTALL)
                outcomes.append((type(exc).__name__, message))
        whole, streamed = outcomes
        assert streamed[:3] == whole[:3]
        assert all(s.equals(w) for s, w in zip(streamed[3:], whole[3:]))  # frames: NaN equals NaN here


def test_unmutated_base_set_loads_without_rejections(tmp_path):
    for table in TABLES:
        write_table(tmp_path, table, BASE[table](), "csv")
    tables = load_input_tables({t: StoredTable.find(tmp_path, t) for t in TABLES}, None, None, FEED_DATE)
    assert all(load.rejected.is_empty() for load in tables.loads().values())
    assert date(2024, 2, 1) <= tables.transactions.accepted.get_column(TS).min().date()
