"""Benchmark of the exact all-pairs scorer (feedpipe.scoring) against its physical limit and the naive way.

    python benchmarks/scoring.py [--dtype fp32|bf16] [--customers N] [--products M] [--memory-sweep 10000,100000]
                                 [--device cuda]

Builds a randomly initialised TwoSidedDLRM with the project's default sizes (TrainConfig) and the demo's
features (customer id + 2 dense + 2 categorical; product id + 1 dense + 2 categorical + multi-valued
tags, 1-4 per product) and random encoded tables of the requested sizes, then measures, interleaved
so a busy neighbour on a shared machine slows all of them alike:

- scorer: `score_all_pairs` over every pair (top 100, 20 excluded products per customer), wall clock,
  product-side preparation included;
- roofline: the bare over-arch matrix-product chain of the same shapes, tiles, dtype and worker
  threads, in the scorer's layout: with customers as rows [B, Fc*D] x [Fc*D, Pc*H], with products as
  rows [Pc, Fp*D] x [Fp*D, B*H]; then [B*Pc, H] x [H, 64], then x [64, 1]. The first layer's K is the
  bare cross term (Fc*D = 64 or Fp*D = 80 at the defaults), without the same-side dot columns the
  scorer adds (70 or 90); no bias, ReLU, top-N, customer or product work. Each layer runs on oneDNN
  and on torch.mm (MKL), and the faster is the limit (on a GPU: torch.mm, i.e. cuBLAS, alone);
- naive: the model's forward on pair batches built as KeyedJaggedTensors (the training path), then top-N,
  on a sample of customers.

Prints progress to stderr and, as its last line, one JSON object.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import statistics
import subprocess
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from benchmarks.machine import cpu_name  # noqa: E402
from feedpipe.feature_tensors import SideTensors  # noqa: E402
from feedpipe.model import ModelShape, SparseFeature, TwoSidedDLRM  # noqa: E402
from feedpipe.scoring import (  # noqa: E402
    PRECISIONS,
    Exclusions,
    customer_units,
    customers_as_rows,
    default_pairs_per_tile,
    default_pairs_per_unit,
    forward_pairs,
    pair_logits,
    plan_scoring,
    precision,
    score_all_pairs,
    tile_shape,
)
from feedpipe.scoring_runtime import (  # noqa: E402
    default_workers,
    linear,
    onednn_available,
    run_units,
    single_threaded_kernels,
)
from feedpipe.training import TrainConfig  # noqa: E402

# The demo model after training (6 epochs, 10k x 2k): embedding rows have std 0.15-0.28 and Linear
# weights std 0.7-1.4 / sqrt(fan_in), and a customer's logits over the products have std ~2. TorchRec's
# default init (embeddings uniform +-1/sqrt(rows): 0.01 for 10k ids; Linear 0.58 / sqrt(fan_in)) gives
# logits that barely differ (std 0.005), which no trained ranking looks like and which would make the
# bf16 fidelity figure meaningless. "trained-scale" draws N(0, 0.2) embeddings and N(0, 1/fan_in) weights.
TRAINED_EMBEDDING_STD = 0.2


def log(msg: str) -> None:
    print(msg, file=sys.stderr, flush=True)


def random_side(n: int, features: tuple[SparseFeature, ...], n_dense: int, g: torch.Generator) -> SideTensors:
    sparse = {}
    for f in features:
        lengths = torch.randint(1, 5, (n,), generator=g) if f.multi_valued else torch.ones(n, dtype=torch.long)
        offsets = torch.zeros(n + 1, dtype=torch.long)
        torch.cumsum(lengths, 0, out=offsets[1:])
        sparse[f.name] = (torch.randint(0, f.num_embeddings, (int(offsets[-1]),), generator=g), offsets)
    return SideTensors(torch.randn(n, n_dense, generator=g), [f.name for f in features], sparse)


def demo_like(customers: int, products: int, init: str, seed: int = 0):
    """A random model of the project's default sizes over demo-like features, and random tables for it."""
    torch.manual_seed(seed)
    g = torch.Generator().manual_seed(seed)
    cfg = TrainConfig()
    cs = (SparseFeature("customers.customer_id", customers + 3), SparseFeature("customers.region", 11),
          SparseFeature("customers.segment", 7))
    ps = (SparseFeature("products.product_id", products + 3), SparseFeature("products.category", 23),
          SparseFeature("products.brand", 102), SparseFeature("products.tags", 33, multi_valued=True))
    shape = ModelShape(cs, ps, customer_dense_in=2, product_dense_in=1, embedding_dim=cfg.embedding_dim,
                       dense_arch_layers=cfg.dense_arch_layers, over_arch_layers=cfg.over_arch_layers)
    model = TwoSidedDLRM(shape).eval()
    if init == "trained-scale":
        with torch.no_grad():
            for name, p in model.named_parameters():
                if "embedding_bags" in name:
                    p.normal_(0.0, TRAINED_EMBEDDING_STD, generator=g)
                elif name.endswith("weight"):
                    p.normal_(0.0, p.shape[1] ** -0.5, generator=g)
    return model, random_side(customers, cs, 2, g), random_side(products, ps, 1, g)


