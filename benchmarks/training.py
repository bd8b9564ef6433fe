"""Training throughput: feedpipe's loop against a reference loop written the way the source article does it.

Both train the same TwoSidedDLRM at the same batch size on the same encoded demo examples, one after
the other (twice each, alternating, median kept: the machine is shared). The reference runs in a fresh
interpreter of its own, as the article's script would, so that feedpipe's OpenMP setting (PASSIVE
waiting, set when feedpipe is imported) does not slow its two threads; the same loop inside this
process is reported beside it (`reference_passive_omp_samples_per_s`).

- feedpipe: `training.train_dlrm` — tensors built once from the encoded Parquet, each batch a
  vectorized gather into a KeyedJaggedTensor; Adam on dense layers, RowWiseAdagrad on embeddings.
- reference: a pandas slice per batch turned into a KeyedJaggedTensor with `from_lengths_sync`,
  torchrec's `DLRMTrain` wrapper computing the loss, plain SGD; the model's interaction computed as
  torchrec's `InteractionArch` does (see ArticleStyleModel).

Usage: benchmarks/training.py [--rows N] [--batch-size B] [--customers C] [--products P] [--device cuda]

On a GPU (`--device cuda`) both loops train there: feedpipe's with its tensors on the device, the
reference moving each batch it built on the CPU to the device, as the article's loop does.
Prints one JSON line last: samples_per_s, reference_samples_per_s, speedup, ...
"""

from __future__ import annotations

import argparse
import json
import os
import pickle
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from dataclasses import replace
from datetime import date, timedelta
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

REFERENCE_CHILD = "--reference-child"
USER_OMP_WAIT_POLICY = os.environ.get("OMP_WAIT_POLICY")  # before feedpipe's import sets it
if REFERENCE_CHILD in sys.argv:
    # The reference runs as the article's script would: torch loads OpenMP before anything of feedpipe's
    # (whose import sets OMP_WAIT_POLICY=PASSIVE for its own processes), so its two threads wait the
    # way libgomp's default has them wait. Under PASSIVE they ran it at 149k samples/s on the 2-core
    # Xeon with AMX, against 274k with the default (benchmarks/README.md, "Training", session 8).
    import torch  # noqa: F401

import feedpipe  # noqa: E402,F401  (first: it sets OMP_WAIT_POLICY before torch loads OpenMP)
import numpy as np  # noqa: E402
import polars as pl  # noqa: E402
import torch  # noqa: E402
from torch import nn  # noqa: E402
from torchrec import KeyedJaggedTensor  # noqa: E402
from torchrec.datasets.utils import Batch  # noqa: E402
from torchrec.models.dlrm import DLRMTrain  # noqa: E402

from benchmarks.machine import cpu_name  # noqa: E402
from feedpipe import sources  # noqa: E402
from feedpipe.contract import CUSTOMER_ID, CUSTOMERS, DENSE, MULTI_CATEGORICAL, PRODUCT_ID, PRODUCTS  # noqa: E402
from feedpipe.demo_data import generate_demo_data  # noqa: E402
from feedpipe.model import TwoSidedDLRM  # noqa: E402
from feedpipe.scoring_runtime import intra_op_threads  # noqa: E402
from feedpipe.training import (  # noqa: E402
    TrainConfig,
    model_shape,
    over_arch_dtype,
    split_examples,
    train_dlrm,
    training_threads,
)
from feedpipe.training_examples import LABEL, ExampleConfig, attach_features, build_training_examples  # noqa: E402
from feedpipe.vocabularies import build_vocabularies, encode_table, feature_key, side_specs  # noqa: E402


