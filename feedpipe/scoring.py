"""Exact top-N over every customer x product pair, with one-side work done once per side.

The first over-arch layer is linear in its input, so its pre-activation splits exactly:

    W1 @ [c_dense, p_dense, dots] + b1 = a_c + b_p + cross(c, p)
    a_c  = W_cd @ c_dense + W_cc @ same-side dots of c            [H]    once per customer
    b_p  = W_pd @ p_dense + W_pp @ same-side dots of p + b1       [H]    once per product
    cross(c, p) = sum_{i in C, j in P} W_x[:, i, j] <v_ci, v_pj>
                = U_c @ vec(E_p),  U_c[h, j, :] = sum_i W_x[h, i, j] v_ci     U_c: [H, Fp*D]

All three terms come out of ONE matrix product whose bias and ReLU are fused into it:

    x[p, (c, h)] = relu(E'_p . U'_ch + bias_ch)                                       [P, B*H]
    E'_p  = [vec(E_p), same-side dots of p]            [Fp*D + n_pp]     once per product
    U'_ch = [U_c[h] + W_pd[h] on E_p's first block, W_pp[h]]             once per customer
    bias  = a_c + b1                                   the GEMM's own bias (one per output column)

W_pd folds into U' because the product's dense-arch output already is E_p's first D-block, so only
the n_pp product dots widen the product (K = 80 + 10 = 90 at the project's defaults). The remaining
over-arch layers then run on x viewed as [P*B, H] (rows ordered product, customer), the last one a
matrix-vector product whose bias is added to the N kept scores only.

Work is cut into tiles of about `pairs_per_tile` pairs (B customers x Pc products) so a tile's
intermediates stay in L2/L3, and into units of customers handed to worker threads. Each worker runs
single-threaded kernels on its own units: no barrier per matrix product, so a core taken by another
process on a shared machine slows one worker instead of stalling both. Top-N is taken per unit with
`torch.topk`, exclusions are scattered into the unit's logits from a CSR list, and unavailable
products are dropped from E' before scoring, so no customers x products matrix ever exists.

On CPU the kernels are oneDNN's (`torch.ops.mkldnn._linear_pointwise`, the op Inductor lowers
Linear+ReLU to): on this project's 2-core AMD EPYC it runs fp32 at ~230 GFLOP/s per core where
MKL's sgemm behind `F.linear` reaches 80-110, and it fuses the bias and the ReLU. bf16 runs on the
AVX512_BF16 dot-product instructions with fp32 accumulation (~470 GFLOP/s per core).
"""

from __future__ import annotations

import threading
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass

import numpy as np
import torch
from torch import nn

from feedpipe.feature_tensors import SideTensors
from feedpipe.model import TwoSidedDLRM

# Measured on the 2-core EPYC (benchmarks/README.md, "Scoring"): 8k-pair tiles keep the first
# layer's output (4 MiB fp32) in L2+L3 and the per-tile Python overhead under 2%.
DEFAULT_PAIRS_PER_TILE = 1 << 13
# One worker's unit of customers: ~0.1 s of work, small enough that workers finish together.
DEFAULT_PAIRS_PER_UNIT = 1 << 19
# Customers whose U' is built at once: M of that matrix product, and 0.7-1.5 MiB of U' (L2 is 2 MiB).
U_PRIME_GROUP = 32
# Columns per chunk in top_k_rows: 4 was fastest for top 100 of 2k-10k (measured 3.2 ms against
# torch.topk's 4.5 ms for 260 x 2000 on one core).
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

    @classmethod
    def none(cls, num_customers: int) -> "Exclusions":
        return cls(torch.zeros(num_customers + 1, dtype=torch.long), torch.zeros(0, dtype=torch.long))

    def remapped(self, column_of_row: torch.Tensor) -> "Exclusions":
        """Product rows -> scored columns; rows that are not scored (column -1) are dropped."""
        cols = column_of_row[self.values]
        keep = cols >= 0
        if bool(keep.all()):
            return Exclusions(self.offsets, cols)
        n = self.offsets.numel() - 1
        owner = torch.repeat_interleave(torch.arange(n), self.offsets[1:] - self.offsets[:-1])
        offsets = torch.zeros(n + 1, dtype=torch.long)
        torch.cumsum(torch.bincount(owner[keep], minlength=n), 0, out=offsets[1:])
        return Exclusions(offsets, cols[keep])


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