def from_checkpoint(directory: str, customers: int, products: int, seed: int = 0):
    """A trained model (a `dlrm_model` artifact directory) and random tables drawn from its vocabularies."""
    from feedpipe.training import TrainedModel

    model = TrainedModel.load(directory).model.eval()
    g = torch.Generator().manual_seed(seed)
    shape = model.shape
    return (
        model,
        random_side(customers, shape.customer_sparse, shape.customer_dense_in, g),
        random_side(products, shape.product_sparse, shape.product_dense_in, g),
    )


def random_exclusions(n_customers: int, n_products: int, per_customer: int, g: torch.Generator) -> Exclusions:
    per_customer = min(per_customer, n_products)
    c = torch.arange(n_customers).repeat_interleave(per_customer)
    p = torch.randint(0, n_products, (c.numel(),), generator=g)
    return Exclusions.from_pairs(c.numpy(), p.numpy(), n_customers)


# -- the three ways of scoring --------------------------------------------------------------------


def roofline(model, products, dtype, n_customers, pairs_per_tile, workers, kernel, pairs_per_unit, customer_rows):
    """A callable running the bare chain over n_customers x products, tiled and threaded like the scorer:
    the first layer as one GEMM per tile (the layout's rows x its bare cross-term K), then the rest of
    the over arch."""
    h = model.shape.over_arch_layers[0]
    d = model.shape.embedding_dim
    k = (model.num_customer_vectors if customer_rows else model.num_product_vectors) * d
    n_p = products.num_rows
    b_tile, p_tile = tile_shape(n_p, pairs_per_tile, customer_rows)
    g = torch.Generator().manual_seed(1)
    device = next(model.parameters()).device
    if customer_rows:  # rows: the tile's customers; columns: U' of every product, (product, h)
        rows = torch.randn(b_tile, k, generator=g).to(device, dtype)
        cols = torch.randn(n_p * h, k, generator=g).to(device, dtype)
    else:  # rows: every product; columns: U' of the tile's customers, (customer, h)
        rows = torch.randn(n_p, k, generator=g).to(device, dtype)
        cols = torch.randn(b_tile * h, k, generator=g).to(device, dtype)
    layers = [layer for layer in model.over_arch.modules() if isinstance(layer, torch.nn.Linear)][1:]
    ws = [layer.weight.detach().to(dtype).contiguous() for layer in layers]
    onednn = kernel == "onednn"
    units = customer_units(n_customers, n_p, pairs_per_tile, pairs_per_unit, customer_rows)

    def mm(x, w):
        return linear(x, w, None, relu=False, onednn=True) if onednn else torch.mm(x, w.T)

    def chain(x):
        x = x.view(-1, h)
        for w in ws[:-1]:
            x = mm(x, w)
        torch.mm(x, ws[-1].T)  # [*, 1]: as fast as torch.mv in fp32, 30% faster in bf16

    def work(start, stop):
        for s0 in range(start, stop, b_tile):
            nb = min(stop, s0 + b_tile) - s0
            for p0 in range(0, n_p, p_tile):
                p1 = min(n_p, p0 + p_tile)
                if customer_rows:
                    chain(mm(rows[:nb], cols[p0 * h : p1 * h]))
                else:
                    chain(mm(rows[p0:p1], cols[: nb * h]))

    def run():
        with single_threaded_kernels(workers > 1):
            run_units(units, work, workers)

    return run