def demo_examples(customers: int, products: int, rows: int):
    tmp = Path(tempfile.mkdtemp(prefix="feedpipe_bench_"))
    feed_date = date.today()
    generate_demo_data(tmp, customers=customers, products=products, end_date=feed_date - timedelta(days=1))
    tx, cu, pr = sources.read_transactions(tmp), sources.read_customers(tmp), sources.read_products(tmp)
    specs = side_specs(CUSTOMERS, cu) + side_specs(PRODUCTS, pr)
    vocab = build_vocabularies({CUSTOMERS: cu, PRODUCTS: pr}, specs)
    pairs = build_training_examples(tx, pr.get_column(PRODUCT_ID), feed_date, ExampleConfig())
    ex = attach_features(
        pairs,
        encode_table(cu, CUSTOMER_ID, vocab.customer_specs, vocab),
        encode_table(pr, PRODUCT_ID, vocab.product_specs, vocab),
    )
    ex = ex.sample(fraction=1.0, shuffle=True, seed=0)
    shutil.rmtree(tmp, ignore_errors=True)  # everything needed is in memory now
    return ex.filter(pl.col("split") == "train").head(rows), ex.filter(pl.col("split") == "validation").head(20_000), vocab


class ArticleStyleModel(nn.Module):
    """(dense [B, n_c + n_p], one KJT of all keys) -> logits, the call shape DLRMTrain expects.

    The same modules and weights as feedpipe's TwoSidedDLRM, stepped the way the article's torchrec
    DLRM steps them: the EBCs and dense arches as they are, and the interaction as torchrec's
    `InteractionArch` computes it (a `bmm` and advanced indexing of its upper triangle, differentiated
    by autograd), not through feedpipe's `PairDots`, whose hand-written backward is part of what the
    benchmark measures.
    """

    def __init__(self, model: TwoSidedDLRM, n_customer_dense: int, customer_keys: list[str]):
        super().__init__()
        self.model, self.n_c, self.n_keys_c = model, n_customer_dense, len(customer_keys)

    def forward(self, dense_features: torch.Tensor, sparse_features: KeyedJaggedTensor) -> torch.Tensor:
        n_keys = len(sparse_features.keys())
        c_kjt, p_kjt = sparse_features.split([self.n_keys_c, n_keys - self.n_keys_c])
        m = self.model
        c = m.customer_vectors(dense_features[:, : self.n_c], c_kjt)
        p = m.product_vectors(dense_features[:, self.n_c :], p_kjt)
        v = torch.cat([c.stacked(), p.stacked()], dim=1)  # [B, F, D]
        dots = torch.bmm(v, torch.transpose(v, 1, 2))[:, m.triu_rows, m.triu_cols]  # as InteractionArch
        parts = [x for x in (c.dense, p.dense) if x is not None] + [dots]
        return m.over_arch(torch.cat(parts, dim=1))


def same_model_check(article: ArticleStyleModel, batch: Batch, n_c: int, n_keys: int) -> None:
    """The article-style step computes feedpipe's model: its logits equal TwoSidedDLRM's forward."""
    with torch.no_grad():
        c_kjt, p_kjt = batch.sparse_features.split([article.n_keys_c, n_keys - article.n_keys_c])
        ours = article.model(batch.dense_features[:, :n_c], c_kjt, batch.dense_features[:, n_c:], p_kjt)
        diff = (article(batch.dense_features, batch.sparse_features).squeeze(1) - ours).abs().max().item()
    if diff > 1e-5:
        raise AssertionError(f"the reference's model is not feedpipe's: logits differ by {diff}")


