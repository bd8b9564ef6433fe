"""Training samples/s and scoring pairs/s with 1 and 2 ranks of `feedpipe.distributed_jobs`.

1 rank is the entry point under plain `python -m` (InProcess training, one-process scoring);
2 ranks is `torchrun --nproc_per_node 2` (TorchRec DMP over gloo, tables sharded table-wise;
scoring split by customer ranges). Every rank runs `--threads-per-rank` OpenMP threads (default
1: on a machine shared with other jobs, a rank with more threads than it has free cores runs
several times slower, which would measure the neighbours rather than feedpipe; on a dedicated
machine pass cores / 2 to compare whole machines).

Figures come from rank 0's summary: training samples/s over the training loop (validation and
checkpoint excluded), AUC of the best epoch, scoring pairs/s over the slowest rank's scoring
(model and table loading excluded). `wall_*` is the whole command, torchrun start-up included.

Usage: benchmarks/distributed.py [--customers C] [--products P] [--epochs E] [--batch-size B]
Prints one JSON line last: train_1, train_2, score_1, score_2, auc_1, auc_2, ...
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from datetime import date, timedelta
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from feedpipe import sources  # noqa: E402
from feedpipe.contract import CUSTOMER_ID, CUSTOMERS, PRODUCT_ID, PRODUCTS  # noqa: E402
from feedpipe.demo_data import generate_demo_data  # noqa: E402
from feedpipe.training_examples import (  # noqa: E402
    ExampleConfig,
    Window,
    attach_features,
    build_training_examples,
    purchased_pairs,
    window_transactions,
)
from feedpipe.vocabularies import build_vocabularies, encode_table, side_specs  # noqa: E402

FEED_DATE = date(2026, 3, 31)


def write_inputs(d: Path, customers: int, products: int) -> None:
    generate_demo_data(d / "data", customers=customers, products=products, end_date=FEED_DATE - timedelta(days=1))
    tx, cu, pr = sources.read_transactions(d / "data"), sources.read_customers(d / "data"), sources.read_products(d / "data")
    vocab = build_vocabularies({CUSTOMERS: cu, PRODUCTS: pr}, side_specs(CUSTOMERS, cu) + side_specs(PRODUCTS, pr))
    vocab.save(d / "vocabularies")
    pairs = build_training_examples(tx, pr.get_column(PRODUCT_ID), FEED_DATE, ExampleConfig())
    attach_features(
        pairs,
        encode_table(cu, CUSTOMER_ID, vocab.customer_specs, vocab),
        encode_table(pr, PRODUCT_ID, vocab.product_specs, vocab),
    ).write_parquet(d / "examples.parquet")
    cu.write_parquet(d / "customers.parquet")
    pr.write_parquet(d / "products.parquet")
    purchased_pairs(window_transactions(tx, Window.for_feed_date(FEED_DATE, ExampleConfig()))).write_parquet(
        d / "exclude.parquet"
    )


def run_job(ranks: int, job_args: list[str], threads: int) -> float:
    env = {**os.environ, "OMP_NUM_THREADS": str(threads)}
    env.pop("DAGSTER_PIPES_CONTEXT", None)
    if ranks == 1:
        cmd = [sys.executable, "-m", "feedpipe.distributed_jobs", "--device", "cpu", *job_args]
    else:
        cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={ranks}",
               "-m", "feedpipe.distributed_jobs", "--device", "cpu", *job_args]
    t0 = time.perf_counter()
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True)
    if proc.returncode != 0:
        sys.exit(f"{' '.join(cmd)} failed:\n{proc.stdout[-2000:]}\n{proc.stderr[-4000:]}")
    return time.perf_counter() - t0


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--customers", type=int, default=8000)
    p.add_argument("--products", type=int, default=1000)
    p.add_argument("--epochs", type=int, default=2)
    p.add_argument("--batch-size", type=int, default=2048)
    p.add_argument("--top-n", type=int, default=100)
    p.add_argument("--threads-per-rank", type=int, default=1)
    args = p.parse_args()
    cores = os.cpu_count() or 1
    d = Path(tempfile.mkdtemp(prefix="feedpipe_dist_bench_"))
    write_inputs(d, args.customers, args.products)
    config = json.dumps({"epochs": args.epochs, "batch_size": args.batch_size, "patience": args.epochs})

    result: dict = {}
    for ranks in (1, 2):
        model = d / f"model_{ranks}"
        wall = run_job(ranks, ["train", "--examples", str(d / "examples.parquet"), "--vocabularies",
                               str(d / "vocabularies"), "--out", str(model), "--config", config], args.threads_per_rank)
        train = json.loads((model / "summary.json").read_text())
        out = d / f"ranking_{ranks}.parquet"
        wall_score = run_job(ranks, ["score", "--model", str(d / "model_1"), "--customers", str(d / "customers.parquet"),
                                     "--products", str(d / "products.parquet"), "--exclude", str(d / "exclude.parquet"),
                                     "--out", str(out), "--top-n", str(args.top_n)], args.threads_per_rank)
        score = json.loads((d / f"ranking_{ranks}.summary.json").read_text())
        result.update({
            f"train_{ranks}": round(train["samples_per_s"]),
            f"auc_{ranks}": round(train["validation_auc"], 4),
            f"score_{ranks}": round(score["pairs_per_s"]),
            f"wall_train_{ranks}": round(wall, 1),
            f"wall_score_{ranks}": round(wall_score, 1),
            f"rank_scoring_seconds_{ranks}": [round(s, 2) for s in score["rank_seconds"]],
        })
        if ranks == 2:
            result["sharding_plan"] = train["sharding_plan"]
    import polars as pl

    result["rankings_identical"] = pl.read_parquet(d / "ranking_1.parquet").equals(pl.read_parquet(d / "ranking_2.parquet"))
    examples = pl.scan_parquet(d / "examples.parquet").select(pl.len()).collect().item()
    result.update({
        "customers": args.customers, "products": args.products, "examples": examples, "epochs": args.epochs,
        "batch_size": args.batch_size, "top_n": args.top_n, "cores": cores, "threads_per_rank": args.threads_per_rank,
        "backend_2": "gloo", "device": "cpu",
    })
    print(json.dumps(result))


if __name__ == "__main__":
    main()