def naive_run(model, customers, products, rows, top_n, batch_pairs=16384):
    """The model's own forward on KJT pair batches (as in training), then top-N per customer."""
    n_p = products.num_rows
    per_batch = max(1, batch_pairs // n_p)
    with torch.inference_mode():
        for s in range(0, rows.numel(), per_batch):
            r = rows[s : s + per_batch]
            c_rows = r.repeat_interleave(n_p)
            p_rows = torch.arange(n_p, device=rows.device).repeat(r.numel())
            logits = forward_pairs(model, customers, products, c_rows, p_rows).view(r.numel(), n_p)
            torch.topk(logits, min(top_n, n_p), dim=1)


def sync() -> None:
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        torch.cuda.synchronize()


def timed(fn) -> tuple[float, float]:
    """(wall seconds, process CPU seconds) of fn(), the device's queue drained before and after. CPU
    time does not count the time other processes held the cores, so on a shared machine its ratios are
    the steadier ones (on a GPU it means nothing)."""
    sync()
    t, c = time.perf_counter(), time.process_time()
    fn()
    sync()
    return time.perf_counter() - t, time.process_time() - c


def profile_scorer(scorer, on_cpu: bool, top: int = 12) -> dict:
    """One scorer call under torch.profiler: wall time, busy device time and the ops that took it."""
    from torch.profiler import ProfilerActivity, profile

    activities = [ProfilerActivity.CPU] + ([] if on_cpu else [ProfilerActivity.CUDA])
    with profile(activities=activities) as prof:
        wall, _ = timed(scorer)
    events = prof.key_averages()

    def device_us(e):
        return getattr(e, "self_device_time_total", 0) or getattr(e, "self_cuda_time_total", 0)

    log(events.table(sort_by="self_cpu_time_total" if on_cpu else "self_device_time_total", row_limit=25))
    key = (lambda e: e.self_cpu_time_total) if on_cpu else device_us
    return {
        "wall_ms": round(wall * 1e3, 2),
        "device_busy_ms": None if on_cpu else round(sum(device_us(e) for e in events) / 1e3, 2),
        "top_ops": [
            {"op": e.key[:60], "count": e.count, "self_device_ms": round(device_us(e) / 1e3, 3),
             "self_cpu_ms": round(e.self_cpu_time_total / 1e3, 3)}
            for e in sorted(events, key=key, reverse=True)[:top]
        ],
    }


# -- modes ----------------------------------------------------------------------------------------


def rss_bytes(field: str) -> int:
    """VmRSS (now) or VmHWM (peak) of this process. Not getrusage's ru_maxrss: Linux carries that over
    execve, so a child started by a 700 MB parent reports at least 700 MB."""
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1]) * 1024
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024


def rss_probe(args) -> dict:
    """One scoring run in this process: peak RSS, and what it held before scoring and in its result."""
    if args.checkpoint:
        model, customers, products = from_checkpoint(args.checkpoint, args.customers, args.products)
    else:
        model, customers, products = demo_like(args.customers, args.products, args.init)
    ex = random_exclusions(args.customers, args.products, args.exclude, torch.Generator().manual_seed(2))
    before = rss_bytes("VmRSS")
    peak_before = rss_bytes("VmHWM")
    t = time.perf_counter()
    chosen = precision(args.dtype)
    top = score_all_pairs(model, customers, products, top_n=args.top_n, exclusions=ex, dtype=chosen.dtype,
                          rerank=chosen.rerank)
    seconds = time.perf_counter() - t
    peak = rss_bytes("VmHWM")
    result = top.product_rows.nbytes + top.scores.nbytes
    mb = 1 << 20
    return {
        "customers": args.customers,
        "products": args.products,
        "peak_rss_mb": round(peak / mb, 1),
        "rss_before_scoring_mb": round(before / mb, 1),
        "peak_rss_before_scoring_mb": round(peak_before / mb, 1),
        "result_mb": round(result / mb, 1),
        "scoring_working_set_mb": round((peak - max(before, 0) - result) / mb, 1),
        "pairs_per_s": round(args.customers * args.products / seconds),
    }


def memory_sweep(args) -> list[dict]:
    out = []
    for n in [int(x) for x in args.memory_sweep.split(",")]:
        cmd = [sys.executable, __file__, "--rss-probe", "--customers", str(n), "--products", str(args.products),
               "--dtype", args.dtype, "--top-n", str(args.top_n), "--exclude", str(args.exclude), "--init", args.init]
        if args.checkpoint:
            cmd += ["--checkpoint", args.checkpoint]
        proc = subprocess.run(cmd, capture_output=True, text=True, check=True)
        out.append(json.loads(proc.stdout.strip().splitlines()[-1]))
        log(f"memory: {out[-1]}")
    return out