def reference_loop(train: pl.DataFrame, vocab, config: TrainConfig, device: str = "cpu") -> tuple[float, float]:
    """(samples/s, share of the time spent building batches) of the article-style loop over all of
    `train` (one epoch). The rest of its time is the model's step, which both loops pay."""
    specs = vocab.customer_specs + vocab.product_specs
    dense_cols = [feature_key(s) for s in specs if s.role == DENSE]
    sparse = [(feature_key(s), s.role == MULTI_CATEGORICAL) for s in specs if s.role != DENSE]
    shape = model_shape(vocab.customer_specs, vocab.product_specs, vocab, config)
    torch.manual_seed(config.seed)
    model = TwoSidedDLRM(shape, device=torch.device(device))
    n_c = sum(1 for s in vocab.customer_specs if s.role == DENSE)
    train_model = DLRMTrain(ArticleStyleModel(model, n_c, [k for k, _ in sparse if k.startswith("customers.")]))
    optimizer = torch.optim.SGD(train_model.parameters(), lr=0.01)
    df = train.to_pandas()
    keys = [k for k, _ in sparse]
    t0 = time.perf_counter()
    building = 0.0
    for start in range(0, len(df), config.batch_size):
        t_batch = time.perf_counter()
        batch_df = df.iloc[start : start + config.batch_size]
        lengths, values = [], []
        for key, multi in sparse:
            col = batch_df[key]
            if multi:
                lengths.append(torch.tensor([len(v) for v in col], dtype=torch.int32))
                values.append(torch.tensor(np.concatenate(col.to_numpy()), dtype=torch.long))
            else:
                lengths.append(torch.ones(len(col), dtype=torch.int32))
                values.append(torch.tensor(col.to_numpy(), dtype=torch.long))
        batch = Batch(
            dense_features=torch.tensor(batch_df[dense_cols].to_numpy(), dtype=torch.float32),
            sparse_features=KeyedJaggedTensor.from_lengths_sync(keys=keys, values=torch.cat(values), lengths=torch.cat(lengths)),
            labels=torch.tensor(batch_df[LABEL].to_numpy(), dtype=torch.float32),
        )
        batch = batch.to(torch.device(device))
        building += time.perf_counter() - t_batch
        if start == 0:
            same_model_check(train_model.model, batch, n_c, len(keys))
        loss, _ = train_model(batch)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    if device != "cpu":
        torch.cuda.synchronize()
    seconds = time.perf_counter() - t0
    return len(df) / seconds, building / seconds


def reference_child(directory: str) -> None:
    """The reference loop in this process (started by `reference_in_own_process`): one line of JSON."""
    d = Path(directory)
    train_df = pl.read_parquet(d / "train.parquet")
    vocab = pickle.loads((d / "vocab.pickle").read_bytes())
    config = pickle.loads((d / "config.pickle").read_bytes())
    device = (d / "device").read_text()
    if device != "cpu":  # CUDA context and cuBLAS handles, not timed (as for feedpipe's loop)
        reference_loop(train_df.head(20 * config.batch_size), vocab, config, device)
    rate, share = reference_loop(train_df, vocab, config, device)  # torch's default threads, as the article runs
    rate_same = None
    if device == "cpu":
        shape = model_shape(vocab.customer_specs, vocab.product_specs, vocab, config)
        with intra_op_threads(training_threads(config, shape)):
            rate_same, _ = reference_loop(train_df, vocab, config)  # ... and with feedpipe's thread count
    print(json.dumps({"rate": rate, "share": share, "rate_same": rate_same, "threads": torch.get_num_threads(),
                      "omp_wait_policy": USER_OMP_WAIT_POLICY}))  # what OpenMP saw when torch loaded it


def reference_in_own_process(directory: Path) -> dict:
    """Run `reference_child` in a fresh interpreter: the article's process, not feedpipe's (see REFERENCE_CHILD)."""
    env = dict(os.environ)
    if USER_OMP_WAIT_POLICY is None:  # only feedpipe's import set it
        env.pop("OMP_WAIT_POLICY", None)
    out = subprocess.run([sys.executable, __file__, REFERENCE_CHILD, str(directory)], check=True,
                         capture_output=True, text=True, env=env)
    return json.loads(out.stdout.strip().splitlines()[-1])


