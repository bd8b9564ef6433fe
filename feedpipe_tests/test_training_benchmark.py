"""benchmarks/training.py end to end at a tiny size: the reference runs in its own interpreter."""

import json
import os
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def _run(env: dict) -> dict:
    out = subprocess.run(
        [sys.executable, str(ROOT / "benchmarks" / "training.py"), "--rows", "4000", "--customers", "300",
         "--products", "60", "--repeats", "1"],
        check=True, capture_output=True, text=True, env=env, timeout=300,
    )
    return json.loads(out.stdout.strip().splitlines()[-1])


def test_training_benchmark_runs_the_reference_in_its_own_process_with_openmps_default_waiting():
    figures = _run({k: v for k, v in os.environ.items() if k != "OMP_WAIT_POLICY"})
    # feedpipe's import set PASSIVE in the benchmark's process; the reference's process did not inherit it
    assert figures["reference_omp_wait_policy"] is None
    for key in ("samples_per_s", "reference_samples_per_s", "reference_same_threads_samples_per_s",
                "reference_passive_omp_samples_per_s"):
        assert figures[key] > 0, key
    assert abs(figures["speedup"] - figures["samples_per_s"] / figures["reference_samples_per_s"]) <= 0.011
    assert abs(figures["speedup_vs_passive_omp_reference"]
               - figures["samples_per_s"] / figures["reference_passive_omp_samples_per_s"]) <= 0.011
    assert figures["threads_reference"] >= 1 and figures["rows"] <= 4000


def test_a_wait_policy_the_caller_set_reaches_the_reference_too():
    figures = _run({**os.environ, "OMP_WAIT_POLICY": "PASSIVE"})
    assert figures["reference_omp_wait_policy"] == "PASSIVE"