def onednn_available(device: torch.device) -> bool:
    return device.type == "cpu" and torch.backends.mkldnn.is_available() and hasattr(torch.ops.mkldnn, "_linear_pointwise")


def linear(x: torch.Tensor, w: torch.Tensor, b: torch.Tensor | None, relu: bool, onednn: bool) -> torch.Tensor:
    """relu?(x @ w.T + b): x [M, K], w [N, K], b [N] -> [M, N], bias and ReLU fused on oneDNN."""
    if onednn:
        return torch.ops.mkldnn._linear_pointwise(x, w, b, "relu" if relu else "none", [], "")
    y = nn.functional.linear(x, w, b)
    return torch.relu_(y) if relu else y


@dataclass
class ScoringPlan:
    """What scoring needs from the model and the product table, computed once."""

    model: TwoSidedDLRM
    factored: FactoredOverArch
    e: torch.Tensor  # [P', K'] scoring dtype: E' of every scored product (module docstring)
    product_rows: torch.Tensor  # [P'] int64: product row of each row of e
    column_of_row: torch.Tensor  # [P] int64: column of each product row, -1 where not scored
    u_map: torch.Tensor  # [H*K', Fc*D] dtype: U' as a linear map of the customer's vectors
    u_extra: torch.Tensor  # [H*K'] dtype: the customer-independent part of U'
    middle: list[tuple[torch.Tensor, torch.Tensor]]  # over-arch layers 2..L-1 (ReLU after each), dtype
    last_w: torch.Tensor  # [H_{L-1}] dtype: the last layer (torchrec's OverArch has at least two) as a vector
    last_b: float  # added to the kept logits only
    dtype: torch.dtype
    onednn: bool

    @property
    def num_scored(self) -> int:
        return int(self.e.shape[0])

    @property
    def k_dim(self) -> int:
        return int(self.e.shape[1])


@torch.inference_mode()
def plan_scoring(
    model: TwoSidedDLRM,
    products: SideTensors,
    *,
    dtype: torch.dtype = torch.float32,
    unavailable: torch.Tensor | None = None,
) -> ScoringPlan:
    """Factor the over arch and build E' for the products not in `unavailable` (product rows)."""
    model.eval()
    f = factor_over_arch(model)
    device = f.b1.device
    n_products = products.num_rows
    available = torch.ones(n_products, dtype=torch.bool, device=device)
    if unavailable is not None and unavailable.numel():
        available[unavailable.to(device)] = False
    product_rows = torch.nonzero(available).squeeze(1)
    column_of_row = torch.full((n_products,), -1, dtype=torch.long, device=device)
    column_of_row[product_rows] = torch.arange(product_rows.numel(), device=device)

    if product_rows.numel():
        dense, kjt = products.gather(product_rows)
        v = model.product_vectors(dense, kjt if products.sparse_keys else None).stacked()  # [P', Fp, D]
    else:
        v = torch.zeros((0, model.num_product_vectors, model.shape.embedding_dim), device=device)
    e = torch.cat([v.reshape(v.shape[0], -1), _same_side_dots(v, f.pp_pairs)], dim=1)

    h, d = f.b1.shape[0], model.shape.embedding_dim
    fc, fp = f.w_x.shape[1], f.w_x.shape[2]
    # U'_c = vec(v_c) @ M + u_extra. M[(i, d'), (h, j, d)] = W_x[h, i, j] [d == d']: D times the flops of
    # the einsum it replaces, but one GEMM that writes U' in the layout the first layer reads, where
    # the einsum's permute-copy cost 25% of the scoring time.
    u_map = torch.zeros((fc, d, h, e.shape[1]), device=device)
    eye = torch.eye(d, device=device)
    u_map[..., : fp * d] = (f.w_x.permute(1, 0, 2)[:, None, :, :, None] * eye[None, :, None, None, :]).reshape(
        fc, d, h, fp * d
    )
    u_extra = torch.zeros((h, e.shape[1]), device=device)
    if f.w_pd is not None:
        u_extra[:, :d] = f.w_pd  # the product's dense output is v_p0, E's first D-block
    u_extra[:, fp * d :] = f.w_pp

    rest = [(lin.weight.detach().to(dtype).contiguous(), lin.bias.detach().to(dtype).contiguous()) for lin in f.rest]
    return ScoringPlan(
        model=model,
        factored=f,
        e=e.to(dtype).contiguous(),
        product_rows=product_rows,
        column_of_row=column_of_row,
        u_map=u_map.reshape(fc * d, -1).T.to(dtype).contiguous(),
        u_extra=u_extra.reshape(-1).to(dtype),
        middle=rest[:-1],
        last_w=rest[-1][0][0],
        last_b=float(f.rest[-1].bias),
        dtype=dtype,
        onednn=onednn_available(device),
    )


