"""Postgres as a source, on a real server (`pg_url`): streamed export, same validation as files, quoted identifiers."""

from __future__ import annotations

from datetime import date, datetime

import polars as pl
import pytest

from feedpipe import contract
from feedpipe.contract import CUSTOMER_ID, CUSTOMERS, PRODUCT_ID, PRODUCTS, QUANTITY, TRANSACTIONS, TS
from feedpipe.database import connect
from feedpipe.input_config import (
    InputConfig, InputConfigError, InputError, PostgresSource, PostgresTableSource, load_input_config,
)
from feedpipe.input_tables import load_input_tables, open_table
from feedpipe.postgres_source import export_table
from feedpipe.quarantine import REASON, ROW, RejectionPolicy
from feedpipe.sources import load_products

URL_ENV = "FEEDPIPE_TEST_SOURCE_URL"
FEED_DATE = date(2024, 3, 1)
LENIENT = {t: RejectionPolicy(max_rejected_fraction=1.0) for t in contract.TABLES}

SETUP = """
CREATE SCHEMA sales;
CREATE TABLE sales.orders (cust_no bigint, sku text, ordered_at timestamptz, qty numeric(8, 2));
INSERT INTO sales.orders
  SELECT 1 + i % 5, 'p' || (1 + i % 3), timestamptz '2024-02-01 10:00+01' + i * interval '1 day', 1 + i % 2
  FROM generate_series(0, 24) AS i;
CREATE TABLE crm_customers (id integer, age smallint, region varchar(20), active boolean, signup uuid);
INSERT INTO crm_customers VALUES
  (1, 30, 'north', true, gen_random_uuid()), (2, 41, 'south', true, NULL), (3, NULL, NULL, true, NULL),
  (4, 52, 'east', true, NULL), (5, 23, 'west', true, NULL), (6, 70, 'north', false, NULL);
CREATE TABLE products (product_id text, price numeric(10, 2), tags text[]);
INSERT INTO products VALUES ('p1', 9.99, '{a,b}'), ('p2', 4.50, '{}'), ('p3', 12.00, NULL);
CREATE TABLE canary (x int);
INSERT INTO canary VALUES (1), (2), (3);
"""


@pytest.fixture
def source_db(pg_url, monkeypatch):
    with connect(pg_url, autocommit=True) as conn:
        conn.execute(SETUP)
    monkeypatch.setenv(URL_ENV, pg_url)
    return pg_url


def source(chunk_rows: int = 4, **tables: PostgresTableSource) -> PostgresSource:
    defaults = {
        TRANSACTIONS: PostgresTableSource(table="orders", schema="sales",
                                          columns={CUSTOMER_ID: "cust_no", PRODUCT_ID: "sku", TS: "ordered_at", QUANTITY: "qty"}),
        CUSTOMERS: PostgresTableSource(query="select id as customer_id, age, region, signup from crm_customers "
                                             "where active order by id;"),
        PRODUCTS: PostgresTableSource(table="products"),
    }
    return PostgresSource({**defaults, **tables}, url_env=URL_ENV, chunk_rows=chunk_rows)


def load_all(config: InputConfig, tmp_path, policies=None):
    stored = {}
    opened = [open_table(t, None, config, tmp_path / "spool") for t in contract.TABLES]
    for table, context in zip(contract.TABLES, opened):
        stored[table] = context.__enter__()
    try:
        return load_input_tables(stored, config, policies or LENIENT, FEED_DATE)
    finally:
        for context in opened:
            context.__exit__(None, None, None)


def canary_rows(url: str) -> int:
    with connect(url) as conn:
        return conn.execute("select count(*) from canary").fetchone()[0]


def test_tables_and_a_query_load_from_postgres_typed_like_files(source_db, tmp_path):
    tables = load_all(InputConfig(postgres=source()), tmp_path)

    tx, customers, products = tables.transactions.accepted, tables.customers.accepted, tables.products.accepted
    assert tx.schema == pl.Schema({CUSTOMER_ID: pl.Utf8, PRODUCT_ID: pl.Utf8, TS: pl.Datetime("us"), QUANTITY: pl.Float64})
    assert tx.height == 25 and tx.row(0) == ("1", "p1", datetime(2024, 2, 1, 9), 1.0)  # timestamptz -> naive UTC
    assert customers.schema == pl.Schema({CUSTOMER_ID: pl.Utf8, "age": pl.Float64, "region": pl.Utf8, "signup": pl.Utf8})
    assert customers.get_column(CUSTOMER_ID).to_list() == ["1", "2", "3", "4", "5"]
    assert products.rows() == [("p1", 9.99, ["a", "b"]), ("p2", 4.5, []), ("p3", 12.0, [])]
    assert tables.transactions.source == "postgres table sales.orders"
    assert not list((tmp_path / "spool").iterdir())  # the spooled exports are gone


