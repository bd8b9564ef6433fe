"""One side's embedding tables as one flat matrix, and its training examples as bags of its rows.

TorchRec's unsharded `EmbeddingBagCollection` runs one `embedding_bag` per table, and each one's
backward writes a dense gradient of its whole table (measured on the 2-core box: 7 tables cost
2.2 ms of backward and 1.3 ms of RowWiseAdagrad per 2,048-example batch, a third of the step). Here a
side's tables are stacked into one `[sum of rows, D]` parameter, the way FBGEMM's batched kernels
lay them out, so backward writes one gradient and the optimizer steps one tensor.

The examples of a side become `SideBags`: each example row is F bags (one per feature, in key
order) of rows of the flat matrix, ids shifted by their table's first row. A batch is pooled by ONE
`embedding_bag` (sum, with per-value weights: 1 for a single-valued feature, 1/len for each value of
a multi-valued bag, which is the EBC's MEAN; an empty bag is zero), and its backward is one
`index_add` (`_PooledBags`). A side whose features are all single-valued has one value per bag, and
its lookup is a plain `index_select`.

The bags are permuted once per epoch (`SideBags.permuted`), so every batch of the epoch is a
contiguous slice of them (`SideBags.batches`): no per-batch gather of ids, offsets or bags.

The EBC's table weights become views of the flat matrix (`bind`), so the model sees every update
with no copying: its state_dict, evaluation and checkpoint read the trained rows directly.
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn
from torchrec import EmbeddingBagCollection

from feedpipe.feature_tensors import SideTensors, bag_positions
from feedpipe.model import SparseFeature


def table_name(feature: SparseFeature) -> str:
    """The EBC table of a feature (see model._ebc)."""
    return "t_" + feature.name.replace(".", "__")


def index_dtype(*sizes: int) -> torch.dtype:
    """int32 ids and offsets where they fit, for the examples' whole layout (half the memory of
    int64); a batch's slice is widened to int64 (`SideBags.batches`)."""
    return torch.int32 if max(sizes, default=0) < 2**31 else torch.int64


# Rows handled at once when a layout is built or shuffled: the temporaries stay a few MB.
CHUNK_ROWS = 1 << 18


@dataclass
class SideBags:
    """Example rows as bags of flat-matrix rows, row-major: example r's bags are r*F ... r*F + F-1.

    values [nnz]: flat-matrix rows; offsets [N*F + 1]: where each bag starts, and the end (None:
    every bag holds exactly one value, so bag i is values[i]); multi [F]: which features are
    multi-valued (their values weigh 1/len in the bag, the EBC's MEAN). A batch cut by `batches`
    also carries `bag` and `weights` per value, for `pool`; the whole layout does not (8 B per
    value it would hold all epoch).
    """

    features: int
    values: torch.Tensor
    offsets: torch.Tensor | None = None
    multi: torch.Tensor | None = None
    weights: torch.Tensor | None = None
    bag: torch.Tensor | None = None

    @property
    def num_rows(self) -> int:
        bags = self.values.numel() if self.offsets is None else self.offsets.numel() - 1
        return bags // self.features

    def permuted(self, order: torch.Tensor) -> "SideBags":
        """The rows in `order` (an epoch's shuffle, or any selection of rows), as new tensors."""
        f = self.features
        if self.offsets is None:
            return SideBags(f, self.values.view(-1, f).index_select(0, order).view(-1))
        lengths = self.offsets.diff().view(-1, f).index_select(0, order).view(-1)  # [B*F]
        offsets = _offsets(lengths)
        starts = [*range(0, order.numel(), CHUNK_ROWS), order.numel()]
        bounds = offsets[torch.tensor(starts, device=offsets.device) * f].tolist()
        values, row_offsets = self.values.new_empty(bounds[-1]), self.offsets[::f]
        for a, b, va, vb in zip(starts, starts[1:], bounds, bounds[1:]):
            positions, _ = bag_positions(row_offsets, order[a:b])  # the chunk's values, in the new order
            values[va:vb] = self.values.index_select(0, positions)
        return SideBags(f, values, offsets, self.multi)

    def batches(self, batch_size: int) -> Iterator["SideBags"]:
        """Consecutive slices of `batch_size` rows (the last may be shorter), ids as int64: CPU
        index_add with int32 indices is 4-5x slower (0.32 against 0.07 ms for a batch's 6,144 rows)."""
        f, n = self.features, self.num_rows
        starts = [*range(0, n, batch_size), n]
        if self.offsets is None:
            for a, b in zip(starts, starts[1:]):
                yield SideBags(f, self.values[a * f : b * f].long())
            return
        bounds = self.offsets[torch.tensor(starts, device=self.offsets.device) * f].tolist()  # one host read
        for a, b, va, vb in zip(starts, starts[1:], bounds, bounds[1:]):
            offsets = self.offsets[a * f : b * f + 1].long() - va
            lengths = offsets.diff()
            bag = torch.repeat_interleave(torch.arange(lengths.numel(), device=lengths.device), lengths,
                                          output_size=vb - va)
            share = torch.where(self.multi.repeat(b - a), 1.0 / lengths.clamp(min=1), 1.0)
            yield SideBags(f, self.values[va:vb].long(), offsets, self.multi,
                           share.index_select(0, bag).to(torch.float32), bag)


