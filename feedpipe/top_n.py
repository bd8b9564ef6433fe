"""Choosing the best N products per customer: the result type, the exclusion lists and a fast top-k.

Core code without Dagster, used by `scoring.py` on each unit of customers' logits.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch

# Columns per group in top_k_rows: 4 was fastest for top 100 of 2k-10k (measured 3.2 ms against
# torch.topk's 4.5 ms for 260 x 2000 on one core; groups of 2 and 8 lost to 4 on the Xeon with AMX too).
TOPK_CHUNK = 4


@dataclass
class TopN:
    """rows[c, k] = product row of customer c's k-th best; scores are probabilities (sigmoid of logits).

    Slots a customer cannot fill (fewer allowed products than N) hold row -1 and score NaN.
    """

    product_rows: torch.Tensor  # [Nc, N] int64
    scores: torch.Tensor  # [Nc, N] float32


@dataclass
class Exclusions:
    """CSR list of product rows excluded per customer row: values[offsets[c]:offsets[c+1]]."""

    offsets: torch.Tensor  # [Nc+1] int64
    values: torch.Tensor  # [nnz] int64

    @classmethod
    def from_pairs(cls, customer_rows: np.ndarray, product_rows: np.ndarray, num_customers: int) -> "Exclusions":
        order = np.lexsort((product_rows, customer_rows))
        c = np.asarray(customer_rows, dtype=np.int64)[order]
        p = np.asarray(product_rows, dtype=np.int64)[order]
        counts = np.bincount(c, minlength=num_customers)
        offsets = np.zeros(num_customers + 1, dtype=np.int64)
        np.cumsum(counts, out=offsets[1:])
        return cls(torch.from_numpy(offsets), torch.from_numpy(p))

    def to(self, device: torch.device | str) -> "Exclusions":
        return Exclusions(self.offsets.to(device), self.values.to(device))

    @classmethod
    def none(cls, num_customers: int) -> "Exclusions":
        return cls(torch.zeros(num_customers + 1, dtype=torch.long), torch.zeros(0, dtype=torch.long))

    def remapped(self, column_of_row: torch.Tensor) -> "Exclusions":
        """Product rows -> scored columns; rows that are not scored (column -1) are dropped."""
        if bool((column_of_row == torch.arange(column_of_row.numel())).all()):
            return self  # every product is scored, in order
        cols = column_of_row[self.values]
        keep = cols >= 0
        n = self.offsets.numel() - 1
        owner = torch.repeat_interleave(torch.arange(n), self.offsets[1:] - self.offsets[:-1])
        offsets = torch.zeros(n + 1, dtype=torch.long)
        torch.cumsum(torch.bincount(owner[keep], minlength=n), 0, out=offsets[1:])
        return Exclusions(offsets, cols[keep])


def apply_exclusions(logits: torch.Tensor, ex: Exclusions, start: int, stop: int,
                     on_device: Exclusions | None = None) -> None:
    """Set the excluded products of customers [start, stop) to -inf in their block of logits.

    `on_device`: the same lists already on the logits' device (`ex.to`); `ex` stays on the CPU for the
    bounds, so nothing here waits for the device.
    """
    lo, hi = int(ex.offsets[start]), int(ex.offsets[stop])
    if hi == lo:
        return
    src = on_device if on_device is not None else ex
    lengths = src.offsets[start + 1 : stop + 1] - src.offsets[start:stop]
    block_rows = torch.repeat_interleave(torch.arange(stop - start, device=lengths.device), lengths, output_size=hi - lo)
    logits[block_rows.to(logits.device), src.values[lo:hi].to(logits.device)] = float("-inf")


def top_k_rows(logits: torch.Tensor, k: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(values, indices) of `torch.topk(logits, k, dim=1)`, 20-30% faster when k is far below P.

    Group each row's columns TOPK_CHUNK at a time: an element outside the k groups with the largest
    maxima has k group maxima at least as large as itself, so the top k lie in those k groups and the
    top k of their k * TOPK_CHUNK elements is the answer (up to the order of ties). Group c is the
    columns c, c + q, c + 2q, ... (q = P / TOPK_CHUNK), so its maxima are an elementwise maximum of
    contiguous slices: 1.2 ms for 2,000 x 2,000 bf16 on one core of the Xeon with AMX, where `amax`
    over contiguous groups of 4 took 4.5 ms (and the whole selection 25.5 ms against 21.0 now).
    """
    s, p = logits.shape
    g = TOPK_CHUNK
    q = p // g
    if k == 0 or q < 2 * k or not logits.is_cpu:  # measured on CPU cores; a GPU's topk is its own
        return tuple(torch.topk(logits, k, dim=1))
    maxima = logits[:, :q]
    for j in range(1, g):
        maxima = torch.maximum(maxima, logits[:, j * q : (j + 1) * q])
    best = torch.topk(maxima, k, dim=1, sorted=False).indices  # [S, k]
    columns = (best.unsqueeze(1) + torch.arange(0, g * q, q, device=logits.device).view(1, g, 1)).view(s, g * k)
    if g * q < p:  # the last columns belong to no group: always candidates
        columns = torch.cat([columns, torch.arange(g * q, p, device=logits.device).expand(s, -1)], dim=1)
    top = torch.topk(torch.gather(logits, 1, columns), k, dim=1)
    return top.values, torch.gather(columns, 1, top.indices)
