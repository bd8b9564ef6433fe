"""The three input tables together: where they are stored, the references between them, and loading all three.

References: a transaction must name an accepted customer and an accepted product, else it is rejected
(`unknown_customer`, `unknown_product`). Ids are compared as text, exactly as stored, so Parquet integer 42 and CSV
"42" are the same id. The one way text comparison could silently lose rows is an id written as a number differently
in two tables ("007" in one, the integer 7 in the other): such rows are rejected as `id_matches_only_as_number`
rather than `unknown_*`, and the message says why; when it is systematic the rejection policy stops the run with it.

Transactions, the one table that grows without bound, can be checked a chunk at a time (`stream_transactions`): the
same checks per chunk, accepted and rejected rows appended to Parquet files, only counts and the first rejected rows
of each reason kept, so the load's memory is set by `InputConfig.chunk_rows`, not by the table. Customers and
products are loaded whole (see `feedpipe.sources`); their accepted ids are what each chunk is checked against.
"""

from __future__ import annotations

import tempfile
from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from dataclasses import dataclass
from datetime import date
from pathlib import Path

import polars as pl

from feedpipe import contract
from feedpipe.input_config import DEFAULT_CHUNK_ROWS, InputConfig
from feedpipe.postgres_source import export_table, source_url
from feedpipe.quarantine import REASON, Rejection, RejectionPolicy, TableLoad, enforce_policy
from feedpipe.sources import load_customers, load_products, load_transactions, load_transactions_in_chunks
from feedpipe.spooled_load import LoadSpooler, SpooledLoad
from feedpipe.table_files import StoredTable

_INTEGER_TEXT = r"^\s*[+-]?\d+\s*$"


@dataclass(frozen=True)
class InputTables:
    transactions: TableLoad | SpooledLoad
    customers: TableLoad
    products: TableLoad

    def loads(self) -> dict[str, TableLoad | SpooledLoad]:
        return {contract.TRANSACTIONS: self.transactions, contract.CUSTOMERS: self.customers,
                contract.PRODUCTS: self.products}


@contextmanager
def open_table(table: str, data_dir: str | Path | None, config: InputConfig,
               spool_dir: str | Path | None = None) -> Iterator[StoredTable]:
    """The stored form of `table`: its file in `data_dir`, or (with a Postgres source) a spooled export under
    `spool_dir` (default: the system temp directory), removed on exit."""
    if config.postgres is None:
        if data_dir is None:
            raise ValueError("a data directory is needed when the input config names no Postgres source")
        yield StoredTable.find(data_dir, table)
        return
    url = source_url(config.postgres)
    if spool_dir is not None:
        Path(spool_dir).mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(prefix=f"feedpipe-{table}-", dir=spool_dir) as directory:
        yield export_table(url, config.postgres, table, Path(directory)).stored


@dataclass(frozen=True)
class References:
    """What a transaction's ids must name: the accepted customer and product ids, with their integer spellings
    worked out once, however many chunks are checked against them."""

    known: Mapping[str, pl.Series]  # id column -> accepted ids
    as_numbers: Mapping[str, pl.Series]  # id column -> the canonical integer spelling of each accepted id
    sources: Mapping[str, str]  # id column -> where the ids came from, for messages

    @classmethod
    def of(cls, customers: pl.DataFrame, products: pl.DataFrame, customers_source: str = contract.CUSTOMERS,
           products_source: str = contract.PRODUCTS) -> References:
        known = {contract.CUSTOMER_ID: customers.get_column(contract.CUSTOMER_ID),
                 contract.PRODUCT_ID: products.get_column(contract.PRODUCT_ID)}
        as_numbers = {c: ids.to_frame().select(_as_integer(pl.col(c))).to_series() for c, ids in known.items()}
        return cls(known, as_numbers, {contract.CUSTOMER_ID: customers_source, contract.PRODUCT_ID: products_source})

    def reject_unknown(self, transactions: TableLoad) -> TableLoad:
        """`transactions` with rows naming a customer or product that is not known rejected."""
        for column, reason in ((contract.CUSTOMER_ID, "unknown_customer"), (contract.PRODUCT_ID, "unknown_product")):
            source = self.sources[column]
            unknown = pl.col(REASON).is_null() & ~pl.col(column).is_in(self.known[column])
            as_number = unknown & _as_integer(pl.col(column)).is_in(self.as_numbers[column])
            transactions = transactions.reject(
                Rejection("id_matches_only_as_number", column, as_number,
                          f"the id written as in {source}: ids are compared as text, so '007' and 7 differ; write the "
                          "ids the same way in both tables (both integers, or text with the same leading zeros)"),
                Rejection(reason, column, unknown, f"an id present in {source}"),
            )
        return transactions


