#!/usr/bin/env python
"""Feed publishing throughput against the server's own bulk-load limit, on the same rows and the same index.

- publish: `publishing.publish_feed` end to end, from the ranked arrays (`FeedArrays`) to a switched, indexed,
  analyzed version: schema check, publish lock, binary COPY FROM STDIN of the client-encoded chunks, index,
  ANALYZE, view switch, retention.
- limit: the server reads a binary COPY file of the same rows (written beforehand by the same encoder) with
  `COPY ... FROM '/path'` into a bare table created in the same transaction (FREEZE, as the publish does), then
  the same CREATE INDEX and ANALYZE: no client, no network, no encoding, nothing of the publish's bookkeeping.

Rows look like real ones: customer ids of 6-10 digits, product ids `P00001`..`P50000`, K ranks per customer, in
the (customer_id, rank) order `ranked_feed` produces. Limit and publish run in back-to-back pairs, which goes
first alternating (the machine is shared), each after a CHECKPOINT so neither pays for the other's dirty pages.
Reported: the median times and, as `ratio`, the median of the pairs' limit/publish time ratios. Everything happens
in a scratch database created and dropped here.

Usage: benchmarks/publish.py [--rows N] [--k K] [--repeats R] [--url URL | --embedded]
  --url: a server (the role must be allowed CREATE DATABASE and to read server files, e.g. a superuser, and the
  server must see this machine's /tmp); default the local PostgreSQL at 127.0.0.1:5432 if it answers, else (or
  with --embedded) an embedded pgserver in a temporary directory.
Prints one JSON line last: rows, rows_per_s, limit_rows_per_s, ratio, server, settings, profile.
"""

from __future__ import annotations

import argparse
import atexit
import json
import os
import shutil
import statistics
import sys
import tempfile
import time
import uuid
from contextlib import contextmanager
from pathlib import Path
from urllib.parse import urlsplit, urlunsplit

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import numpy as np  # noqa: E402
import pyarrow as pa  # noqa: E402
import pyarrow.compute as pc  # noqa: E402
from psycopg import sql  # noqa: E402

from feedpipe.copy_binary import DEFAULT_CHUNK_ROWS, FeedArrays, copy_stream, encode_copy_rows  # noqa: E402
from feedpipe.database import DatabaseError, connect, embedded_server_url, redact_url  # noqa: E402
from feedpipe.feed_schema import column_list, create_index_sql, create_table_sql, init_schema, qualified  # noqa: E402
from feedpipe.publishing import publish_feed  # noqa: E402

LOCAL_URL = "postgresql://postgres@127.0.0.1:5432/postgres"
PRODUCTS = 50_000
# What publish_feed sets for its index build (its `maintenance_work_mem` default); the limit uses the same.
MAINTENANCE_WORK_MEM = "256MB"
SETTINGS = (
    "shared_buffers", "maintenance_work_mem", "max_parallel_maintenance_workers", "wal_level", "synchronous_commit",
    "max_wal_size", "fsync", "full_page_writes", "wal_compression",
)


def realistic_feed(customers: int, k: int = 20, seed: int = 0, catalogue: int = PRODUCTS) -> FeedArrays:
    """`customers` x `k` rows sorted by (customer_id, rank); the same customers for any seed, products vary."""
    ids_rng = np.random.default_rng(12345)  # customer ids fixed: every version serves the same customers
    ids = np.unique(ids_rng.integers(10**5, 10**10, size=int(customers * 1.05) + 16))
    ids = np.sort(ids_rng.permutation(ids)[:customers].astype(str))
    rng = np.random.default_rng(seed)
    products = pa.array(np.char.add("P", np.char.zfill(np.arange(1, catalogue + 1).astype(str), 5)), pa.large_string())
    return FeedArrays(
        customer_id=pc.take(pa.array(ids, pa.large_string()), pa.array(np.repeat(np.arange(customers), k))),
        product_id=pc.take(products, pa.array(rng.integers(0, catalogue, customers * k))),
        rank=np.tile(np.arange(1, k + 1, dtype=np.int32), customers),
        score=np.sort(rng.random((customers, k), dtype=np.float32), axis=1)[:, ::-1].ravel(),
    )


