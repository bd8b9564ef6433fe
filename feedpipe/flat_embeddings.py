"""One side's embedding tables as one flat matrix, for training in one process.

TorchRec's unsharded `EmbeddingBagCollection` runs one `embedding_bag` per table, and each one's
backward writes a dense gradient of its whole table (measured on the 2-core box: 7 tables cost
2.2 ms of backward and 1.3 ms of RowWiseAdagrad per 2,048-example batch, a third of the step). Here a
side's tables are stacked into one `[sum of rows, D]` parameter, the way FBGEMM's batched kernels
lay them out: a batch looks up every id of the side with ONE `index_select` (ids shifted by their
table's first row), so backward is one `index_add` and the optimizer steps one tensor.

The math is the EBC's: a single-valued feature's vector is its row; a multi-valued one's is the
mean of its rows (PoolingType.MEAN; an empty bag is zero). Row-wise Adagrad keeps one accumulator
per row whichever table the row belongs to, so stepping the flat matrix is stepping every table.

The EBC's table weights become views of the flat matrix (`bind`), so the model sees every update
with no copying: its state_dict, evaluation and checkpoint read the trained rows directly.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn
from torchrec import EmbeddingBagCollection

from feedpipe.feature_tensors import SideTensors, gather_bags
from feedpipe.model import SparseFeature


def table_name(feature: SparseFeature) -> str:
    """The EBC table of a feature (see model._ebc)."""
    return "t_" + feature.name.replace(".", "__")


@dataclass
class FlatIds:
    """A side's ids for every example row, shifted into the flat matrix.

    single: [N, S] rows of the single-valued features (S of them, in key order);
    multi[k]: (rows [nnz], offsets [N+1]) of the k-th multi-valued feature.
    """

    single: torch.Tensor
    multi: list[tuple[torch.Tensor, torch.Tensor]]


class FlatTables(nn.Module):
    """A side's tables as one parameter `weight` [R, D]; `lookup(ids, rows)` -> [B, F, D] in key order."""

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
        self.single = [i for i, f in enumerate(features) if not f.multi_valued]
        self.multi = [i for i, f in enumerate(features) if f.multi_valued]
        self._ebc, self._starts = ebc, starts
        self.bind()

    def bind(self) -> None:
        """Make the EBC's table weights views of `weight`: they read what training writes."""
        for f, lo, hi in zip(self.features, self._starts, self._starts[1:]):
            self._ebc.embedding_bags[table_name(f)].weight.data = self.weight.data[lo:hi]

    def ids(self, side: SideTensors) -> FlatIds:
        """Every row's ids of this side, shifted to the flat matrix; computed once per example set."""
        keys = [f.name for f in self.features]
        if side.sparse_keys != keys:
            raise ValueError(f"example tensors have keys {side.sparse_keys}, the tables {keys}")
        single = [side.sparse[keys[i]][0].index_select(0, side.sparse[keys[i]][1][:-1]) + self.first_row[i]
                  for i in self.single]
        n = side.num_rows
        single_ids = torch.stack(single, 1) if single else torch.zeros((n, 0), dtype=torch.long, device=side.dense.device)
        multi = [(side.sparse[keys[i]][0] + self.first_row[i], side.sparse[keys[i]][1]) for i in self.multi]
        return FlatIds(single_ids.contiguous(), multi)

    def lookup(self, ids: FlatIds, rows: torch.Tensor) -> torch.Tensor:
        """[B, F, D]: the side's pooled vectors of example `rows`, features in key order."""
        b, d = rows.numel(), self.dim
        parts = [ids.single.index_select(0, rows).view(-1)]
        bags = []
        for values, offsets in ids.multi:
            bag_values, lengths = gather_bags(values, offsets, rows)
            parts.append(bag_values)
            bags.append((lengths, bag_values.numel()))
        vectors = self.weight.index_select(0, torch.cat(parts))  # one lookup -> one index_add in backward
        out: list[torch.Tensor | None] = [None] * len(self.features)
        single = vectors[: b * len(self.single)].view(b, len(self.single), d)
        for j, i in enumerate(self.single):
            out[i] = single[:, j]
        at = b * len(self.single)
        for i, (lengths, total) in zip(self.multi, bags):
            bag = torch.repeat_interleave(torch.arange(b, device=rows.device), lengths, output_size=total)
            scale = (1.0 / lengths.clamp(min=1).to(vectors.dtype)).index_select(0, bag).unsqueeze(1)
            out[i] = vectors.new_zeros((b, d)).index_add(0, bag, vectors[at : at + total] * scale)
            at += total
        return torch.stack(out, dim=1)  # type: ignore[arg-type]
