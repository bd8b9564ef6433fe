"""The torchrun entry point for training and scoring, one command line for every launcher.

    torchrun --nproc_per_node N -m feedpipe.distributed_jobs train --examples X.parquet \\
        --vocabularies DIR --out DIR [--config JSON] [--version V]
    torchrun --nproc_per_node N -m feedpipe.distributed_jobs score --model DIR \\
        --customers C.parquet --products P.parquet [--exclude E.parquet] --out R.parquet

Run under plain `python -m` it is rank 0 of 1 and trains in one process (`InProcess`). Under
torchrun with 2+ ranks it trains with `ShardedTraining` and scores with each rank taking a customer
range. Dagster starts it through Pipes (`PipesSubprocessClient` around torchrun, or
`PipesK8sClient` running the same command in a pod; see feedpipe/defs/launchers.py): rank 0 then
opens the Pipes session, sends its log lines and, at the end, one custom message with the summary
(loss, AUC, samples/s, ranks, ...). Every run also writes that summary as `summary.json` beside its
output, so the command is just as usable by hand or from a benchmark.

Set OMP_NUM_THREADS per rank (cores / ranks): torch's OpenMP pools oversubscribe badly otherwise.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import sys
import time
from dataclasses import asdict, fields
from pathlib import Path

import polars as pl
import torch

from feedpipe.process_group import RankGroup, join_process_group, leave_process_group

SUMMARY_FILE = "summary.json"


def train_config_from_json(text: str):
    """TrainConfig from a JSON object of its fields (lists become the tuples the dataclass holds)."""
    from feedpipe.training import TrainConfig

    raw = json.loads(text) if text else {}
    known = {f.name for f in fields(TrainConfig)}
    unknown = sorted(set(raw) - known)
    if unknown:
        raise SystemExit(f"--config: unknown TrainConfig fields {unknown}; known: {sorted(known)}")
    return TrainConfig(**{k: tuple(v) if isinstance(v, list) else v for k, v in raw.items()})


def run_training(args, group: RankGroup, log) -> dict:
    from feedpipe.sharded_training import DEFAULT_SHARDING_TYPES, ShardedTraining, rank_example_tensors
    from feedpipe.training import TrainedModel, model_shape, split_examples, train_dlrm
    from feedpipe.vocabularies import Vocabularies

    config = train_config_from_json(args.config)
    vocab = Vocabularies.load(args.vocabularies)
    c_specs, p_specs = vocab.customer_specs, vocab.product_specs
    t0 = time.perf_counter()
    parallel = None
    if group.is_distributed:
        train, valid = rank_example_tensors(args.examples, group, c_specs, p_specs)
        types = tuple(args.sharding_types.split(",")) if args.sharding_types else DEFAULT_SHARDING_TYPES
        parallel = ShardedTraining(group, sharding_types=types)
    else:
        train, valid = split_examples(pl.read_parquet(args.examples), c_specs, p_specs)
    load_seconds = time.perf_counter() - t0
    shape = model_shape(c_specs, p_specs, vocab, config)
    result = train_dlrm(train, valid, shape, config, group.device, log=log, parallel=parallel)
    summary = {
        "job": "train",
        "ranks": group.world_size,
        "backend": group.backend,
        "device": str(group.device),
        "validation_auc": result.best.val_auc,
        "validation_logloss": result.best.val_loss,
        "best_epoch": result.best_epoch,
        "samples_per_s": result.samples_per_s,
        "over_arch_precision": result.over_arch_precision,
        "train_seconds": result.seconds,
        "load_seconds": load_seconds,
        "history": [asdict(h) for h in result.history],
        "loss_curve": result.loss_curve,
        "sharding_plan": parallel.plan_summary() if parallel is not None else {},
    }
    if group.is_leader:
        metrics = {k: summary[k] for k in ("validation_auc", "validation_logloss", "best_epoch", "samples_per_s",
                                           "device", "history", "loss_curve", "ranks", "over_arch_precision")}
        TrainedModel(result.model, c_specs, p_specs, vocab, args.version, metrics).save(args.out)
        summary["parameters"] = result.model.parameter_count()
    return summary


def run_scoring(args, group: RankGroup, log) -> dict:
    from feedpipe.scoring import precision
    from feedpipe.scoring_runtime import emulated_precision_warning
    from feedpipe.sharded_scoring import merge_parts, score_rank_part, scored_products
    from feedpipe.training import TrainedModel

    try:
        chosen = precision(args.dtype)
    except ValueError as e:
        raise SystemExit(f"--dtype: {e}") from None
    slow = emulated_precision_warning(group.device, chosen.dtype)
    if slow is not None:
        log(f"rank {group.rank}: warning: --dtype {args.dtype}: {slow}")
    t0 = time.perf_counter()
    trained = TrainedModel.load(args.model, device=group.device)
    customers, products = pl.read_parquet(args.customers), pl.read_parquet(args.products)
    exclude = pl.read_parquet(args.exclude) if args.exclude else None
    unavailable = pl.read_parquet(args.unavailable).to_series(0) if args.unavailable else None
    out = Path(args.out)
    parts_dir = out.parent / (out.stem + ".parts")
    t1 = time.perf_counter()
    n_customers, pairs = score_rank_part(
        trained, customers, products, group, parts_dir,
        top_n=args.top_n, exclude=exclude, unavailable=unavailable, dtype=chosen.dtype, rerank=chosen.rerank,
    )
    rank_seconds = time.perf_counter() - t1
    n_products = scored_products(products, unavailable)
    log(f"rank {group.rank}: scored {n_customers:,} customers x {n_products:,} products in {rank_seconds:.1f}s")
    # Gathering every rank's time is also the barrier: all parts are written once it returns.
    rank_seconds_all = group.all_gather_rows(torch.tensor([rank_seconds], dtype=torch.float64)).tolist()
    rows = merge_parts(parts_dir, group.world_size, out).height if group.is_leader else 0
    total_pairs = customers.height * n_products
    seconds = max(rank_seconds_all)  # the ranks run side by side: the slowest one is the stage's time
    return {
        "job": "score",
        "ranks": group.world_size,
        "backend": group.backend,
        "device": str(group.device),
        "customers": customers.height,
        "products": products.height,
        "pairs_scored": total_pairs,
        "pairs_per_s": total_pairs / max(seconds, 1e-9),
        "scoring_seconds": seconds,
        "rank_seconds": rank_seconds_all,
        "load_seconds": t1 - t0,
        "rows": rows,
        "dtype": args.dtype,
    }


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m feedpipe.distributed_jobs", description=__doc__.splitlines()[0])
    p.add_argument("--device", default="auto", choices=["auto", "cpu", "cuda"])
    p.add_argument("--errors", default="", help="directory where a failing rank writes rank-<N>.txt with its error")
    sub = p.add_subparsers(dest="job", required=True)
    t = sub.add_parser("train", help="train the DLRM; rank 0 saves the checkpoint to --out")
    t.add_argument("--examples", required=True, help="training_examples Parquet (split column train/validation)")
    t.add_argument("--vocabularies", required=True, help="directory written by Vocabularies.save")
    t.add_argument("--out", required=True, help="checkpoint directory (TrainedModel format)")
    t.add_argument("--config", default="", help="JSON object of TrainConfig fields")
    t.add_argument("--version", default="torchrun")
    t.add_argument("--sharding-types", default="", help="comma list for the planner, default table_wise,row_wise")
    s = sub.add_parser("score", help="top N per customer over all products; rank 0 merges to --out")
    s.add_argument("--model", required=True, help="checkpoint directory (TrainedModel format)")
    s.add_argument("--customers", required=True)
    s.add_argument("--products", required=True)
    s.add_argument("--exclude", default="", help="Parquet of (customer_id, product_id) pairs never recommended")
    s.add_argument("--unavailable", default="", help="Parquet whose first column holds product ids never recommended")
    s.add_argument("--out", required=True, help="Parquet of customer_id, product_id, rank, score")
    s.add_argument("--top-n", type=int, default=100)
    s.add_argument("--dtype", default="fp32", help="fp32, bf16 or bf16-rerank (scoring.PRECISIONS)")
    return p


@contextlib.contextmanager
def _reporting(group: RankGroup):
    """(log, report): Pipes on rank 0 when Dagster launched us, stdout otherwise; quiet on other ranks."""
    from dagster_pipes import PipesEnvVarParamsLoader, open_dagster_pipes

    if group.is_leader and PipesEnvVarParamsLoader().is_dagster_pipes_process():
        with open_dagster_pipes() as pipes:
            yield pipes.log.info, pipes.report_custom_message
        return
    if group.is_leader:
        yield (lambda msg: print(msg, flush=True)), (lambda _summary: None)
    else:
        yield (lambda msg: None), (lambda _summary: None)


def write_rank_error(errors_dir: str, rank: int, error: BaseException) -> None:
    """The error's one-line form in errors_dir/rank-<rank>.txt: the launcher raises it as the asset's failure,
    where Pipes alone would say only that the process exited with a code."""
    if not errors_dir:
        return
    text = str(error.code) if isinstance(error, SystemExit) else f"{type(error).__name__}: {error}"
    with contextlib.suppress(OSError):
        Path(errors_dir).mkdir(parents=True, exist_ok=True)
        (Path(errors_dir) / f"rank-{rank}.txt").write_text(text)


def main(argv: list[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    try:
        group = join_process_group(args.device)
    except BaseException as e:
        write_rank_error(args.errors, int(os.environ.get("RANK", "0")), e)
        raise
    try:
        with _reporting(group) as (log, report):
            log(f"rank 0 of {group.world_size} ({group.backend}, {group.device}): {args.job}")
            summary = (run_training if args.job == "train" else run_scoring)(args, group, log)
            if group.is_leader:
                out = Path(args.out)
                target = out if args.job == "train" else out.parent
                (target / (SUMMARY_FILE if args.job == "train" else out.stem + "." + SUMMARY_FILE)).write_text(
                    json.dumps(summary, indent=2, default=str)
                )
                report(summary)
    except BaseException as e:
        if not (isinstance(e, SystemExit) and e.code in (0, None)):
            write_rank_error(args.errors, group.rank, e)
        raise
    finally:
        leave_process_group(group)
    return 0


if __name__ == "__main__":
    sys.exit(main())