def customer_factors(plan: ScoringPlan, customers: SideTensors, rows: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """bias [S, H] (a_c + b1) and the customers' vectors flattened [S, Fc*D], in the scoring dtype.

    U' (`u_prime`) is built from the vectors a few customers at a time, just before its tiles use it.
    """
    f, model = plan.factored, plan.model
    dense, kjt = customers.gather(rows)
    v = model.customer_vectors(dense, kjt if customers.sparse_keys else None).stacked()  # [S, Fc, D]
    bias = torch.addmm(f.b1, _same_side_dots(v, f.cc_pairs), f.w_cc.T)
    if f.w_cd is not None:
        bias = bias.addmm_(v[:, 0, :], f.w_cd.T)
    return bias.to(plan.dtype).contiguous(), v.reshape(v.shape[0], -1).to(plan.dtype).contiguous()


def u_prime(plan: ScoringPlan, v_flat: torch.Tensor) -> torch.Tensor:
    """U' [S*H, K'] of customers' flattened vectors [S, Fc*D] (module docstring)."""
    return linear(v_flat, plan.u_map, plan.u_extra, relu=False, onednn=plan.onednn).view(-1, plan.k_dim)


def tile_shape(num_products: int, pairs_per_tile: int) -> tuple[int, int]:
    """(customers, products) per tile: all products for several customers, or a product chunk for one."""
    if num_products == 0:
        return 1, 1
    b = max(1, pairs_per_tile // num_products)
    return b, min(num_products, max(1, pairs_per_tile // b))


def unit_logits(
    plan: ScoringPlan, bias: torch.Tensor, v_flat: torch.Tensor, out: torch.Tensor, pairs_per_tile: int
) -> torch.Tensor:
    """out[s, p] = logit (without the last layer's bias) of customer s against scored product p.

    bias [S, H] and v_flat [S, Fc*D] from `customer_factors`; out [S, P'] float32.
    """
    s_total, h = bias.shape
    n_p = plan.num_scored
    b_tile, p_tile = tile_shape(n_p, pairs_per_tile)
    # U' of a group of customers is built right before its tiles read it, so it is still in L2:
    # built for a whole unit up front it cost 5% of the bf16 time, four times its cost in cache.
    group = b_tile * max(1, U_PRIME_GROUP // b_tile)
    for g0 in range(0, s_total, group):
        g1 = min(s_total, g0 + group)
        u = u_prime(plan, v_flat[g0:g1])
        for s0 in range(g0, g1, b_tile):
            s1 = min(g1, s0 + b_tile)
            nb = s1 - s0
            u_b = u[(s0 - g0) * h : (s1 - g0) * h]
            bias_b = bias[s0:s1].view(-1)
            for p0 in range(0, n_p, p_tile):
                p1 = min(n_p, p0 + p_tile)
                # [Pc, K'] x [K', B*H] -> [Pc, B*H] == [Pc*B, H] row-major: rows ordered (product, customer).
                x = linear(plan.e[p0:p1], u_b, bias_b, relu=True, onednn=plan.onednn)
                x = x.view((p1 - p0) * nb, -1)
                for w, b in plan.middle:
                    x = linear(x, w, b, relu=True, onednn=plan.onednn)
                out[s0:s1, p0:p1] = torch.mv(x, plan.last_w).view(p1 - p0, nb).T
    return out


def top_k_rows(logits: torch.Tensor, k: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(values, indices) of `torch.topk(logits, k, dim=1)`, about 30% faster when k is far below P.

    Split each row into chunks of TOPK_CHUNK columns: an element outside the k chunks with the
    largest maxima has k chunk maxima at least as large as itself, so the top k lie in those k
    chunks and the top k of their k * TOPK_CHUNK elements is the answer (up to the order of ties).
    """
    s, p = logits.shape
    g = TOPK_CHUNK
    c = p // g
    if c < 2 * k:
        return tuple(torch.topk(logits, k, dim=1))
    chunks = logits[:, : c * g].view(s, c, g)
    best = torch.topk(chunks.amax(dim=2), k, dim=1, sorted=False).indices  # [S, k]
    candidates = torch.gather(chunks, 1, best.unsqueeze(2).expand(s, k, g)).view(s, k * g)
    columns = (best.unsqueeze(2) * g + torch.arange(g, device=logits.device)).view(s, k * g)
    if c * g < p:  # the last partial chunk: always a candidate
        candidates = torch.cat([candidates, logits[:, c * g :]], dim=1)
        columns = torch.cat([columns, torch.arange(c * g, p, device=logits.device).expand(s, -1)], dim=1)
    top = torch.topk(candidates, k, dim=1)
    return top.values, torch.gather(columns, 1, top.indices)


def _apply_exclusions(logits: torch.Tensor, ex: Exclusions, start: int, stop: int) -> None:
    lo, hi = int(ex.offsets[start]), int(ex.offsets[stop])
    if hi == lo:
        return
    lengths = ex.offsets[start + 1 : stop + 1] - ex.offsets[start:stop]
    block_rows = torch.repeat_interleave(torch.arange(stop - start, device=logits.device), lengths.to(logits.device))
    logits[block_rows, ex.values[lo:hi].to(logits.device)] = float("-inf")


class _ThreadsPerWorker:
    """Run torch kernels single-threaded in pool workers; restore the caller's setting afterwards."""

    def __init__(self) -> None:
        self.saved = torch.get_num_threads()

    @staticmethod
    def init_worker() -> None:
        torch.set_num_threads(1)  # per OS thread for OpenMP (and the pool threads do nothing else)

    def restore(self) -> None:
        torch.set_num_threads(self.saved)


def _units(n: int, num_products: int, pairs_per_tile: int, pairs_per_unit: int) -> list[tuple[int, int]]:
    b_tile, _ = tile_shape(num_products, pairs_per_tile)
    per_unit = max(b_tile, (max(1, pairs_per_unit // max(1, num_products)) // b_tile) * b_tile)
    return [(s, min(n, s + per_unit)) for s in range(0, n, per_unit)]


def run_units(units: list[tuple[int, int]], work, workers: int) -> None:
    """Call work(start, stop) for every unit: inline (the kernels use torch's own threads) when
    workers <= 1, else on `workers` threads each running single-threaded kernels."""
    if workers <= 1:
        with torch.inference_mode():
            for start, stop in units:
                work(start, stop)
        return
    threads = _ThreadsPerWorker()
    lock, queue = threading.Lock(), list(reversed(units))

    def worker() -> None:
        with torch.inference_mode():  # grad mode is per thread
            while True:
                with lock:
                    if not queue:
                        return
                    start, stop = queue.pop()
                work(start, stop)

    try:
        with ThreadPoolExecutor(workers, initializer=threads.init_worker) as pool:
            for fut in [pool.submit(worker) for _ in range(workers)]:
                fut.result()
    finally:
        threads.restore()


def default_workers(device: torch.device) -> int:
    return torch.get_num_threads() if device.type == "cpu" else 1


@torch.no_grad()
def score_all_pairs(
    model: TwoSidedDLRM,
    customers: SideTensors,
    products: SideTensors,
    *,
    top_n: int = 100,
    exclusions: Exclusions | None = None,
    unavailable: torch.Tensor | None = None,
    dtype: torch.dtype = torch.float32,
    customer_rows: torch.Tensor | None = None,
    pairs_per_tile: int = DEFAULT_PAIRS_PER_TILE,
    pairs_per_unit: int = DEFAULT_PAIRS_PER_UNIT,
    workers: int | None = None,
    plan: ScoringPlan | None = None,
) -> TopN:
    """Top-N products per customer over all available products (exact in fp32; see module docstring).

    `unavailable`: product rows never recommended. `customer_rows` restricts scoring to those rows of
    `customers` (e.g. one rank's range); the result and `exclusions` are indexed by position in it.
    `workers`: threads, each running single-threaded kernels (default: torch.get_num_threads() on CPU,
    1 elsewhere); 1 runs inline with torch's own intra-op threads.
    """
    plan = plan or plan_scoring(model, products, dtype=dtype, unavailable=unavailable)
    device = plan.e.device
    rows_all = customer_rows if customer_rows is not None else torch.arange(customers.num_rows, device=device)
    n = rows_all.numel()
    ex = (exclusions if exclusions is not None else Exclusions.none(n)).remapped(plan.column_of_row.cpu())
    n_p = plan.num_scored
    k = min(top_n, n_p)
    out_rows = torch.empty((n, k), dtype=torch.long)
    out_logits = torch.empty((n, k), dtype=torch.float32)

    def work(start: int, stop: int) -> None:
        bias, v_flat = customer_factors(plan, customers, rows_all[start:stop])
        logits = unit_logits(plan, bias, v_flat, torch.empty((stop - start, n_p), device=device), pairs_per_tile)
        _apply_exclusions(logits, ex, start, stop)
        values, columns = top_k_rows(logits, k)
        out_rows[start:stop] = plan.product_rows[columns].cpu()
        out_logits[start:stop] = values.cpu()

    run_units(_units(n, n_p, pairs_per_tile, pairs_per_unit), work, workers or default_workers(device))
    unfilled = out_logits == float("-inf")
    scores = torch.sigmoid_(out_logits.add_(plan.last_b))
    return TopN(product_rows=out_rows.masked_fill_(unfilled, -1), scores=scores.masked_fill_(unfilled, float("nan")))


@torch.inference_mode()
def pair_logits(
    model: TwoSidedDLRM,
    customers: SideTensors,
    products: SideTensors,
    customer_rows: torch.Tensor,
    *,
    dtype: torch.dtype = torch.float32,
    pairs_per_tile: int = DEFAULT_PAIRS_PER_TILE,
) -> torch.Tensor:
    """Logits [len(customer_rows), P] of every pair through the scorer's path (for checks and benchmarks)."""
    plan = plan_scoring(model, products, dtype=dtype)
    bias, v_flat = customer_factors(plan, customers, customer_rows)
    out = torch.empty((customer_rows.numel(), plan.num_scored), device=plan.e.device)
    return unit_logits(plan, bias, v_flat, out, pairs_per_tile) + plan.last_b


@torch.no_grad()
def forward_pairs(
    model: TwoSidedDLRM, customers: SideTensors, products: SideTensors, c_rows: torch.Tensor, p_rows: torch.Tensor
) -> torch.Tensor:
    """Logits through the model's own forward for aligned (customer row, product row) pairs: the reference."""
    model.eval()
    cd, ck = customers.gather(c_rows)
    pd, pk = products.gather(p_rows)
    return model(cd, ck if customers.sparse_keys else None, pd, pk if products.sparse_keys else None)
