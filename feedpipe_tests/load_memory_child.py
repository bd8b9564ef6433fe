"""Run in a fresh process by test_load_memory.py: load the three input tables from Postgres and print the peak RSS.

`python -m feedpipe_tests.load_memory_child URL_ENV TRANSACTIONS_TABLE SPOOL_DIR {streamed|whole} CHUNK_ROWS`
prints one JSON line: peak resident memory (VmHWM, the kernel's high-water mark of this process), the rows received
and accepted, and the seconds the load took. Only what the load imports is imported, so the baseline is small and
the same for every table size.
"""

from __future__ import annotations

import json
import sys
import time
from contextlib import ExitStack
from datetime import date
from pathlib import Path

from feedpipe import contract
from feedpipe.input_config import InputConfig, PostgresSource, PostgresTableSource
from feedpipe.input_tables import load_input_tables, open_table

FEED_DATE = date(2024, 3, 1)


def peak_rss_bytes() -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) * 1024
    raise RuntimeError("no VmHWM in /proc/self/status")


def main(url_env: str, transactions: str, spool_dir: str, mode: str, chunk_rows: str) -> None:
    tables = {contract.TRANSACTIONS: PostgresTableSource(table=transactions),
              contract.CUSTOMERS: PostgresTableSource(table="memory_customers"),
              contract.PRODUCTS: PostgresTableSource(table="memory_products")}
    config = InputConfig(postgres=PostgresSource(tables, url_env=url_env, chunk_rows=int(chunk_rows)))
    started = time.perf_counter()
    with ExitStack() as stack:
        stored = {t: stack.enter_context(open_table(t, None, config, spool_dir)) for t in contract.TABLES}
        loaded = load_input_tables(stored, config, None, FEED_DATE,
                                   spool_dir=Path(spool_dir) / "load" if mode == "streamed" else None)
        tx = loaded.transactions
        received, accepted = tx.received, tx.received - tx.rejected_rows
    print(json.dumps({"peak_rss": peak_rss_bytes(), "received": received, "accepted": accepted,
                      "seconds": round(time.perf_counter() - started, 2)}))


if __name__ == "__main__":
    main(*sys.argv[1:])