def choose_server(url: str | None, embedded: bool) -> tuple[str, str]:
    """(url, description): `url`; else the local server if it answers, else (or if `embedded`) a fresh embedded
    pgserver in a temporary directory, stopped and deleted at exit."""
    if url:
        return url, redact_url(url)
    if not embedded:
        try:
            with connect(LOCAL_URL, connect_timeout=2):
                return LOCAL_URL, "local PostgreSQL (127.0.0.1:5432)"
        except DatabaseError:
            pass
    parent = Path(tempfile.mkdtemp(prefix="feedpipe_bench_pg_"))
    atexit.register(shutil.rmtree, parent, True)  # registered first, so it runs after pgserver's stop-and-delete
    pgdata = parent / "pgdata"
    return embedded_server_url(pgdata, cleanup_mode="delete"), "embedded pgserver"


@contextmanager
def scratch_database(server_url: str):
    name = f"feedpipe_bench_{uuid.uuid4().hex[:10]}"
    with connect(server_url, autocommit=True) as conn:
        conn.execute(sql.SQL("CREATE DATABASE {}").format(sql.Identifier(name)))
    parts = urlsplit(server_url)
    try:
        yield urlunsplit((parts.scheme, parts.netloc, f"/{name}", parts.query, parts.fragment))
    finally:
        with connect(server_url, autocommit=True) as conn:
            conn.execute(sql.SQL("DROP DATABASE IF EXISTS {} WITH (FORCE)").format(sql.Identifier(name)))


def server_settings(url: str) -> dict:
    with connect(url) as conn:
        settings = {name: conn.execute(sql.SQL("SHOW {}").format(sql.Identifier(name))).fetchone()[0]
                    for name in SETTINGS}
        settings["server_version"] = conn.execute("SHOW server_version").fetchone()[0]
        settings["max_parallel_workers"] = conn.execute("SHOW max_parallel_workers").fetchone()[0]
    settings["maintenance_work_mem_for_index"] = MAINTENANCE_WORK_MEM  # set per transaction by both loads
    return settings


def write_copy_file(feed: FeedArrays, directory: Path) -> Path:
    """The feed as one binary COPY file the server's own user can read (world-readable, under /tmp)."""
    path = directory / "feed.copy"
    with open(path, "wb") as out:
        for block in copy_stream(feed):
            out.write(block)
    directory.chmod(0o755)
    path.chmod(0o644)
    return path


def server_load(url: str, path: Path, table: str = "bench_limit") -> dict:
    """The limit: the server reads `path` into a fresh table, then the publish's index and ANALYZE."""
    copy_sql = sql.SQL("COPY {} ({}) FROM {} (FORMAT BINARY, FREEZE)").format(
        qualified(table), column_list(), sql.Literal(str(path))
    )
    with connect(url, autocommit=True) as conn:
        conn.execute(sql.SQL("DROP TABLE IF EXISTS {}").format(qualified(table)))
        conn.execute("CHECKPOINT")
        t0 = time.perf_counter()
        with conn.transaction():
            conn.execute("SELECT set_config('maintenance_work_mem', %s, true)", [MAINTENANCE_WORK_MEM])
            conn.execute(create_table_sql(table))
            conn.execute(copy_sql)
            t1 = time.perf_counter()
            conn.execute(create_index_sql(table))
            conn.execute(sql.SQL("ANALYZE {}").format(qualified(table)))
        t2 = time.perf_counter()
        conn.execute(sql.SQL("DROP TABLE {}").format(qualified(table)))
    return {"seconds": t2 - t0, "copy_s": t1 - t0, "index_analyze_s": t2 - t1}


def project_publish(url: str, feed: FeedArrays, run: int) -> dict:
    with connect(url, autocommit=True) as conn:
        conn.execute("CHECKPOINT")
    t0 = time.perf_counter()
    result = publish_feed(url, feed, feed_date="2024-03-01", model_version=f"bench-{run}", retention=1)
    seconds = time.perf_counter() - t0
    return {"seconds": seconds, "copy_s": result.copy_seconds, "index_analyze_s": result.index_seconds,
            "other_s": seconds - result.copy_seconds - result.index_seconds}


