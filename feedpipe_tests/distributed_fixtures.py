"""Demo inputs written as the torchrun entry point reads them, and a helper that runs it with 2 ranks."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from datetime import date, timedelta
from pathlib import Path

from feedpipe import sources
from feedpipe.contract import CUSTOMER_ID, CUSTOMERS, PRODUCT_ID, PRODUCTS
from feedpipe.demo_data import generate_demo_data
from feedpipe.training_examples import ExampleConfig, attach_features, build_training_examples
from feedpipe.vocabularies import build_vocabularies, encode_table, side_specs

FEED_DATE = date(2026, 3, 31)
ROOT = Path(__file__).resolve().parent.parent  # torchrun -m finds feedpipe_tests from here


def write_demo_inputs(directory: Path, customers: int, products: int, validation_days: int = 14, seed: int = 1) -> dict:
    """Demo data -> vocabularies dir, examples/customers/products Parquet; returns their paths."""
    data = directory / "data"
    generate_demo_data(data, customers=customers, products=products, end_date=FEED_DATE - timedelta(days=1), seed=seed)
    tx, cu, pr = sources.read_transactions(data), sources.read_customers(data), sources.read_products(data)
    vocab = build_vocabularies({CUSTOMERS: cu, PRODUCTS: pr}, side_specs(CUSTOMERS, cu) + side_specs(PRODUCTS, pr))
    pairs = build_training_examples(
        tx, pr.get_column(PRODUCT_ID), FEED_DATE, ExampleConfig(validation_days=validation_days)
    )
    examples = attach_features(
        pairs,
        encode_table(cu, CUSTOMER_ID, vocab.customer_specs, vocab),
        encode_table(pr, PRODUCT_ID, vocab.product_specs, vocab),
    )
    paths = {
        "vocabularies": directory / "vocabularies",
        "examples": directory / "examples.parquet",
        "customers": directory / "customers.parquet",
        "products": directory / "products.parquet",
        "transactions": directory / "transactions.parquet",
    }
    vocab.save(paths["vocabularies"])
    examples.write_parquet(paths["examples"])
    cu.write_parquet(paths["customers"])
    pr.write_parquet(paths["products"])
    tx.write_parquet(paths["transactions"])
    return paths


def run_ranks(
    args: list[str], ranks: int = 2, timeout: int = 240, entry: str | None = "feedpipe.distributed_jobs"
) -> subprocess.CompletedProcess:
    """`torchrun --nproc_per_node ranks -m feedpipe.distributed_jobs --device cpu ARGS` (gloo), or
    `torchrun ... ARGS` with entry=None; one OpenMP thread per rank: CI has 2 cores, and more
    threads than cores stalls every collective."""
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    env.pop("DAGSTER_PIPES_CONTEXT", None)
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={ranks}"]
    cmd += ["-m", entry, "--device", "cpu", *args] if entry else args
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=timeout, cwd=ROOT)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-5000:]
    return proc


def read_summary(path: Path) -> dict:
    return json.loads(path.read_text())
