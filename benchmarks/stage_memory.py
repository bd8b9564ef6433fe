"""Time and peak memory of each asset, each materialized alone in a fresh process.

Run after `feedpipe run` has materialized the partition once (its artifacts are the inputs):

    FEEDPIPE_HOME=H feedpipe run --data DIR --date D
    FEEDPIPE_HOME=H benchmarks/stage_memory.py --data DIR --date D

A child process per asset imports the definitions, notes its resident set (the baseline: Python,
torch, Dagster), materializes the one asset with its inputs loaded by the IO manager, and reports
the seconds and the peak resident set above the baseline (inputs + working memory + output).
ranked_feed is left out (it needs the feed database; see benchmarks/README.md "Publishing").
Prints a table and one JSON line last.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

STAGES = ["customers", "products", "transactions", "vocabularies", "training_examples", "dlrm_model",
          "model_evaluation", "pair_scores"]


def _peak_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # KiB on Linux


def one(asset: str, data: str, date: str, artifacts: str, run_config: dict) -> dict:
    import dagster as dg

    from feedpipe.definitions import build_resources, defs

    baseline = _peak_mb()
    resources = build_resources(artifacts_root=artifacts, data_dir=data)
    t0 = time.perf_counter()
    result = dg.materialize(list(defs.assets), selection=[asset], partition_key=date, resources=resources,
                            instance=dg.DagsterInstance.ephemeral(), run_config=run_config)
    seconds = time.perf_counter() - t0
    # The asset's own numeric metadata (rows, samples/s, pairs/s, ...) explains its time.
    meta = result.asset_materializations_for_node(asset)[0].metadata
    numbers = {k: v.value for k, v in meta.items() if isinstance(v.value, (int, float)) and not isinstance(v.value, bool)}
    if asset == "dlrm_model":
        numbers["epochs"] = len(result.output_for_node("dlrm_model").metrics.get("history", []))
    return {"asset": asset, "seconds": round(seconds, 2), "baseline_mb": round(baseline),
            "peak_above_baseline_mb": round(_peak_mb() - baseline), "metadata": numbers}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--data", required=True)
    p.add_argument("--date", required=True)
    p.add_argument("--artifacts", default="", help="default: $FEEDPIPE_HOME/artifacts")
    p.add_argument("--one", default="", help=argparse.SUPPRESS)
    args = p.parse_args()
    artifacts = args.artifacts or str(Path(os.environ.get("FEEDPIPE_HOME", ".feedpipe")) / "artifacts")
    run_config = {"ops": {"dlrm_model": {"config": {"min_validation_auc": 0.0}}}}
    if args.one:
        ops = {k: v for k, v in run_config["ops"].items() if k == args.one}
        print(json.dumps(one(args.one, args.data, args.date, artifacts, {"ops": ops})))
        return
    rows = []
    for asset in STAGES:
        proc = subprocess.run([sys.executable, __file__, "--data", args.data, "--date", args.date,
                               "--artifacts", artifacts, "--one", asset], capture_output=True, text=True)
        if proc.returncode != 0:
            sys.exit(f"{asset} failed:\n{proc.stderr[-3000:]}")
        rows.append(json.loads(proc.stdout.strip().splitlines()[-1]))
        r = rows[-1]
        print(f"{r['asset']:<18} {r['seconds']:>8.2f}s {r['peak_above_baseline_mb']:>7} MB above {r['baseline_mb']} MB", flush=True)
    print(json.dumps({"data": args.data, "date": args.date, "threads": os.environ.get("OMP_NUM_THREADS", ""), "stages": rows}))


if __name__ == "__main__":
    main()
