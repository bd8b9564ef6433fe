"""Exact top-N over every customer x product pair, with one-side work done once per side.

The first over-arch layer is linear in its input, so its pre-activation splits exactly:

    W1 @ [c_dense, p_dense, dots] + b1 = a_c + b_p + cross(c, p)
    a_c  = W_cd @ c_dense + W_cc @ same-side dots of c            [H]    once per customer
    b_p  = W_pd @ p_dense + W_pp @ same-side dots of p + b1       [H]    once per product
    cross(c, p) = sum_{i in C, j in P} W_x[:, i, j] <v_ci, v_pj>
                = U_c @ vec(E_p),  U_c[h, j, :] = sum_i W_x[h, i, j] v_ci     U_c: [H, Fp*D]

so for a block of B customers and all P products the cross term is ONE matrix product
`E [P, Fp*D] @ U^T [Fp*D, B*H]`, after which only the remaining over-arch layers run per pair.
Customers stream in blocks sized to a fixed number of pairs, so memory does not grow with the
number of customers; top-N is taken per block and exclusions are applied from a sparse (CSR) list.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch
from torch import nn

from feedpipe.feature_tensors import SideTensors
from feedpipe.model import TwoSidedDLRM

DEFAULT_PAIRS_PER_BLOCK = 1 << 18


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

    @classmethod
    def none(cls, num_customers: int) -> "Exclusions":
        return cls(torch.zeros(num_customers + 1, dtype=torch.long), torch.zeros(0, dtype=torch.long))


@dataclass
class FactoredOverArch:
    """The over arch split into customer, product and cross blocks (see module docstring)."""

    w_cd: torch.Tensor | None  # [H, D]
    w_pd: torch.Tensor | None  # [H, D]
    w_cc: torch.Tensor  # [H, n_cc]
    w_pp: torch.Tensor  # [H, n_pp]
    w_x: torch.Tensor  # [H, Fc, Fp]
    b1: torch.Tensor  # [H]
    cc_pairs: tuple[torch.Tensor, torch.Tensor]
    pp_pairs: tuple[torch.Tensor, torch.Tensor]
    rest: list[nn.Linear]  # the layers after the first; ReLU between them, none after the last


def _over_arch_linears(model: TwoSidedDLRM) -> list[nn.Linear]:
    # torchrec's OverArch is MLP(Perceptrons: Linear+ReLU) then a bare Linear: every Linear but the
    # last is followed by ReLU. Asserted so a change in torchrec's layout fails loudly, not silently.
    linears = [m for m in model.over_arch.modules() if isinstance(m, nn.Linear)]
    assert len(linears) == len(model.shape.over_arch_layers), "unexpected OverArch layout"
    return linears


def factor_over_arch(model: TwoSidedDLRM) -> FactoredOverArch:
    linears = _over_arch_linears(model)
    w1, b1 = linears[0].weight.detach(), linears[0].bias.detach()
    d = model.shape.embedding_dim
    fc, fp = model.num_customer_vectors, model.num_product_vectors
    col = 0
    w_cd = w_pd = None
    if model.customer_dense_arch is not None:
        w_cd, col = w1[:, col : col + d], col + d
    if model.product_dense_arch is not None:
        w_pd, col = w1[:, col : col + d], col + d
    w_dots = w1[:, col:]
    rows, cols = model.triu_rows, model.triu_cols
    cc = (rows < fc) & (cols < fc)
    pp = (rows >= fc) & (cols >= fc)
    x = (rows < fc) & (cols >= fc)
    w_x = torch.zeros((w1.shape[0], fc, fp), dtype=w1.dtype, device=w1.device)
    w_x[:, rows[x], cols[x] - fc] = w_dots[:, x]
    return FactoredOverArch(
        w_cd=w_cd,
        w_pd=w_pd,
        w_cc=w_dots[:, cc],
        w_pp=w_dots[:, pp],
        w_x=w_x,
        b1=b1,
        cc_pairs=(rows[cc], cols[cc]),
        pp_pairs=(rows[pp] - fc, cols[pp] - fc),
        rest=linears[1:],
    )


def _same_side_dots(v: torch.Tensor, pairs: tuple[torch.Tensor, torch.Tensor]) -> torch.Tensor:
    i, j = pairs
    return (v[:, i, :] * v[:, j, :]).sum(-1)  # [N, n_pairs]


@dataclass
class ProductFactors:
    b: torch.Tensor  # [P, H]
    e: torch.Tensor  # [P, Fp*D]


@torch.no_grad()
def product_factors(model: TwoSidedDLRM, f: FactoredOverArch, products: SideTensors) -> ProductFactors:
    dense, kjt = products.all_rows()
    v = model.product_vectors(dense, kjt if products.sparse_keys else None).stacked()  # [P, Fp, D]
    b = f.b1 + _same_side_dots(v, f.pp_pairs) @ f.w_pp.T
    if f.w_pd is not None:
        b = b + v[:, 0, :] @ f.w_pd.T
    return ProductFactors(b=b, e=v.reshape(v.shape[0], -1))


@torch.no_grad()
def customer_block_factors(
    model: TwoSidedDLRM, f: FactoredOverArch, customers: SideTensors, rows: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor]:
    """a [B, H] and U [B, H, Fp*D] for the given customer rows."""
    dense, kjt = customers.gather(rows)
    v = model.customer_vectors(dense, kjt if customers.sparse_keys else None).stacked()  # [B, Fc, D]
    a = _same_side_dots(v, f.cc_pairs) @ f.w_cc.T
    if f.w_cd is not None:
        a = a + v[:, 0, :] @ f.w_cd.T
    u = torch.einsum("hij,bid->bhjd", f.w_x, v)  # [B, H, Fp, D]
    return a, u.reshape(u.shape[0], u.shape[1], -1)


def block_logits(
    a: torch.Tensor, u: torch.Tensor, pf: ProductFactors, rest: list[nn.Linear], dtype: torch.dtype = torch.float32
) -> torch.Tensor:
    """Logits [B, P] for a block of customers against all products."""
    bsz, h, k = u.shape
    p = pf.e.shape[0]
    # [P, K] @ [K, B*H] -> [P, B*H] == [P*B, H] row-major: rows ordered (product, customer).
    x = (pf.e.to(dtype) @ u.reshape(bsz * h, k).T.to(dtype)).view(p, bsz, h)
    x = torch.relu_(x.add_(a.to(dtype).unsqueeze(0)).add_(pf.b.to(dtype).unsqueeze(1))).view(p * bsz, h)
    for i, lin in enumerate(rest):
        x = torch.nn.functional.linear(x, lin.weight.to(dtype), lin.bias.to(dtype))
        if i < len(rest) - 1:
            x = torch.relu_(x)
    return x.view(p, bsz).T.float()


def _apply_exclusions(logits: torch.Tensor, ex: Exclusions, start: int, stop: int) -> None:
    lo, hi = int(ex.offsets[start]), int(ex.offsets[stop])
    if hi == lo:
        return
    lengths = ex.offsets[start + 1 : stop + 1] - ex.offsets[start:stop]
    block_rows = torch.repeat_interleave(torch.arange(stop - start, device=logits.device), lengths.to(logits.device))
    logits[block_rows, ex.values[lo:hi].to(logits.device)] = float("-inf")


@torch.no_grad()
def score_all_pairs(
    model: TwoSidedDLRM,
    customers: SideTensors,
    products: SideTensors,
    *,
    top_n: int = 100,
    exclusions: Exclusions | None = None,
    pairs_per_block: int = DEFAULT_PAIRS_PER_BLOCK,
    dtype: torch.dtype = torch.float32,
    customer_rows: torch.Tensor | None = None,
) -> TopN:
    """Top-N products per customer over all products (exact in fp32; see module docstring).

    `customer_rows` restricts scoring to those rows of `customers` (e.g. one rank's range); the
    result is aligned with it. Exclusions are indexed by position in `customer_rows`.
    """
    model.eval()
    f = factor_over_arch(model)
    pf = product_factors(model, f, products)
    n_products = pf.e.shape[0]
    rows_all = customer_rows if customer_rows is not None else torch.arange(customers.num_rows)
    n = rows_all.numel()
    exclusions = exclusions if exclusions is not None else Exclusions.none(n)
    k = min(top_n, n_products)
    out_rows = torch.empty((n, k), dtype=torch.long)
    out_scores = torch.empty((n, k), dtype=torch.float32)
    block = max(1, pairs_per_block // max(1, n_products))
    for start in range(0, n, block):
        stop = min(n, start + block)
        a, u = customer_block_factors(model, f, customers, rows_all[start:stop])
        logits = block_logits(a, u, pf, f.rest, dtype)
        _apply_exclusions(logits, exclusions, start, stop)
        top = torch.topk(logits, k, dim=1)
        unfilled = top.values == float("-inf")
        out_rows[start:stop] = top.indices.masked_fill(unfilled, -1)
        out_scores[start:stop] = torch.sigmoid(top.values).masked_fill(unfilled, float("nan"))
    return TopN(out_rows, out_scores)


@torch.no_grad()
def forward_pairs(
    model: TwoSidedDLRM, customers: SideTensors, products: SideTensors, c_rows: torch.Tensor, p_rows: torch.Tensor
) -> torch.Tensor:
    """Logits through the model's own forward for aligned (customer row, product row) pairs: the reference."""
    model.eval()
    cd, ck = customers.gather(c_rows)
    pd, pk = products.gather(p_rows)
    return model(cd, ck if customers.sparse_keys else None, pd, pk if products.sparse_keys else None)