def reject_unknown_references(transactions: TableLoad, customers: pl.DataFrame, products: pl.DataFrame,
                              customers_source: str = contract.CUSTOMERS,
                              products_source: str = contract.PRODUCTS) -> TableLoad:
    """`transactions` with rows naming a customer or product missing from the accepted frames rejected."""
    return References.of(customers, products, customers_source, products_source).reject_unknown(transactions)


def stream_transactions(stored: StoredTable, references: References, accepted_path: Path, rejected_path: Path,
                        policy: RejectionPolicy = RejectionPolicy(), feed_date: date | None = None,
                        chunk_rows: int = DEFAULT_CHUNK_ROWS) -> SpooledLoad:
    """Transactions checked `chunk_rows` at a time against `references`; accepted rows written to `accepted_path`,
    rejected ones to `rejected_path`. Counts, rows and messages are those of `load_transactions` followed by
    `reject_unknown_references`; the policy is not enforced here (see `enforce_policy`)."""
    with LoadSpooler(accepted_path, rejected_path) as spooler:
        for chunk in load_transactions_in_chunks(stored, None, policy, feed_date, chunk_rows):
            spooler.add(references.reject_unknown(chunk))
        return spooler.finish()


def _as_integer(text: pl.Expr) -> pl.Expr:
    """Text that spells an integer -> its canonical spelling ("+007" -> "7", "-0" -> "0"); other text -> null."""
    digits = text.str.strip_chars().str.replace(r"^\+", "")
    negative = digits.str.starts_with("-")
    magnitude = digits.str.replace(r"^-", "").str.replace(r"^0+(\d)", "${1}")
    canonical = pl.when(negative & (magnitude != "0")).then(pl.lit("-") + magnitude).otherwise(magnitude)
    return pl.when(text.str.contains(_INTEGER_TEXT)).then(canonical)


def load_input_tables(
    stored: Mapping[str, StoredTable],
    config: InputConfig | None = None,
    policies: Mapping[str, RejectionPolicy] | None = None,
    feed_date: date | None = None,
    spool_dir: str | Path | None = None,
    chunk_rows: int | None = None,
) -> InputTables:
    """Customers, products, then transactions checked against them; each table's policy enforced in that order.

    This is what the three Dagster assets do between them, in one call (tests, notebooks, a torchrun worker). With
    `spool_dir`, transactions stream as in the nightly job (`stream_transactions`, `chunk_rows` rows at a time,
    default `config.chunk_rows`, into `<spool_dir>/transactions.accepted.parquet` and `.rejected.parquet`); without,
    they load whole.
    """
    config = config or InputConfig.default()
    policies = policies or {}

    def policy(table: str) -> RejectionPolicy:
        return policies.get(table, RejectionPolicy())

    customers = load_customers(stored[contract.CUSTOMERS], config, policy(contract.CUSTOMERS))
    enforce_policy(customers, policy(contract.CUSTOMERS))
    products = load_products(stored[contract.PRODUCTS], config, policy(contract.PRODUCTS))
    enforce_policy(products, policy(contract.PRODUCTS))
    references = References.of(customers.accepted, products.accepted, customers.source, products.source)
    stored_transactions = stored[contract.TRANSACTIONS]
    if spool_dir is None:
        transactions = load_transactions(stored_transactions, config, policy(contract.TRANSACTIONS), feed_date)
        transactions = references.reject_unknown(transactions)
    else:
        spool = Path(spool_dir)
        transactions = stream_transactions(
            stored_transactions, references, spool / f"{contract.TRANSACTIONS}.accepted.parquet",
            spool / f"{contract.TRANSACTIONS}.rejected.parquet", policy(contract.TRANSACTIONS), feed_date,
            chunk_rows or config.chunk_rows,
        )
    enforce_policy(transactions, policy(contract.TRANSACTIONS))
    return InputTables(transactions, customers, products)
