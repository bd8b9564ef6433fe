"""The DLRM interaction's forward + backward, three ways, side by side: what `model.PairDots` buys.

- feedpipe: `PairDots` (one `bmm` for the Gram matrix; backward (G + G^T) as one matrix product with
  a fixed 0/1 matrix, then one `bmm`);
- index_copy: the same, with (G + G^T) built by two `index_copy_` along dim 1 (sessions 5-6);
- autograd: torchrec's InteractionArch way, `bmm` and advanced indexing of the triangle, differentiated
  by autograd (what the training benchmark's reference loop runs).

Usage: benchmarks/interaction.py [--batch B] [--vectors F] [--dim D] [--repeats R]
Prints one JSON line last: microseconds per forward + backward of each, and the ratios.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import feedpipe  # noqa: E402,F401  (first: it sets OMP_WAIT_POLICY before torch loads OpenMP)
import torch  # noqa: E402

from benchmarks.machine import cpu_name  # noqa: E402
from feedpipe.model import PairDots, pair_scatter  # noqa: E402


class IndexCopyPairDots(torch.autograd.Function):
    """PairDots as sessions 5-6 had it: (G + G^T) by two index_copy_ along dim 1."""

    @staticmethod
    def forward(ctx, v, flat, flat_t):
        b, f, _ = v.shape
        ctx.save_for_backward(v, flat, flat_t)
        return torch.bmm(v, v.transpose(1, 2)).view(b, f * f).index_select(1, flat)

    @staticmethod
    def backward(ctx, grad):
        v, flat, flat_t = ctx.saved_tensors
        b, f, _ = v.shape
        g = v.new_zeros((b, f * f))
        g.index_copy_(1, flat, grad).index_copy_(1, flat_t, grad)
        return torch.bmm(g.view(b, f, f), v), None, None


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--batch", type=int, default=2048)
    p.add_argument("--vectors", type=int, default=9, help="F: the demo model's 4 customer + 5 product vectors")
    p.add_argument("--dim", type=int, default=16)
    p.add_argument("--repeats", type=int, default=5)
    p.add_argument("--calls", type=int, default=100, help="forward + backward calls per timed round")
    args = p.parse_args()
    torch.set_num_threads(1)  # as training runs the default model (training.training_threads)
    f = args.vectors
    rows, cols = torch.triu_indices(f, f, offset=1)
    flat, flat_t, scatter = rows * f + cols, cols * f + rows, pair_scatter(f)
    g = torch.Generator().manual_seed(0)
    v0 = torch.randn(args.batch, f, args.dim, generator=g)
    grad = torch.randn(args.batch, rows.numel(), generator=g)
    ways = {
        "feedpipe": lambda v: PairDots.apply(v, flat, scatter),
        "index_copy": lambda v: IndexCopyPairDots.apply(v, flat, flat_t),
        "autograd": lambda v: torch.bmm(v, v.transpose(1, 2))[:, rows, cols],
    }
    grads = {}
    for name, way in ways.items():  # all three compute the same dots and gradient
        v = v0.clone().requires_grad_()
        way(v).backward(grad)
        grads[name] = v.grad
    max_diff = max((grads[n] - grads["autograd"]).abs().max().item() for n in ways)

    def fwd_bwd(way):
        v = v0.clone().requires_grad_()
        way(v).backward(grad)

    rounds: dict[str, list[float]] = {name: [] for name in ways}
    for r in range(args.repeats + 1):
        for name, way in ways.items():  # interleaved, so a load change shows in all three
            t0 = time.perf_counter()
            for _ in range(args.calls):
                fwd_bwd(way)
            if r:  # round 0 warms up
                rounds[name].append((time.perf_counter() - t0) / args.calls * 1e6)
    us = {name: statistics.median(t) for name, t in rounds.items()}
    for name, t in rounds.items():
        print(f"{name}: {us[name]:.0f} us (rounds {', '.join(f'{x:.0f}' for x in t)})", file=sys.stderr)
    print(json.dumps({
        "feedpipe_us": round(us["feedpipe"]),
        "index_copy_us": round(us["index_copy"]),
        "autograd_us": round(us["autograd"]),
        "saved_vs_index_copy_us": round(us["index_copy"] - us["feedpipe"]),
        "speedup_vs_autograd": round(us["autograd"] / us["feedpipe"], 2),
        "max_grad_diff": max_diff,
        "batch": args.batch, "vectors": f, "dim": args.dim, "repeats": args.repeats,
        "cpu": cpu_name(), "torch": torch.__version__,
    }))


if __name__ == "__main__":
    main()
