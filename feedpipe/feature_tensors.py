"""Encoded tables -> tensors, and vectorized row gathers that build KeyedJaggedTensors.

One side (customers or products, or one side's columns of the training examples) becomes a
`SideTensors`: a dense matrix `[N, n_dense]` and, per sparse feature, a jagged pair
(`values [nnz]`, `offsets [N+1]`). A batch is a gather of row indices; jagged gathers use
`repeat_interleave` over offsets, never a Python loop over rows.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import polars as pl
import torch
from torchrec import KeyedJaggedTensor

from feedpipe.contract import DENSE, MULTI_CATEGORICAL
from feedpipe.sources import FeatureSpec
from feedpipe.vocabularies import feature_key


@dataclass
class SideTensors:
    """Row-aligned tensors of one side. dense: [N, n_dense] float32; sparse[f]: (values [nnz], offsets [N+1])."""

    dense: torch.Tensor
    sparse_keys: list[str]
    sparse: dict[str, tuple[torch.Tensor, torch.Tensor]]

    @property
    def num_rows(self) -> int:
        return int(self.dense.shape[0])

    def to(self, device: torch.device | str) -> "SideTensors":
        return SideTensors(
            self.dense.to(device),
            self.sparse_keys,
            {k: (v.to(device), o.to(device)) for k, (v, o) in self.sparse.items()},
        )

    def gather(self, rows: torch.Tensor) -> tuple[torch.Tensor, KeyedJaggedTensor]:
        """Dense [B, n_dense] and a KJT (keys = sparse_keys, batch B) for the given row indices."""
        dense = self.dense.index_select(0, rows)
        lengths_all, values_all = [], []
        for key in self.sparse_keys:
            bag_values, lengths = gather_bags(*self.sparse[key], rows)
            lengths_all.append(lengths)
            values_all.append(bag_values)
        kjt = KeyedJaggedTensor(
            keys=self.sparse_keys,
            values=torch.cat(values_all) if values_all else torch.empty(0, dtype=torch.long, device=rows.device),
            lengths=(torch.cat(lengths_all).to(torch.int32) if lengths_all
                     else torch.empty(0, dtype=torch.int32, device=rows.device)),
        )
        return dense, kjt

    def all_rows(self) -> tuple[torch.Tensor, KeyedJaggedTensor]:
        return self.gather(torch.arange(self.num_rows, device=self.dense.device))


def gather_bags(values: torch.Tensor, offsets: torch.Tensor, rows: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """The bags of `rows` from a jagged (values [nnz], offsets [N+1]): their values, concatenated, and lengths [B]."""
    idx, lengths = bag_positions(offsets, rows)
    return values.index_select(0, idx), lengths


def bag_positions(offsets: torch.Tensor, rows: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Where the values of the bags of `rows` sit in a jagged with these offsets [N+1], concatenated
    in the order of `rows`, and the bags' lengths [B]: what `gather_bags` gathers, for any array
    laid out like the values."""
    starts = offsets.index_select(0, rows)
    lengths = offsets.index_select(0, rows + 1) - starts
    total = int(lengths.sum())
    # Position j of the output takes values[starts[bag(j)] + (j - out_start[bag(j)])]. In the
    # offsets' own dtype: int32 offsets keep these temporaries at half the size.
    out_starts = torch.cumsum(lengths, 0, dtype=lengths.dtype) - lengths
    idx = torch.repeat_interleave(starts - out_starts, lengths, output_size=total)
    return idx + torch.arange(total, device=offsets.device, dtype=idx.dtype), lengths


def _jagged(series: pl.Series, role: str) -> tuple[torch.Tensor, torch.Tensor]:
    if role == MULTI_CATEGORICAL:
        lengths = series.list.len().fill_null(0).to_numpy().astype(np.int64)
        values = series.explode().drop_nulls().to_numpy().astype(np.int64)
    else:
        lengths = np.ones(series.len(), dtype=np.int64)
        values = series.to_numpy().astype(np.int64)
    offsets = np.zeros(len(lengths) + 1, dtype=np.int64)
    np.cumsum(lengths, out=offsets[1:])
    return torch.from_numpy(values), torch.from_numpy(offsets)


def side_tensors(df: pl.DataFrame, specs: list[FeatureSpec]) -> SideTensors:
    """Tensors for the specs of one side, read from an encoded frame (see vocabularies.encode_table)."""
    dense_specs = [s for s in specs if s.role == DENSE]
    sparse_specs = [s for s in specs if s.role != DENSE]
    if dense_specs:
        dense = torch.from_numpy(
            np.array(df.select([pl.col(feature_key(s)).cast(pl.Float32) for s in dense_specs]).to_numpy(), dtype=np.float32)
        ).contiguous()
    else:
        dense = torch.zeros((df.height, 0), dtype=torch.float32)
    sparse = {feature_key(s): _jagged(df.get_column(feature_key(s)), s.role) for s in sparse_specs}
    return SideTensors(dense=dense, sparse_keys=[feature_key(s) for s in sparse_specs], sparse=sparse)
