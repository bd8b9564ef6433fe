"""Side by side: the scorer with customers as the first GEMM's rows against products as rows.

    python benchmarks/scoring_layouts.py [--dtype fp32|bf16] [--customers N] [--products M] [--repeats R]

Same random model and tables as benchmarks/scoring.py (default sizes, 10k x 2k, top 100, 20 excluded
products per customer), each call planning its own product side as `pair_scores` does; the two layouts
alternate R times and the medians are kept, so load from other jobs falls on both alike. Also
reports how far the two top-100 lists agree. Last line: one JSON object.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from benchmarks.machine import cpu_name  # noqa: E402
from benchmarks.scoring import demo_like, random_exclusions  # noqa: E402
from feedpipe.scoring import precision, score_all_pairs  # noqa: E402


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--dtype", default="fp32", choices=("fp32", "bf16"))
    ap.add_argument("--customers", type=int, default=10_000)
    ap.add_argument("--products", type=int, default=2_000)
    ap.add_argument("--repeats", type=int, default=5)
    args = ap.parse_args()
    dtype = precision(args.dtype).dtype
    model, customers, products = demo_like(args.customers, args.products, "trained-scale")
    ex = random_exclusions(args.customers, args.products, 20, torch.Generator().manual_seed(2))
    pairs = args.customers * args.products

    def run(rows: bool):
        return score_all_pairs(model, customers, products, top_n=100, exclusions=ex, dtype=dtype,
                               layout_customer_rows=rows)

    results = {rows: run(rows) for rows in (True, False)}  # warm-up, and the agreement check
    a, b = results[True], results[False]
    # Both are exact in fp32 up to the order of additions; bf16 rounds differently in each layout.
    top100_overlap = float((a.product_rows.unsqueeze(2) == b.product_rows.unsqueeze(1)).any(2).float().mean())
    max_score_diff = float((a.scores - b.scores).abs().max())
    rates: dict[bool, list[float]] = {True: [], False: []}
    for _ in range(args.repeats):
        for rows in (True, False):
            t0 = time.perf_counter()
            run(rows)
            rates[rows].append(pairs / (time.perf_counter() - t0))
    customer_rows, product_rows = (statistics.median(rates[r]) for r in (True, False))
    print(json.dumps({
        "customer_rows_pairs_per_s": round(customer_rows),
        "product_rows_pairs_per_s": round(product_rows),
        "speedup": round(customer_rows / product_rows, 2),
        "rounds_speedup": [round(a / b, 2) for a, b in zip(rates[True], rates[False])],
        "top100_overlap": round(top100_overlap, 4),
        "max_score_diff": max_score_diff,
        "dtype": args.dtype, "customers": args.customers, "products": args.products,
        "cpu": cpu_name(), "torch": torch.__version__,
    }))


if __name__ == "__main__":
    main()