def main() -> None:
    if REFERENCE_CHILD in sys.argv:
        reference_child(sys.argv[sys.argv.index(REFERENCE_CHILD) + 1])
        return
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--rows", type=int, default=400_000, help="training rows per measured epoch")
    p.add_argument("--batch-size", type=int, default=TrainConfig().batch_size)
    p.add_argument("--customers", type=int, default=10_000)
    p.add_argument("--products", type=int, default=2_000)
    p.add_argument("--repeats", type=int, default=2, choices=range(1, 100), metavar="R")
    p.add_argument("--device", default="cpu", help="cpu or cuda")
    args = p.parse_args()
    on_cpu = args.device == "cpu"

    train_df, valid_df, vocab = demo_examples(args.customers, args.products, args.rows)
    config = TrainConfig(epochs=1, batch_size=args.batch_size)
    train, valid = split_examples(pl.concat([train_df, valid_df]), vocab.customer_specs, vocab.product_specs)
    shape = model_shape(vocab.customer_specs, vocab.product_specs, vocab, config)
    ours, ref, ref_same, building = [], [], [], []
    if not on_cpu:  # CUDA context, cuBLAS handles and the caching allocator's first blocks, not timed
        few = min(train.num_rows, 20 * args.batch_size)
        warm = split_examples(pl.concat([train_df.head(few), valid_df.head(1000)]), vocab.customer_specs,
                              vocab.product_specs)
        train_dlrm(*warm, shape, config, device=args.device)
        reference_loop(train_df.head(few), vocab, config, args.device)
    handoff = Path(tempfile.mkdtemp(prefix="feedpipe_bench_reference_"))
    train_df.write_parquet(handoff / "train.parquet")
    (handoff / "vocab.pickle").write_bytes(pickle.dumps(vocab))
    (handoff / "config.pickle").write_bytes(pickle.dumps(config))
    (handoff / "device").write_text(args.device)
    ours_fp32, ref_here = [], []
    fp32 = replace(config, precision="fp32")
    # Where `auto` already means fp32 (no native bf16), the fp32 loop is the same loop: not run twice.
    auto_is_fp32 = over_arch_dtype(config, torch.device(args.device)) is None
    try:
        for _ in range(args.repeats):
            ours.append(train_dlrm(train, valid, shape, config, device=args.device).samples_per_s)
            ours_fp32.append(ours[-1] if auto_is_fp32 else
                             train_dlrm(train, valid, shape, fp32, device=args.device).samples_per_s)
            child = reference_in_own_process(handoff)
            ref.append(child["rate"])
            building.append(child["share"])
            if on_cpu:
                ref_same.append(child["rate_same"])
                # The same loop in this process, under feedpipe's OMP_WAIT_POLICY=PASSIVE: what sessions 1-7 compared with.
                ref_here.append(reference_loop(train_df, vocab, config)[0])
    finally:
        shutil.rmtree(handoff, ignore_errors=True)  # a copy of the whole training set
    threads_reference, reference_omp = child["threads"], child["omp_wait_policy"]
    med = statistics.median
    result = {
        "samples_per_s": round(med(ours)),
        "reference_samples_per_s": round(med(ref)),
        "precision": config.precision,
        "over_arch_dtype": str(over_arch_dtype(config, torch.device(args.device)) or torch.float32).removeprefix("torch."),
        # feedpipe's loop with its over arch kept in fp32, for what bf16 alone buys
        "samples_per_s_fp32": round(med(ours_fp32)),
        "speedup_fp32": round(med(ours_fp32) / med(ref), 2),
        "speedup": round(med(ours) / med(ref), 2),
        "reference_same_threads_samples_per_s": round(med(ref_same)) if on_cpu else None,
        "speedup_same_threads": round(med(ours) / med(ref_same), 2) if on_cpu else None,
        "reference_passive_omp_samples_per_s": round(med(ref_here)) if on_cpu else None,
        "speedup_vs_passive_omp_reference": round(med(ours) / med(ref_here), 2) if on_cpu else None,
        # The reference's time outside its model step: all a faster input path alone could save.
        "reference_batch_building_share": round(med(building), 3),
        "cpu": cpu_name(),
        "gpu": None if on_cpu else torch.cuda.get_device_name(),
        "torch": torch.__version__,
        "threads_feedpipe": training_threads(config, shape),
        "threads_reference": threads_reference,
        "reference_omp_wait_policy": reference_omp,  # null: OpenMP's default, as the article's script runs
        "rows": train_df.height,
        "batch_size": args.batch_size,
        "repeats": args.repeats,
        "device": args.device,
        "parameters": TwoSidedDLRM(shape).parameter_count(),
        "embedding_dim": config.embedding_dim,
        "dense_arch_layers": list(config.dense_arch_layers),
        "over_arch_layers": list(config.over_arch_layers),
    }
    print(json.dumps(result))


if __name__ == "__main__":
    main()
