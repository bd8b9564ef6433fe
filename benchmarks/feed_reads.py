#!/usr/bin/env python
"""Feed reads through `feedpipe.current_feed` while new versions are published underneath.

`--clients` reader processes (processes, not threads: each has its own interpreter and GIL, as a web server's
workers would) each hold one connection and query random customers' feeds with a prepared statement,
`SELECT product_id, rank, score FROM feedpipe.current_feed WHERE customer_id = $1 ORDER BY rank`, while the main
process runs `--publishes` publishes of a new version of the same customers' feeds (`--customers` x `--k` rows,
retention 2, so each publish also drops a table). Every customer has a feed in every version, so a read with no
rows is an empty read: exactly what an atomic switch must never produce. Readers stop by themselves after the
last publish plus `--tail-s` (or `--max-s` at the latest); loopback connections only, in a scratch database.

`--rate` paces each client to that many queries per second (0: as fast as it can, a closed loop); latencies are
measured from when a paced query was due, so a stall is not hidden by the queries it delays.

Usage: benchmarks/feed_reads.py [--url URL | --embedded] [--clients 8] [--customers 100000] [--k 20]
                                 [--publishes 3] [--rate 0]
Prints one JSON line last: clients, queries, qps, p50_ms, p99_ms, errors, empty_reads, publishes, ...
"""

from __future__ import annotations

import argparse
import json
import multiprocessing as mp
import os
import random
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
sys.path.insert(0, str(Path(__file__).resolve().parent))

import numpy as np  # noqa: E402

from feedpipe.database import connect  # noqa: E402
from feedpipe.publishing import publish_feed  # noqa: E402
from publish import choose_server, realistic_feed, scratch_database, server_settings  # noqa: E402

QUERY = "SELECT product_id, rank, score FROM feedpipe.current_feed WHERE customer_id = %s ORDER BY rank"


def reader(url: str, customer_ids: list[str], k: int, rate: float, seed: int, ready, start, stop, max_s: float,
           results) -> None:
    """One client: query random customers until `stop` (or `max_s`); report (latencies, end times, errors...)."""
    rng = random.Random(seed)
    latencies, ends, errors, empty, short = [], [], [], 0, 0
    with connect(url, autocommit=True) as conn:
        conn.execute(QUERY, [customer_ids[0]], prepare=True).fetchall()  # prepared before the clock starts
        ready.release()
        start.wait()
        t_begin = time.perf_counter()
        due = t_begin
        while not stop.is_set() and time.perf_counter() - t_begin < max_s:
            if rate > 0:
                due += 1.0 / rate
                pause = due - time.perf_counter()
                if pause > 0:
                    time.sleep(pause)
            customer = customer_ids[rng.randrange(len(customer_ids))]
            t0 = time.perf_counter() if rate <= 0 else due
            try:
                rows = conn.execute(QUERY, [customer], prepare=True).fetchall()
            except Exception as exc:  # noqa: BLE001 -- counted and reported, the benchmark goes on
                errors.append(f"{type(exc).__name__}: {str(exc).strip()}"[:300])
                if conn.closed or conn.broken:
                    break
                continue
            t1 = time.perf_counter()
            latencies.append(t1 - max(t0, t_begin))
            ends.append(t1)
            empty += not rows
            short += 0 < len(rows) < k
    results.put((np.array(latencies), np.array(ends), errors, empty, short))


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--url", help="server (default: local 127.0.0.1:5432 if up, else embedded)")
    p.add_argument("--embedded", action="store_true", help="use a fresh embedded pgserver even if a local one is up")
    p.add_argument("--clients", type=int, default=8)
    p.add_argument("--customers", type=int, default=100_000)
    p.add_argument("--k", type=int, default=20)
    p.add_argument("--publishes", type=int, default=3)
    p.add_argument("--rate", type=float, default=0.0, help="queries/s per client (0: closed loop)")
    p.add_argument("--lead-s", type=float, default=1.0, help="reading before the first publish")
    p.add_argument("--tail-s", type=float, default=1.0, help="reading after the last publish")
    p.add_argument("--max-s", type=float, default=300.0, help="readers stop after this long whatever happens")
    args = p.parse_args(argv)

    server_url, server = choose_server(args.url, args.embedded)
    load_before = os.getloadavg()[0]
    feeds = [realistic_feed(args.customers, args.k, seed=v) for v in range(args.publishes + 1)]
    customer_ids = np.unique(feeds[0].customer_id.to_numpy(zero_copy_only=False)).tolist()
    ctx = mp.get_context("spawn")
    with scratch_database(server_url) as url:
        publish_feed(url, feeds[0], feed_date="2024-03-01", model_version="v0")
        settings = server_settings(url)
        ready, start, stop, results = ctx.Semaphore(0), ctx.Event(), ctx.Event(), ctx.Queue()
        procs = [
            ctx.Process(target=reader, args=(url, customer_ids, args.k, args.rate, seed, ready, start, stop,
                                             args.max_s, results))
            for seed in range(args.clients)
        ]
        for proc in procs:
            proc.start()
        for _ in procs:
            if not ready.acquire(timeout=60):
                raise SystemExit("readers did not connect within 60 s")
        start.set()
        t_start = time.perf_counter()
        time.sleep(args.lead_s)
        windows = []
        for v in range(1, args.publishes + 1):
            t0 = time.perf_counter()
            result = publish_feed(url, feeds[v], feed_date="2024-03-01", model_version=f"v{v}", retention=2)
            windows.append((t0, time.perf_counter()))
            print(f"publish {v}: {result.rows:,} rows in {result.seconds:.2f} s (version {result.version})", flush=True)
        time.sleep(args.tail_s)
        stop.set()
        t_stop = time.perf_counter()
        collected = [results.get(timeout=60) for _ in procs]
        for proc in procs:
            proc.join(timeout=30)

    latencies = np.concatenate([c[0] for c in collected]) * 1000
    ends = np.concatenate([c[1] for c in collected])
    errors = [e for c in collected for e in c[2]]
    during = np.zeros(len(ends), dtype=bool)
    for t0, t1 in windows:
        during |= (ends >= t0) & (ends <= t1)
    elapsed = t_stop - t_start
    report = {
        "clients": args.clients,
        "queries": int(len(latencies)),
        "qps": round(len(latencies) / elapsed),
        "p50_ms": round(float(np.percentile(latencies, 50)), 3),
        "p99_ms": round(float(np.percentile(latencies, 99)), 3),
        "max_ms": round(float(latencies.max()), 2),
        "p99_ms_during_publishes": round(float(np.percentile(latencies[during], 99)), 3) if during.any() else None,
        "queries_during_publishes": int(during.sum()),
        "errors": len(errors),
        "first_errors": errors[:3],
        "empty_reads": sum(c[3] for c in collected),
        "short_reads": sum(c[4] for c in collected),
        "publishes": len(windows),
        "publish_s": [round(t1 - t0, 2) for t0, t1 in windows],
        "rows_per_publish": args.customers * args.k,
        "rate_per_client": args.rate or "closed loop",
        "seconds": round(elapsed, 2),
        "server": server,
        "server_version": settings.pop("server_version"),
        "settings": settings,
        "cpu_cores": os.cpu_count(),
        # The machine is shared: the 1-minute load average at the start and at the end says how much it was.
        "load_avg_1m": [round(load_before, 1), round(os.getloadavg()[0], 1)],
    }
    print(json.dumps(report))
    return 0


if __name__ == "__main__":
    sys.exit(main())