def encode_only(feed: FeedArrays) -> float:
    """Client-side encoding of every chunk, nothing sent: the publish's CPU cost before the socket."""
    t0 = time.perf_counter()
    for start in range(0, len(feed), DEFAULT_CHUNK_ROWS):
        encode_copy_rows(feed, start, min(start + DEFAULT_CHUNK_ROWS, len(feed)))
    return time.perf_counter() - t0


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--rows", type=int, default=10_000_000, help="feed rows (default 10,000,000)")
    p.add_argument("--k", type=int, default=20, help="ranks per customer (default 20)")
    p.add_argument("--repeats", type=int, default=3, help="alternating limit/publish pairs (default 3)")
    p.add_argument("--url", help="server to use (default: local 127.0.0.1:5432 if up, else embedded)")
    p.add_argument("--embedded", action="store_true", help="use a fresh embedded pgserver even if a local one is up")
    args = p.parse_args(argv)

    server_url, server = choose_server(args.url, args.embedded)
    customers = max(1, args.rows // args.k)
    load_before = os.getloadavg()[0]
    t0 = time.perf_counter()
    feed = realistic_feed(customers, args.k)
    rows = len(feed)
    print(f"{rows:,} rows ({customers:,} customers x {args.k}) built in {time.perf_counter() - t0:.1f} s; "
          f"server: {server}", flush=True)

    work = Path(tempfile.mkdtemp(prefix="feedpipe_bench_copy_", dir="/tmp"))
    try:
        path = write_copy_file(feed, work)
        bytes_per_row = path.stat().st_size / rows
        print(f"binary COPY file: {path.stat().st_size / 1e6:,.0f} MB ({bytes_per_row:.1f} B/row)")
        encode_s = encode_only(feed)
        print(f"client encode alone: {encode_s:.2f} s ({rows / encode_s:,.0f} rows/s, one core)")
        with scratch_database(server_url) as url:
            with connect(url) as conn:
                init_schema(conn)  # so the limit's table has its schema; the publish would do it anyway
            settings = server_settings(url)
            limits, publishes = [], []
            for run in range(args.repeats):
                # Alternating which goes first, so a load that drifts over the run favours neither side.
                if run % 2 == 0:
                    limits.append(server_load(url, path))
                    publishes.append(project_publish(url, feed, run))
                else:
                    publishes.append(project_publish(url, feed, run))
                    limits.append(server_load(url, path))
                lim, pub = limits[-1], publishes[-1]
                print(
                    f"run {run + 1}: limit {lim['seconds']:.2f} s (copy {lim['copy_s']:.2f}, index+analyze "
                    f"{lim['index_analyze_s']:.2f}) = {rows / lim['seconds']:,.0f} rows/s | publish "
                    f"{pub['seconds']:.2f} s (copy {pub['copy_s']:.2f}, index+analyze {pub['index_analyze_s']:.2f}, "
                    f"rest {pub['other_s']:.2f}) = {rows / pub['seconds']:,.0f} rows/s | ratio "
                    f"{lim['seconds'] / pub['seconds']:.2f}",
                    flush=True,
                )
    finally:
        shutil.rmtree(work, ignore_errors=True)

    def median(runs: list[dict], key: str) -> float:
        return statistics.median(r[key] for r in runs)

    publish_s, limit_s = median(publishes, "seconds"), median(limits, "seconds")
    pair_ratios = [lim["seconds"] / pub["seconds"] for lim, pub in zip(limits, publishes, strict=True)]
    report = {
        "rows": rows,
        "customers": customers,
        "k": args.k,
        "repeats": args.repeats,
        "rows_per_s": round(rows / publish_s),
        "limit_rows_per_s": round(rows / limit_s),
        # Each limit/publish pair ran back to back under the same load: the median of their ratios.
        "ratio": round(statistics.median(pair_ratios), 3),
        "ratio_of_medians": round(limit_s / publish_s, 3),
        "publish_s": round(publish_s, 2),
        "limit_s": round(limit_s, 2),
        "server": server,
        "server_version": settings.pop("server_version"),
        "settings": settings,
        "cpu_cores": os.cpu_count(),
        # The machine is shared: the 1-minute load average at the start and at the end says how much it was.
        "load_avg_1m": [round(load_before, 1), round(os.getloadavg()[0], 1)],
        "profile": {
            "client_encode_s": round(encode_s, 2),
            "publish_copy_s": round(median(publishes, "copy_s"), 2),
            "publish_index_analyze_s": round(median(publishes, "index_analyze_s"), 2),
            "publish_other_s": round(median(publishes, "other_s"), 2),
            "limit_copy_s": round(median(limits, "copy_s"), 2),
            "limit_index_analyze_s": round(median(limits, "index_analyze_s"), 2),
            "copy_bytes_per_row": round(bytes_per_row, 1),
        },
        "runs": {"publish_s": [round(r["seconds"], 2) for r in publishes],
                 "limit_s": [round(r["seconds"], 2) for r in limits]},
    }
    print(json.dumps(report))
    return 0


if __name__ == "__main__":
    sys.exit(main())