def test_export_fetches_in_chunks_through_a_server_side_cursor(source_db, tmp_path):
    seen = []

    def progress(rows: int, chunks: int) -> None:
        # What the exporting session last ran, seen from another session: a FETCH from the named cursor.
        with connect(source_db) as spy:
            query = spy.execute("select query from pg_stat_activity where application_name = 'feedpipe' "
                                "and datname = current_database() and pid <> pg_backend_pid()").fetchone()[0]
        seen.append((rows, chunks, query.split()[0].upper()))

    export = export_table(source_db, source(chunk_rows=10), TRANSACTIONS, tmp_path, progress)

    assert (export.rows, export.chunks) == (25, 3)
    assert [s[:2] for s in seen] == [(10, 1), (20, 2), (25, 3)]
    assert {s[2] for s in seen} == {"FETCH"}
    assert pl.read_parquet(export.stored.path).height == 25


def test_only_the_columns_the_loader_reads_leave_the_database(source_db, tmp_path):
    with connect(source_db, autocommit=True) as conn:
        conn.execute("ALTER TABLE sales.orders ADD COLUMN note text DEFAULT repeat('x', 2000)")

    export = export_table(source_db, source(), TRANSACTIONS, tmp_path)

    assert list(pl.read_parquet_schema(export.stored.path)) == [CUSTOMER_ID, PRODUCT_ID, TS, QUANTITY]
    assert export.rows == 25


def test_transactions_without_a_required_column_fail_before_a_row_is_fetched(source_db, tmp_path):
    fetched = []
    no_ts = PostgresTableSource(table="orders", schema="sales", columns={CUSTOMER_ID: "cust_no", PRODUCT_ID: "sku"})

    with pytest.raises(InputError, match=r"^postgres table sales\.orders: missing required column\(s\) 'ts'; "
                                         r"found 'customer_id', 'product_id', 'ordered_at', 'qty'$"):
        export_table(source_db, source(transactions=no_ts), TRANSACTIONS, tmp_path, lambda rows, _: fetched.append(rows))

    assert fetched == []


def test_streamed_postgres_transactions_load_like_the_whole_table(source_db, tmp_path):
    config = InputConfig(postgres=source(chunk_rows=4))
    stored = {}
    opened = [open_table(t, None, config, tmp_path / "spool") for t in contract.TABLES]
    for table, context in zip(contract.TABLES, opened):
        stored[table] = context.__enter__()
    try:
        whole = load_input_tables(stored, config, LENIENT, FEED_DATE).transactions
        streamed = load_input_tables(stored, config, LENIENT, FEED_DATE, spool_dir=tmp_path / "load").transactions
    finally:
        for context in opened:
            context.__exit__(None, None, None)

    assert streamed.received == whole.received == 25
    assert streamed.accepted.equals(whole.accepted) and streamed.rejected.equals(whole.rejected)
    assert streamed.source == whole.source == "postgres table sales.orders"


def test_bad_rows_in_postgres_are_rejected_with_row_numbers_in_query_order(source_db, tmp_path):
    with connect(source_db, autocommit=True) as conn:
        conn.execute("CREATE TABLE messy AS SELECT * FROM (VALUES (1, 'c1', 'p1', timestamp '2024-02-02', 1.0),"
                     " (2, NULL, 'p1', timestamp '2024-02-02', 1.0), (3, '1', 'p1', timestamp '2024-03-02', 1.0),"
                     " (4, '1', 'p9', timestamp '2024-02-02', 1.0), (5, '2', 'p2', timestamp '2024-02-02', -2.0))"
                     " AS t(n, customer_id, product_id, ts, quantity)")
    messy = PostgresTableSource(query="select customer_id, product_id, ts, quantity from messy order by n")

    tx = load_all(InputConfig(postgres=source(transactions=messy)), tmp_path).transactions

    assert tx.source == "postgres query (source.postgres.transactions.query)"
    assert tx.rejected.select(ROW, REASON).rows() == [
        (1, "unknown_customer"), (2, "missing_id"), (3, "ts_after_feed_date"), (4, "unknown_product"),
        (5, "non_positive_quantity"),
    ]
    assert tx.accepted.height + tx.rejected.height == tx.received == 5