def _offsets(lengths: torch.Tensor) -> torch.Tensor:
    offsets = lengths.new_zeros(lengths.numel() + 1)
    torch.cumsum(lengths, 0, dtype=offsets.dtype, out=offsets[1:])
    return offsets


class _PooledBags(torch.autograd.Function):
    """embedding_bag's weighted sum; backward as one index_add into the matrix's gradient.

    Written out because embedding_bag's own CPU backward took 0.8-1.0 ms per 2,048-row batch of the
    demo's product side where this one takes ~0.3 ms (2-core AMD EPYC, one thread).
    """

    @staticmethod
    def forward(ctx, weight: torch.Tensor, values: torch.Tensor, offsets: torch.Tensor, weights: torch.Tensor,
                bag: torch.Tensor):
        ctx.save_for_backward(values, weights, bag)
        ctx.rows = weight.shape[0]
        return F.embedding_bag(values, weight, offsets, mode="sum", per_sample_weights=weights,
                               include_last_offset=True)

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        values, weights, bag = ctx.saved_tensors
        rows = grad.contiguous().index_select(0, bag) * weights.unsqueeze(1)
        return grad.new_zeros((ctx.rows, grad.shape[1])).index_add_(0, values, rows), None, None, None, None


class FlatTables(nn.Module):
    """A side's tables as one parameter `weight` [R, D]; `bags(side)` lays out its examples once,
    `pool(bags)` -> [B, F, D] in key order."""

    def __init__(self, ebc: EmbeddingBagCollection, features: tuple[SparseFeature, ...]) -> None:
        super().__init__()
        tables = [ebc.embedding_bags[table_name(f)].weight for f in features]
        self.features = features
        self.dim = int(tables[0].shape[1])
        starts = [0]
        for t in tables:
            starts.append(starts[-1] + int(t.shape[0]))
        self.first_row = starts[:-1]
        self.weight = nn.Parameter(torch.cat([t.detach() for t in tables]))
        self._ebc, self._starts = ebc, starts
        self.bind()

    def bind(self) -> None:
        """Make the EBC's table weights views of `weight`: they read what training writes."""
        for f, lo, hi in zip(self.features, self._starts, self._starts[1:]):
            self._ebc.embedding_bags[table_name(f)].weight.data = self.weight.data[lo:hi]

    def bags(self, side: SideTensors) -> SideBags:
        """Every example row's bags of this side, shifted to the flat matrix; computed once per example
        set, CHUNK_ROWS rows at a time."""
        keys = [f.name for f in self.features]
        if side.sparse_keys != keys:
            raise ValueError(f"example tensors have keys {side.sparse_keys}, the tables {keys}")
        n, f = side.num_rows, len(keys)
        jagged = [side.sparse[k] for k in keys]
        nnz = sum(int(v.numel()) for v, _ in jagged)
        dtype = index_dtype(nnz, n * f + 1, self._starts[-1])
        if not any(feat.multi_valued for feat in self.features) and nnz == n * f:  # one value per bag
            values = torch.stack([(v + first).to(dtype) for (v, _), first in zip(jagged, self.first_row)], 1)
            return SideBags(f, values.view(-1))
        device = side.dense.device
        offsets = _offsets(torch.stack([o.diff().to(dtype) for _, o in jagged], 1).view(-1))
        values = torch.empty(nnz, dtype=dtype, device=device)
        for a in range(0, n, CHUNK_ROWS):
            b = min(n, a + CHUNK_ROWS)
            for k, (v, o) in enumerate(jagged):
                lo, hi = int(o[a]), int(o[b])
                # Value j of row r's bag k goes to offsets[r*F + k] + (j - o[r]).
                shift = offsets[a * f + k : b * f : f].long() - o[a:b]
                at = torch.repeat_interleave(shift, o[a + 1 : b + 1] - o[a:b], output_size=hi - lo)
                values[at + torch.arange(lo, hi, device=device)] = (v[lo:hi] + self.first_row[k]).to(dtype)
        multi = torch.tensor([feat.multi_valued for feat in self.features], device=device)
        return SideBags(f, values, offsets, multi)

    def pool(self, bags: SideBags) -> torch.Tensor:
        """[B, F, D]: the pooled vectors of the bags' rows, features in key order."""
        f, d = len(self.features), self.dim
        if bags.offsets is None:
            return self.weight.index_select(0, bags.values).view(-1, f, d)  # backward: one index_add
        if bags.bag is None:  # a layout not cut by `batches` (a test's selection of rows, say)
            bags = next(bags.batches(max(bags.num_rows, 1)), None)
            if bags is None:  # no rows
                return self.weight.new_zeros((0, f, d))
        weights = bags.weights.to(self.weight.dtype)  # embedding_bag wants the matrix's dtype
        return _PooledBags.apply(self.weight, bags.values, bags.offsets, weights, bags.bag).view(-1, f, d)