def asset_against_projection(args) -> dict:
    """pair_scores materialized from stored artifacts (its Dagster step: inputs loaded, ranked,
    checked, Parquet written) against this benchmark's scorer on as many pairs, interleaved."""
    import dagster as dg
    import polars as pl

    from feedpipe.definitions import build_resources, defs

    root = Path(args.asset_artifacts)
    n_c = pl.scan_parquet(root / "customers" / f"{args.feed_date}.parquet").select(pl.len()).collect().item()
    n_p = pl.scan_parquet(root / "products" / f"{args.feed_date}.parquet").select(pl.len()).collect().item()
    model, customers, products = demo_like(n_c, n_p, args.init)
    ex = random_exclusions(n_c, n_p, args.exclude, torch.Generator().manual_seed(2))

    def scorer():
        chosen = precision(args.dtype)
        score_all_pairs(model, customers, products, top_n=args.top_n, exclusions=ex, dtype=chosen.dtype,
                        rerank=chosen.rerank)

    resources = build_resources(artifacts_root=str(root))
    instance = dg.DagsterInstance.ephemeral()
    run_config = {"ops": {"pair_scores": {"config": {"dtype": args.dtype, "top_n": args.top_n}}}}
    scorer()
    rounds = []
    for _ in range(args.repeats):
        result = dg.materialize(list(defs.assets), selection=["pair_scores"], partition_key=args.feed_date,
                                resources=resources, instance=instance, run_config=run_config)
        step = next(s for s in instance.get_run_step_stats(result.run_id) if s.step_key == "pair_scores")
        meta = result.asset_materializations_for_node("pair_scores")[0].metadata
        projected, _ = timed(scorer)
        rounds.append({"step_s": step.end_time - step.start_time, "asset_scoring_s": meta["scoring_seconds"].value,
                       "projected_s": projected})
        log(f"pair_scores: {rounds[-1]}")
    step_s = statistics.median(r["step_s"] for r in rounds)
    projected_s = statistics.median(r["projected_s"] for r in rounds)
    return {
        "pairs": n_c * n_p,
        "step_seconds": round(step_s, 2),
        "asset_scoring_seconds": round(statistics.median(r["asset_scoring_s"] for r in rounds), 2),
        "projected_seconds": round(projected_s, 2),
        "step_over_projection": round(statistics.median(r["step_s"] / r["projected_s"] for r in rounds), 2),
    }


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--dtype", choices=sorted(PRECISIONS), default="fp32",
                    help="bf16-rerank: bf16, each customer's best 1.5N re-scored in fp32 (the roofline stays bf16's)")
    ap.add_argument("--customers", type=int, default=10_000)
    ap.add_argument("--products", type=int, default=2_000)
    ap.add_argument("--top-n", type=int, default=100, help="as pair_scores keeps (ScoringConfig.top_n)")
    ap.add_argument("--exclude", type=int, default=20, help="random excluded products per customer")
    ap.add_argument("--repeats", type=int, default=5, help="interleaved rounds; figures are medians")
    ap.add_argument("--pairs-per-tile", type=int, default=None, help="default: the scorer's for the dtype")
    ap.add_argument("--workers", type=int, default=None, help="default: torch.get_num_threads()")
    ap.add_argument("--naive-customers", type=int, default=32, help="customers scored the naive way per round")
    ap.add_argument("--check-customers", type=int, default=1000, help="customers for max_abs_diff and overlap")
    ap.add_argument("--init", choices=["trained-scale", "torchrec"], default="trained-scale",
                    help="trained-scale: N(0, 0.2) embeddings and N(0, 1/fan_in) weights, like the trained demo "
                    "model; torchrec: the library's default init")
    ap.add_argument("--checkpoint", default="", help="a dlrm_model artifact directory: benchmark that trained "
                    "model (random tables of its vocabularies) instead of a random one")
    ap.add_argument("--memory-sweep", default="", help="comma-separated customer counts: peak RSS per count, "
                    "each in a fresh subprocess")
    ap.add_argument("--asset-artifacts", default="", help="an artifacts root holding a run's dlrm_model, "
                    "customers, products, transactions: also time pair_scores against the projection")
    ap.add_argument("--feed-date", default="", help="the partition of --asset-artifacts")
    ap.add_argument("--profile", action="store_true", help="also profile one scorer call (torch.profiler): "
                    "its busy device time and the ops that took it")
    ap.add_argument("--device", default="cpu", help="cpu or cuda (the model and tables move there)")
    ap.add_argument("--layout", choices=("auto", "customer-rows", "product-rows"), default="auto",
                    help="the first GEMM's rows, for the scorer and its roofline alike (auto: the scorer's choice)")
    ap.add_argument("--rss-probe", action="store_true", help=argparse.SUPPRESS)
    args = ap.parse_args()

    if args.rss_probe:
        print(json.dumps(rss_probe(args)))
        return

    chosen = precision(args.dtype)
    dtype, rerank = chosen.dtype, chosen.rerank
    device = torch.device(args.device)
    on_cpu = device.type == "cpu"
    args.pairs_per_tile = args.pairs_per_tile or default_pairs_per_tile(device, dtype)
    pairs_per_unit = default_pairs_per_unit(device)
    if args.checkpoint:
        model, customers, products = from_checkpoint(args.checkpoint, args.customers, args.products)
    else:
        model, customers, products = demo_like(args.customers, args.products, args.init)
    model, customers, products = model.to(device), customers.to(device), products.to(device)
    ex = random_exclusions(args.customers, args.products, args.exclude, torch.Generator().manual_seed(2))
    workers = args.workers or default_workers(device)
    n_pairs = args.customers * args.products
    naive_rows = torch.arange(min(args.naive_customers, args.customers), device=device)
    # the scorer's layout (no product is unavailable here)
    customer_rows = {"auto": customers_as_rows(model, args.products, device, chosen.dtype), "customer-rows": True,
                     "product-rows": False}[args.layout]

    log(f"{args.customers} x {args.products} = {n_pairs:,} pairs, {args.dtype}, {workers} workers, "
        f"tile {tile_shape(args.products, args.pairs_per_tile, customer_rows)} "
        "(customers, products)")

    def scorer():
        score_all_pairs(model, customers, products, top_n=args.top_n, exclusions=ex, dtype=dtype, rerank=rerank,
                        pairs_per_tile=args.pairs_per_tile, pairs_per_unit=pairs_per_unit, workers=workers,
                        layout_customer_rows=customer_rows)

    # oneDNN only where it has kernels for the dtype (no bf16 on an AVX2-only CPU): as the scorer picks.
    kernels = ("cublas",) if not on_cpu else ("onednn", "mkl") if onednn_available(device, dtype) else ("mkl",)
    rooflines = {
        kernel: roofline(model, products, dtype, args.customers, args.pairs_per_tile, workers, kernel, pairs_per_unit,
                         customer_rows)
        for kernel in kernels
    }

    # Warm-up: oneDNN builds its kernels on first use of each shape (cuBLAS picks its algorithms).
    scorer()
    for run in rooflines.values():
        run()
    naive_run(model, customers, products, naive_rows[:2], args.top_n)
    if not on_cpu:
        torch.cuda.reset_peak_memory_stats()

    rounds = []
    for r in range(args.repeats):
        t_s, c_s = timed(scorer)
        limits = {kernel: timed(run) for kernel, run in rooflines.items()}
        t_n, c_n = timed(lambda: naive_run(model, customers, products, naive_rows, args.top_n))
        t_s2, c_s2 = timed(scorer)  # bracket the others, so a load change mid-round shows up in both
        naive_pairs = naive_rows.numel() * args.products
        row = {"scorer": n_pairs / ((t_s + t_s2) / 2)}
        row.update({f"roofline_{kernel}": n_pairs / t for kernel, (t, _) in limits.items()})
        row.update({"naive": naive_pairs / t_n, "load": os.getloadavg()[0]})
        row["roofline_fraction"] = row["scorer"] / max(row[f"roofline_{kernel}"] for kernel in kernels)
        row["speedup_vs_naive"] = row["scorer"] / row["naive"]
        row["roofline_fraction_cpu"] = min(c for _, c in limits.values()) / ((c_s + c_s2) / 2)
        row["speedup_vs_naive_cpu"] = (c_n / naive_pairs) / ((c_s + c_s2) / 2 / n_pairs)
        rounds.append(row)
        log(f"round {r}: " + ", ".join(f"{k} {v:,.3g}" for k, v in row.items()))

    def med(key):
        return statistics.median(r[key] for r in rounds)

    # Exactness: every pair of a sample of customers through the scorer's path vs the model's forward.
    check_rows = torch.arange(min(args.check_customers, args.customers), device=device)
    diff_rows = check_rows[:32]
    with torch.inference_mode():
        ref = forward_pairs(model, customers, products, diff_rows.repeat_interleave(args.products),
                            torch.arange(args.products, device=device).repeat(diff_rows.numel())).view(diff_rows.numel(), -1)
        got = pair_logits(model, customers, products, diff_rows, dtype=dtype, layout_customer_rows=customer_rows)
        max_abs_diff = float((got - ref).abs().max())
        fp32_all = pair_logits(model, customers, products, check_rows, dtype=torch.float32)
        logit_std = float(fp32_all.std(dim=1).mean())
        overlap = None
        if dtype != torch.float32:
            k = min(20, args.products)
            a = torch.topk(fp32_all, k, dim=1).indices
            if rerank:  # the scorer's own top k, re-ranked
                b = score_all_pairs(model, customers, products, top_n=k, dtype=dtype, rerank=True,
                                    customer_rows=check_rows, layout_customer_rows=customer_rows).product_rows.to(device)
            else:
                b = torch.topk(pair_logits(model, customers, products, check_rows, dtype=dtype,
                                           layout_customer_rows=customer_rows), k, dim=1).indices
            hits = (a.unsqueeze(2) == b.unsqueeze(1)).any(dim=2).sum(dim=1)
            overlap = float(hits.float().mean() / k)

    plan = plan_scoring(model, products, dtype=dtype, customer_rows=customer_rows)
    result = {
        "pairs_per_s": round(med("scorer")),
        "roofline_fraction": round(med("roofline_fraction"), 3),
        "roofline_fraction_cpu_time": round(med("roofline_fraction_cpu"), 3) if on_cpu else None,
        "roofline_pairs_per_s": round(max(med(f"roofline_{kernel}") for kernel in kernels)),
        **{f"roofline_{kernel}_pairs_per_s": round(med(f"roofline_{kernel}")) for kernel in kernels},
        "speedup_vs_naive": round(med("speedup_vs_naive"), 1),
        "speedup_vs_naive_cpu_time": round(med("speedup_vs_naive_cpu"), 1) if on_cpu else None,
        "naive_pairs_per_s": round(med("naive")),
        "max_abs_diff": max_abs_diff,
        "top20_overlap_vs_fp32": None if overlap is None else round(overlap, 4),
        "dtype": args.dtype,
        "device": args.device,
        "gpu": None if on_cpu else torch.cuda.get_device_name(device),
        "gpu_peak_memory_mb": None if on_cpu else round(torch.cuda.max_memory_allocated(device) / (1 << 20)),
        "cpu": cpu_name(),
        "torch": torch.__version__,
        "workers": workers,
        "customers": args.customers,
        "products": args.products,
        "pairs": n_pairs,
        "seconds": round(n_pairs / med("scorer"), 3),
        "top_n": args.top_n,
        "excluded_per_customer": args.exclude,
        "pairs_per_tile": args.pairs_per_tile,
        "pairs_per_unit": pairs_per_unit,
        "layout": "customer rows" if plan.customer_rows else "product rows",
        "tile_customers_products": list(tile_shape(args.products, args.pairs_per_tile, plan.customer_rows)),
        "embedding_dim": model.shape.embedding_dim,
        "dense_arch_layers": list(model.shape.dense_arch_layers),
        "over_arch_layers": list(model.shape.over_arch_layers),
        "over_arch_in": model.over_in_features,
        "first_layer_k": plan.columns.u.shape[1] if plan.customer_rows else plan.k_dim,
        "roofline_first_layer_k": (model.num_customer_vectors if plan.customer_rows else model.num_product_vectors)
        * model.shape.embedding_dim,
        "model": args.checkpoint or f"random ({args.init} init)",
        "logit_std_per_customer": round(logit_std, 4),
        "repeats": args.repeats,
        "load_avg_1m": [round(r["load"], 2) for r in rounds],
        "rounds_pairs_per_s": [round(r["scorer"]) for r in rounds],
        "rounds_roofline_fraction": [round(r["roofline_fraction"], 3) for r in rounds],
    }
    if args.profile:
        result["profile"] = profile_scorer(scorer, on_cpu)
    if args.memory_sweep and on_cpu:
        result["memory"] = memory_sweep(args)
    if args.asset_artifacts:
        result["pair_scores_asset"] = asset_against_projection(args)
    print(json.dumps(result))


if __name__ == "__main__":
    main()