def test_identifiers_with_quotes_and_spaces_are_quoted_not_interpreted(source_db, tmp_path):
    with connect(source_db, autocommit=True) as conn:
        conn.execute('CREATE SCHEMA "My Schema"; CREATE TABLE "My Schema"."Odd ""Name""; x" ("we""ird col" text, "Age" int);'
                     """INSERT INTO "My Schema"."Odd ""Name""; x" VALUES ('c1', 30), ('c2', 40)""")
    odd = PostgresTableSource(table='Odd "Name"; x', schema="My Schema", columns={CUSTOMER_ID: 'we"ird col'})

    customers = load_all(InputConfig(postgres=source(customers=odd)), tmp_path).customers.accepted

    assert customers.rows() == [("c1", 30.0), ("c2", 40.0)] and customers.columns == [CUSTOMER_ID, "Age"]


INJECTIONS = [
    'orders"; DROP TABLE canary; --',
    "orders; DROP TABLE canary",
    "x' OR '1'='1",
    'canary" CASCADE; CREATE TABLE pwned (); --',
    '"',
    "public.canary",
    "nul\x00byte",
    "n" * 64,
]
POSITIONS = {
    "schema": lambda bad: PostgresTableSource(table="products", schema=bad),
    "table": lambda bad: PostgresTableSource(table=bad),
    "source column": lambda bad: PostgresTableSource(table="products", columns={PRODUCT_ID: bad}),
    "column name": lambda bad: PostgresTableSource(table="products", columns={bad: "price"}),
}


def test_injection_strings_in_every_configured_identifier_stay_names(source_db, tmp_path):
    outcomes = []
    for position, build in POSITIONS.items():
        for bad in INJECTIONS:
            try:
                config = InputConfig(postgres=source(products=build(bad)))
                with open_table(PRODUCTS, None, config, tmp_path / "spool") as stored:
                    products = load_products(stored, config).accepted
                outcome = "loaded"
                # Loading can only succeed where the string became a column's name, verbatim.
                assert position == "column name" and bad in products.columns, (position, bad)
            except InputError as exc:
                outcome = "refused"
                assert "Traceback" not in str(exc)
            outcomes.append((position, bad, outcome))
            assert canary_rows(source_db) == 3, (position, bad)
    with connect(source_db) as conn:
        assert conn.execute("select to_regclass('pwned')").fetchone()[0] is None
    refused = {(p, b) for p, b, o in outcomes if o == "refused"}
    assert all((p, b) in refused for p in ("schema", "table", "source column") for b in INJECTIONS)
    assert ("column name", "nul\x00byte") in refused and ("column name", "n" * 64) in refused


def test_a_configured_query_runs_read_only(source_db, tmp_path):
    with connect(source_db, autocommit=True) as conn:
        conn.execute("create function wipe() returns text language sql as 'delete from canary; select ''p1''::text'")
    writer = PostgresTableSource(query="select wipe() as product_id")

    with pytest.raises(InputError, match=r"postgres query .*read-only transaction"):
        load_all(InputConfig(postgres=source(products=writer)), tmp_path)

    assert canary_rows(source_db) == 3


def _orders_with_extra_rows(source_db, tmp_path, table: str, create: str, inserts: list[str]):
    """(transactions loaded from sales.<table>, made by `create` and `inserts`; the plain orders' transactions)."""
    with connect(source_db, autocommit=True) as conn:
        conn.execute(create)
        for insert in inserts:
            conn.execute(insert)
    columns = {CUSTOMER_ID: "cust_no", PRODUCT_ID: "sku", TS: "ordered_at", QUANTITY: "qty"}
    tx = load_all(InputConfig(postgres=source(transactions=PostgresTableSource(
        table=table, schema="sales", columns=columns))), tmp_path).transactions
    return tx, load_all(InputConfig(postgres=source()), tmp_path / "plain").transactions


def test_an_infinite_timestamp_is_one_rejected_row_not_a_failed_load(source_db, tmp_path):
    tx, plain = _orders_with_extra_rows(source_db, tmp_path, "orders_inf",
                                        "CREATE TABLE sales.orders_inf AS SELECT * FROM sales.orders",
                                        ["INSERT INTO sales.orders_inf SELECT cust_no, sku, 'infinity', qty "
                                         "FROM sales.orders LIMIT 1"])
    assert tx.received == plain.received + 1
    assert tx.counts_by_reason()["missing_ts"] == plain.counts_by_reason().get("missing_ts", 0) + 1


def test_timestamps_and_numbers_python_cannot_hold_are_rejected_rows_not_a_failed_load(source_db, tmp_path):
    odd = "INSERT INTO sales.orders_odd SELECT cust_no, sku, {ts}, {qty} FROM sales.orders LIMIT 1"
    tx, plain = _orders_with_extra_rows(
        source_db, tmp_path, "orders_odd",
        "CREATE TABLE sales.orders_odd AS SELECT cust_no, sku, ordered_at, qty::numeric AS qty FROM sales.orders",
        [odd.format(ts="timestamptz '10000-01-01 00:00+00'", qty="qty"),
         odd.format(ts="timestamptz '0044-03-15 12:00+00 BC'", qty="qty"),
         odd.format(ts="ordered_at", qty="1e400"), odd.format(ts="ordered_at", qty="1e-400")])
    assert tx.received == plain.received + 4
    assert tx.counts_by_reason()["missing_ts"] == plain.counts_by_reason().get("missing_ts", 0) + 2
    assert tx.counts_by_reason()["invalid_number"] == plain.counts_by_reason().get("invalid_number", 0) + 2
    assert tx.accepted.height == plain.accepted.height


