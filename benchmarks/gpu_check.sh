#!/usr/bin/env bash
# The GPU checks of the scorer and the training loop, in one call of a lent GPU machine.
#
#   benchmarks/gpu_check.sh fetch    here: download the wheels the GPU machine lacks into .whl/
#   benchmarks/gpu_check.sh run      there (repo root, .whl carried): CUDA tests, scoring and training benchmarks
#   benchmarks/gpu_check.sh run scoring    there: CUDA tests, then the scorer profiled and at several tile sizes
#   benchmarks/gpu_check.sh run quick      there: CUDA tests, the default-size scorer (bf16, fp32) and training
#
# The GPU image has python 3.12 with a CUDA torch (2.11) and no fbgemm, torchrec, tensordict or polars.
# fbgemm-gpu-cpu is FBGEMM's CPU build: TorchRec imports it, and the paths checked here (unsharded
# EmbeddingBagCollection, the flat training tables, the scorer) call none of its kernels (an audit
# under a TorchDispatchMode on the CPU found no fbgemm op in them). Its version follows fbgemm's
# torch table (1.6 <-> torch 2.11); torchrec 1.6.1 is kept as a fallback should 1.8.0 not import there.
# Results land in $OUT (the device tool brings them back): summary.txt, results.jsonl, gpu_check.log.
set -uo pipefail
cd "$(dirname "$0")/.."

fetch() {
  local p="--no-deps --only-binary=:all: --python-version 3.12 --implementation cp
           --platform manylinux_2_28_x86_64 --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64"
  mkdir -p .whl/alt
  grep -qx "/.whl/" .git/info/exclude 2>/dev/null || echo "/.whl/" >> .git/info/exclude
  python3 -m pip download -q $p -d .whl torchrec==1.8.0 fbgemm-gpu-cpu==1.6.0 tensordict==0.15.3 pyvers==0.2.3 \
    iopath==0.1.9 polars==2.1.0 polars-runtime-32==2.1.0
  python3 -m pip download -q $p -d .whl/alt torchrec==1.6.1
  du -sh .whl
}

run() {
  local what=${1:-all}
  OUT=${OUT:-/tmp/gpu_check}
  mkdir -p "$OUT"
  export PYTHONUNBUFFERED=1 PYTHONPATH=/tmp/site:$PWD
  local log=$OUT/gpu_check.log summary=$OUT/summary.txt
  say() { echo "== $*" | tee -a "$summary"; }
  step() {  # step NAME SECONDS CMD...: run with a limit; its last line (the JSON) goes to results.jsonl
    local name=$1 limit=$2; shift 2
    local t0=$SECONDS
    echo "== $name: $*" >> "$log"
    timeout "$limit" "$@" > /tmp/step.out 2> /tmp/step.err
    local rc=$?
    cat /tmp/step.err /tmp/step.out >> "$log"
    local last; last=$(tail -n 1 /tmp/step.out)
    case $last in "{"*) ;; *) last="\"${last//\"/\'}\"" ;; esac
    [ $rc -eq 0 ] && echo "{\"step\": \"$name\", \"result\": $last}" >> "$OUT/results.jsonl"
    say "$name rc=$rc $((SECONDS - t0))s: $(tail -n 1 /tmp/step.out | cut -c1-1500)"
    [ $rc -eq 0 ] || tail -n 15 /tmp/step.err | cut -c1-300 | tee -a "$summary"
  }

  say "$(date -u +%FT%TZ) $(nvidia-smi --query-gpu=name,memory.total,driver_version,clocks.max.sm --format=csv,noheader)"
  python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --target /tmp/site .whl/*.whl >> "$log" 2>&1
  local imports="import torch, fbgemm_gpu, torchrec, polars; from torchrec.models.dlrm import DLRMTrain; print(torch.__version__, torchrec.__version__ if hasattr(torchrec, '__version__') else '', polars.__version__)"
  if ! python3 -c "$imports" >> "$log" 2>&1; then
    say "torchrec 1.8.0 did not import (see gpu_check.log); trying torchrec 1.6.1"
    python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/alt/*.whl >> "$log" 2>&1
    python3 -c "$imports" >> "$log" 2>&1 || { say "imports failed"; tail -n 30 "$log"; return 1; }
  fi
  say "python $(python3 -c 'import sys, torch, torchrec.version as v; print(sys.version.split()[0], "torch", torch.__version__, "torchrec", getattr(v, "__version__", "?"))' 2>/dev/null)"

  # Most important first: a run cut off at its limit still reports these.
  step pytest_cuda 120 python3 -m pytest --noconftest -p no:cacheprovider -q -rs -k "cuda or flat" \
    feedpipe_tests/test_model_training.py feedpipe_tests/test_scoring.py feedpipe_tests/test_flat_embeddings.py
  local bench="python3 benchmarks/scoring.py --device cuda"
  if [ "$what" = scoring ]; then  # the scorer alone: profiles and tile sizes
    step score_bf16_profile 75 $bench --dtype bf16 --repeats 5 --profile
    # customers as rows (the CPU layout since session 4; not yet measured on a GPU; since session 5 a
    # 512k-pair tile in that layout is 1024 customers x 512 products, where it was 256 x 2048)
    step score_bf16_customer_rows 60 $bench --dtype bf16 --repeats 5 --layout customer-rows --profile
    step score_bf16_tile256k 60 $bench --dtype bf16 --repeats 5 --pairs-per-tile 262144
    step score_bf16_tile512k 60 $bench --dtype bf16 --repeats 5 --pairs-per-tile 524288 --profile
    step score_bf16_tile1m 60 $bench --dtype bf16 --repeats 5 --pairs-per-tile 1048576
    step score_fp32_tile512k 60 $bench --dtype fp32 --repeats 5 --pairs-per-tile 524288
    step score_bf16_100kx10k_tile512k 90 $bench --dtype bf16 --repeats 3 --customers 100000 --products 10000 \
      --check-customers 200 --pairs-per-tile 524288
  else
    step score_bf16 75 $bench --dtype bf16 --repeats 5
    step score_fp32 75 $bench --dtype fp32 --repeats 5
    step score_bf16_rerank 75 $bench --dtype bf16-rerank --repeats 5
    step train_cuda 180 python3 benchmarks/training.py --device cuda --rows 400000 --repeats 2
    [ "$what" = quick ] && { say "done in ${SECONDS}s"; return 0; }
    step score_bf16_100kx10k 90 $bench --dtype bf16 --repeats 3 --customers 100000 --products 10000 --check-customers 200
    step score_bf16_20kx50k 90 $bench --dtype bf16 --repeats 3 --customers 20000 --products 50000 \
      --check-customers 100 --naive-customers 4
  fi
  say "done in ${SECONDS}s"
}

case "${1:-}" in
  fetch) fetch ;;
  run) run "${2:-all}" ;;
  *) echo "usage: $0 fetch | run [all|scoring|quick]" >&2; exit 2 ;;
esac