def test_char_n_ids_match_text_ids(source_db, tmp_path):
    padded = PostgresTableSource(query="select id::text::char(8) as customer_id, age, region, signup "
                                       "from crm_customers where active order by id")
    tables = load_all(InputConfig(postgres=source(customers=padded)), tmp_path)
    expected = load_all(InputConfig(postgres=source()), tmp_path / "plain")
    assert tables.customers.accepted.get_column(CUSTOMER_ID).to_list() == ["1", "2", "3", "4", "5"]
    assert tables.transactions.accepted.height == expected.transactions.accepted.height > 0


def test_a_numeric_id_column_loads_as_text_ids(source_db, tmp_path):
    numeric = PostgresTableSource(query="select id::numeric(12, 0) as customer_id, age, region, signup "
                                        "from crm_customers where active order by id")
    tables = load_all(InputConfig(postgres=source(customers=numeric)), tmp_path)
    expected = load_all(InputConfig(postgres=source()), tmp_path / "plain")
    ids = tables.customers.accepted.get_column(CUSTOMER_ID)
    assert ids.dtype == pl.Utf8 and ids.to_list() == expected.customers.accepted.get_column(CUSTOMER_ID).cast(pl.Utf8).to_list()
    assert tables.transactions.accepted.height == expected.transactions.accepted.height


def test_a_query_ending_in_a_comment_loads(source_db, tmp_path):
    commented = PostgresTableSource(query="select id as customer_id, age, region, signup from crm_customers "
                                          "where active order by id -- the live ones")
    tables = load_all(InputConfig(postgres=source(customers=commented)), tmp_path)
    expected = load_all(InputConfig(postgres=source()), tmp_path / "plain")
    assert tables.customers.accepted.equals(expected.customers.accepted)
    assert tables.customers.accepted.height > 0


def test_missing_table_and_missing_url_variable_are_clear_errors(source_db, tmp_path, monkeypatch):
    with pytest.raises(InputError, match=r'postgres table sales\.nope: cannot read it: relation "sales.nope" does not exist'):
        load_all(InputConfig(postgres=source(products=PostgresTableSource(table="nope", schema="sales"))), tmp_path)
    with pytest.raises(InputConfigError, match=r"source\.postgres\.transactions\.columns\.ts.*has no column 'when'"):
        load_all(InputConfig(postgres=source(transactions=PostgresTableSource(table="orders", schema="sales",
                                                                                 columns={TS: "when"}))), tmp_path)
    monkeypatch.delenv(URL_ENV)
    with pytest.raises(InputConfigError, match=rf"url_env.*{URL_ENV} is not set"):
        load_all(InputConfig(postgres=source()), tmp_path)


def test_yaml_source_section_is_parsed_and_validated(tmp_path):
    path = tmp_path / "input.yaml"
    path.write_text("source:\n  postgres:\n    url_env: SALES_URL\n    chunk_rows: 1000\n"
                    "    transactions: {schema: sales, table: orders, columns: {ts: ordered_at}}\n"
                    "    customers: {query: 'select 1 as customer_id'}\n    products: {table: products}\n")

    config = load_input_config(path)

    assert config.postgres.url_env == "SALES_URL" and config.postgres.chunk_rows == 1000
    assert config.postgres.tables[TRANSACTIONS].columns == {TS: "ordered_at"}
    for text, key in [
        ("source:\n  postgres:\n    transactions: {table: t, query: q}\n    customers: {table: c}\n    products: {table: p}\n",
         "source.postgres.transactions"),
        ("source:\n  postgres:\n    transactions: {table: t}\n    customers: {table: c}\n", "source.postgres"),
        ("source:\n  postgres:\n    url: postgresql://x\n", "source.postgres.url"),
        ("source:\n  postgres:\n    url_env: 'A-B'\n    transactions: {table: t}\n    customers: {table: c}\n"
         "    products: {table: p}\n", "source.postgres.url_env"),
        ("source:\n  postgres:\n    transactions: {table: ''}\n    customers: {table: c}\n    products: {table: p}\n",
         "source.postgres.transactions.table"),
    ]:
        path.write_text(text)
        with pytest.raises(InputConfigError, match=rf"input\.yaml: key '{key}'"):
            load_input_config(path)
