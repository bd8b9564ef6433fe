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

The split is symmetric, and the side with the narrower E' should be the GEMM's rows: the first layer's
work per pair is K. At the defaults customers have 4 vectors and 6 same-side dots (K = 64 + 6 = 70)
against the products' 90, so on a CPU the scorer normally runs the mirror image ("customer rows"; not
for bf16 on AMX, whose K-blocks of 32 make 70 cost what 90 does: `customers_as_rows`):

    x[c, (p, h)] = relu(E'_c . U'_ph + bias_ph)                                       [B, Pc*H]
    E'_c  = [vec(E_c), same-side dots of c]                                 once per customer
    U'_ph = [T_p[h] + W_cd[h] on E_c's first block, W_cc[h]],  T_p[h, i, :] = sum_j W_x[h, i, j] v_pj
    bias  = b_p  (b1 is in it)                                              once per product

Here U' belongs to the products, so it is built once for the whole catalogue (`ProductColumns`,
P' x H x K values) instead of once per customer, and rows come out ordered (customer, product). The
catalogue's U' must fit in memory (PRODUCT_COLUMNS_MAX_BYTES); a larger catalogue, a GPU (where the
product-rows layout was measured) and the fp32 re-ranking below use products as rows.

Work is cut into tiles of about `pairs_per_tile` pairs (B customers x Pc products) so a tile's
intermediates stay in L2/L3, and into units of customers handed to worker threads. Each worker runs
single-threaded kernels on its own units: no barrier per matrix product, so a core taken by another
process on a shared machine slows one worker instead of stalling both. Top-N is taken per unit
(`top_k_rows`), exclusions are scattered into the unit's logits from a CSR list, and unavailable
products are dropped from E' before scoring, so no customers x products matrix ever exists.

bf16 scores 3-4x faster than fp32 where the CPU has AMX, but its 8-bit mantissa swaps near-ties. With
`rerank`, each customer's best `rerank_candidates(N)` bf16 columns (1.5 N) are scored again in fp32 (a
batched product per customer over just those candidates) and the top N taken from those: the fp32 ranking
whenever fp32's top N lies among those candidates.

The CPU kernels, worker threads and allocator settings live in `scoring_runtime.py`.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, replace

import torch
from torch import nn

from feedpipe.feature_tensors import SideTensors
from feedpipe.model import TwoSidedDLRM
from feedpipe.scoring_runtime import (
    HostCopies,
    default_workers,
    flush_denormals,
    has_amx,
    keep_freed_memory_mapped,
    linear,
    onednn_available,
    run_units,
    single_threaded_kernels,
)
from feedpipe.top_n import Exclusions, TopN, apply_exclusions, top_k_rows  # noqa: F401 (re-exported)

# Measured on the 2-core EPYC (benchmarks/README.md, "Scoring"): 4k-16k-pair tiles score alike; 8k
# keeps the first layer's output (4 MiB fp32) in L2+L3 and Python's per-tile cost near 1%.
DEFAULT_PAIRS_PER_TILE = 1 << 13
# bf16 on a CPU with AMX: on the 2-core Xeon, 32k-pair tiles scored 18.6M pairs/s against 15.0M at 8k
# (16k: 16.5M, 64k: 17.0M; products as rows); the first layer's output is 8 MiB. Without AMX (the
# 2-core EPYC's AVX512_BF16) 8k tiles are best: 8.2M against 7.3M at 32k with customers as rows, and
# 8.1-8.4M against 7.2M with products as rows.
AMX_BF16_PAIRS_PER_TILE = 1 << 15
# GPU tiles: on an H100 (2026-11-28, bf16, 10k x 2k) 512k-pair tiles scored 1.46e9 pairs/s against
# 1.28e9 at 256k, 1.35e9 at 1M and 1.34e9 at 2M: smaller tiles cost more launches, larger ones
# slower GEMMs (cuBLAS picks worse kernels for the very wide first layer). benchmarks/README.md, "GPU".
GPU_PAIRS_PER_TILE = 1 << 19
# One worker's unit of customers: 0.05-0.2 s of work, small enough that workers finish together. A unit
# is also a whole number of tiles, so with customers as rows and more than ~1k products it is one tile of
# customers (512 in fp32): 15M pairs, 2-5 s, at the 29k products where that layout stops.
DEFAULT_PAIRS_PER_UNIT = 1 << 20
# On a GPU each unit starts with a few host syncs (its customers' bag sizes) that leave the GPU idle
# while the CPU queues the unit's work: units of 64M pairs (tens of ms of GPU work) make those rare.
GPU_PAIRS_PER_UNIT = 1 << 26
# A unit's customer-side tensors (vectors, biases, gathered bags: ~1 KB a customer) exist at once:
# with a tiny catalogue a unit of pairs would be millions of customers, so units also stop here.
MAX_UNIT_CUSTOMERS = 1 << 16
# Candidates re-scored in fp32 per kept product with `rerank`: fp32's top N must lie among them.
# Measured over 1,000 customers x 2,000 products, the worst fp32 top-100 item sat at bf16 rank 107 (the
# random benchmark model, full of near-ties) or 106 (the trained demo model), top-20 at 23 and 21: 1.5 N
# (and at least N + 8) leaves 3x the worst displacement seen.
RERANK_FACTOR = 1.5
RERANK_MIN_EXTRA = 8


def rerank_candidates(k: int) -> int:
    return max(math.ceil(RERANK_FACTOR * k), k + RERANK_MIN_EXTRA) if k else 0


# Customers as rows needs the catalogue's U' in memory: P' x H x K' values, 72 MB in fp32 for 2k
# products at the defaults and 1.8 GB for 50k. Above this products are the rows (module docstring).
PRODUCT_COLUMNS_MAX_BYTES = 1 << 30
# With customers as rows, a tile is `row_tile_customers` customers (the first GEMM's M) x the rest of
# the tile in products (at least one product, so a catalogue narrower than that gets more customers).
# On the 2-core Xeon with AMX, whole scorer at 10k x 2k with the layout forced (session 5): bf16
# 32k-pair tiles 15.96M pairs/s at M = 256, 20.52M at 512, 22.18M at 1024, 20.07M at 2048; fp32 8k-pair
# tiles 6.22M at 256, 6.41-6.80M at 512, 6.75-6.90M at 1024, 5.98M at 2048. On the EPYC without AMX,
# M = 128-1024 ran alike (bf16 first layer 10.5-11.2M, fp32 4.9-5.6M) and M = 32-64 lost 10-20%.
ROW_TILE_MIN_CUSTOMERS = 256
ROW_TILE_MAX_CUSTOMERS = 1024


def row_tile_customers(pairs_per_tile: int) -> int:
    """Customers per tile with customers as rows: pairs_per_tile / 16 within 256-1024 (512 for the CPU's
    8k-pair tiles, 1024 for 32k-pair bf16 tiles on AMX where that layout is forced)."""
    return min(ROW_TILE_MAX_CUSTOMERS, max(ROW_TILE_MIN_CUSTOMERS, pairs_per_tile // 16))

# Customers whose U' is built at once, right before their tiles: 1.5 MiB of U' in bf16, 3 MiB in
# fp32. 16-128 measured within 1% of each other in fp32; 64 was best in bf16 by ~1%.
U_PRIME_GROUP = 64


@dataclass(frozen=True)
class Precision:
    """How pairs are scored: the matrix products' dtype, and whether bf16's candidates are re-ranked in fp32."""

    dtype: torch.dtype
    rerank: bool = False


PRECISIONS = {
    "fp32": Precision(torch.float32),
    "bf16": Precision(torch.bfloat16),
    "bf16-rerank": Precision(torch.bfloat16, rerank=True),
}


def precision(name: str) -> Precision:
    """The Precision of a config or command-line name (one place for every caller's choices)."""
    try:
        return PRECISIONS[name]
    except KeyError:
        raise ValueError(f"scoring precision must be one of {sorted(PRECISIONS)}, got {name!r}") from None


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
class ProductColumns:
    """U' and the first layer's bias of every scored product, for scoring with customers as rows."""

    u: torch.Tensor  # [P'*H, K'_c] rows ordered (product, h)
    bias: torch.Tensor  # [P'*H] b_p, b1 included

    def cast(self, dtype: torch.dtype) -> "ProductColumns":
        return ProductColumns(self.u.to(dtype), self.bias.to(dtype))  # no copy when already in dtype


@dataclass
class ScoringPlan:
    """What scoring needs from the model and the product table, computed once."""

    model: TwoSidedDLRM
    factored: FactoredOverArch
    e: torch.Tensor  # [P', K'] scoring dtype: E' of every scored product (module docstring)
    product_rows: torch.Tensor  # [P'] int64: product row of each row of e
    column_of_row: torch.Tensor  # [P] int64: column of each product row, -1 where not scored
    w_x_rows: torch.Tensor  # [H*Fp, Fc] dtype: W_x[h, i, j] at row (h, j), column i
    u_fold: torch.Tensor | None  # [H, D] dtype: W_pd, added to U's first product block (None: no product dense arch)
    w_pp: torch.Tensor  # [H, n_pp + pad] dtype: U's last columns, the same for every customer
    # Where n_pp + pad is a whole number m of D-blocks, U' is one batched product with its constant
    # part as the addend (`u_prime`): W_x's rows with m zero blocks per h, and W_pd + W_pp laid out alike.
    u_rows: torch.Tensor | None  # [H*(Fp+m), Fc] dtype
    u_const: torch.Tensor | None  # [H*(Fp+m), D] dtype
    middle: list[tuple[torch.Tensor, torch.Tensor]]  # over-arch layers 2..L-1 (ReLU after each), dtype
    last_w: torch.Tensor  # [H_{L-1}, 1] dtype: the last layer (torchrec's OverArch has at least two)
    last_b: float  # added to the kept logits only
    dtype: torch.dtype
    onednn: bool
    columns: ProductColumns | None = None  # set: customers are the first GEMM's rows (module docstring)

    @property
    def num_scored(self) -> int:
        return int(self.e.shape[0])

    @property
    def k_dim(self) -> int:
        return int(self.e.shape[1])

    def cast(self, dtype: torch.dtype) -> "ScoringPlan":
        """The plan with its matrices in `dtype`: what planning in `dtype` gives (the product columns,
        when there, are built in their final dtype by `plan_scoring`)."""
        if dtype == self.dtype:
            return self

        def c(t: torch.Tensor) -> torch.Tensor:
            return t.to(dtype).contiguous()

        return replace(
            self, e=c(self.e), w_x_rows=c(self.w_x_rows), u_fold=None if self.u_fold is None else c(self.u_fold),
            w_pp=c(self.w_pp), u_rows=None if self.u_rows is None else c(self.u_rows),
            u_const=None if self.u_const is None else c(self.u_const), middle=[(c(w), c(b)) for w, b in self.middle],
            last_w=c(self.last_w), dtype=dtype,
            onednn=onednn_available(self.e.device, dtype),
            columns=None if self.columns is None else self.columns.cast(dtype),
        )

    @property
    def customer_rows(self) -> bool:
        return self.columns is not None


def k_alignment(device: torch.device, dtype: torch.dtype = torch.float32) -> int:
    """Columns K' is padded to a multiple of: cuBLAS's tensor-core kernels want rows in 16-byte
    multiples (8 bf16 values) and take slower paths otherwise. AMX multiplies bf16 in K-blocks of 32,
    so columns up to the next 32 are free there (the first layer per 32k-pair tile on the 2-core Xeon:
    945 us at K 90, 941 at 96), and a K' of 96 lets `u_prime` build U' as one fused product. Elsewhere
    on a CPU every column costs its flops."""
    if device.type != "cpu":
        return 8
    return 32 if dtype != torch.float32 and has_amx() else 1


def customer_row_width(model: TwoSidedDLRM, device: torch.device) -> int:
    """K' with customers as rows: their flattened vectors and same-side dots, padded to the device's alignment."""
    fc = model.num_customer_vectors
    k = fc * model.shape.embedding_dim + fc * (fc - 1) // 2
    return k + -k % k_alignment(device)


def customers_as_rows(model: TwoSidedDLRM, num_scored: int, device: torch.device,
                      dtype: torch.dtype = torch.float32) -> bool:
    """The layout `plan_scoring` picks by default: customers as rows on a CPU whenever the catalogue's
    U' fits PRODUCT_COLUMNS_MAX_BYTES in fp32 (module docstring), except for bf16 on AMX.

    AMX multiplies in K-blocks of 32 bf16 values, so K' = 70 costs what 90 does and the mirror layout
    saves nothing per pair; its 1024-customer tiles then lose to the products-as-rows tiles' M of the
    whole catalogue. Side by side on the 2-core Xeon (session 5, bf16, pairs/s customer rows /
    product rows): 10k x 2k 1.02 (0.99-1.07), 10k x 4k 0.98, 2k x 10k 0.75, 20k x 10k 0.72.
    In fp32 the narrower K wins there too: 10k x 2k 1.15, 2k x 10k 1.08.
    """
    if device.type != "cpu" or (dtype != torch.float32 and has_amx()):
        return False
    hidden = model.shape.over_arch_layers[0]
    return num_scored * hidden * customer_row_width(model, device) * 4 <= PRODUCT_COLUMNS_MAX_BYTES


# Products whose T (below) is computed at once: 2 MiB of fp32, still in cache when copied into U'.
COLUMNS_CHUNK = 64


def _product_columns(f: FactoredOverArch, v: torch.Tensor, pp_dots: torch.Tensor, k: int,
                     dtype: torch.dtype) -> ProductColumns:
    """U' [P'*H, k] and bias [P'*H] in `dtype` of products with fp32 vectors v [P', Fp, D] (module docstring).

    Written straight into `dtype` a chunk of products at a time: for 2k products on one core of the EPYC,
    an fp32 U' cast afterwards took 63 ms, mostly first touches of its 72 MB; this takes 26 ms in bf16.
    """
    n, fp, d = v.shape
    h, fc = f.w_x.shape[0], f.w_x.shape[1]
    n_cc = f.w_cc.shape[1]
    w_x = f.w_x.reshape(h * fc, fp)
    u = torch.empty((n, h, k), dtype=dtype, device=v.device)
    for p0 in range(0, n, COLUMNS_CHUNK):
        # T[p, (h, i), :] = sum_j W_x[h, i, j] v[p, j, :]: a batched product laid out (h, i, d)
        t = torch.matmul(w_x, v[p0 : p0 + COLUMNS_CHUNK]).view(-1, h, fc * d)
        if f.w_cd is not None:  # the customer's dense output is E_c's first block
            t[:, :, :d] += f.w_cd
        u[p0 : p0 + COLUMNS_CHUNK, :, : fc * d] = t
    u[:, :, fc * d : fc * d + n_cc] = f.w_cc
    u[:, :, fc * d + n_cc :] = 0
    bias = torch.addmm(f.b1, pp_dots, f.w_pp.T)
    if f.w_pd is not None:  # the product's dense output is its first vector
        bias = bias.addmm_(v[:, 0, :], f.w_pd.T)
    return ProductColumns(u.view(n * h, k), bias.view(-1).to(dtype))


@torch.inference_mode()
def plan_scoring(
    model: TwoSidedDLRM,
    products: SideTensors,
    *,
    dtype: torch.dtype = torch.float32,
    unavailable: torch.Tensor | None = None,
    customer_rows: bool | None = None,
) -> ScoringPlan:
    """Factor the over arch and build E' for the products not in `unavailable` (product rows), and with
    `customer_rows` (default: `customers_as_rows`) the products' U' for the mirror layout too."""
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
    pp_dots = _same_side_dots(v, f.pp_pairs)
    e = torch.cat([v.flatten(1), pp_dots], dim=1)  # flatten: P' may be 0
    if customer_rows is None:
        customer_rows = customers_as_rows(model, product_rows.numel(), device, dtype)
    w_pp = f.w_pp
    pad = -e.shape[1] % k_alignment(device, dtype)
    if pad:  # zero columns in E' and in U' (through W_pp, U's last block): the same products, aligned rows
        e, w_pp = nn.functional.pad(e, (0, pad)), nn.functional.pad(w_pp, (0, pad))

    h = f.b1.shape[0]
    fc, fp = f.w_x.shape[1], f.w_x.shape[2]
    # The product's dense output is v_p0, E's first D-block, so W_pd adds to U's first block only.
    u_fold = f.w_pd.contiguous() if f.w_pd is not None else None
    w_x_rows = f.w_x.permute(0, 2, 1).reshape(h * fp, fc).contiguous()
    u_rows = u_const = None
    d = model.shape.embedding_dim
    if w_pp.shape[1] % d == 0:
        m = w_pp.shape[1] // d
        u_rows = torch.zeros((h, fp + m, fc), dtype=w_x_rows.dtype, device=device)
        u_rows[:, :fp] = w_x_rows.view(h, fp, fc)
        u_const = torch.zeros((h, fp + m, d), dtype=w_x_rows.dtype, device=device)
        if u_fold is not None:
            u_const[:, 0] = u_fold
        u_const[:, fp:] = w_pp.reshape(h, m, d)
        u_rows, u_const = u_rows.view(-1, fc), u_const.view(-1, d)

    rest = [(lin.weight.detach().contiguous(), lin.bias.detach().contiguous()) for lin in f.rest]
    return ScoringPlan(
        model=model,
        factored=f,
        e=e.contiguous(),
        product_rows=product_rows,
        column_of_row=column_of_row,
        w_x_rows=w_x_rows,
        u_fold=u_fold,
        w_pp=w_pp.contiguous(),
        u_rows=u_rows,
        u_const=u_const,
        middle=rest[:-1],
        # a [*, 1] matrix: torch.mm runs bf16 at 35 us per 8k rows where torch.mv takes 51
        last_w=rest[-1][0].T.contiguous(),
        last_b=float(f.rest[-1].bias),
        dtype=torch.float32,
        onednn=onednn_available(device),
        columns=_product_columns(f, v, pp_dots, customer_row_width(model, device), dtype) if customer_rows else None,
    ).cast(dtype)


def customer_vectors(plan: ScoringPlan, customers: SideTensors, rows: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """The customers' vectors [S, Fc, D] and same-side dots [S, n_cc], in fp32: what either layout starts from."""
    dense, kjt = customers.gather(rows)
    v = plan.model.customer_vectors(dense, kjt if customers.sparse_keys else None).stacked()
    return v, _same_side_dots(v, plan.factored.cc_pairs)


def customer_factors(plan: ScoringPlan, v: torch.Tensor, cc_dots: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """For products as rows: bias [S, H] (a_c + b1) and the vectors flattened [S, Fc*D], in the plan's dtype.

    U' (`u_prime`) is built from the vectors a few customers at a time, just before its tiles use it.
    """
    f = plan.factored
    bias = torch.addmm(f.b1, cc_dots, f.w_cc.T)
    if f.w_cd is not None:
        bias = bias.addmm_(v[:, 0, :], f.w_cd.T)
    return bias.to(plan.dtype).contiguous(), v.reshape(v.shape[0], -1).to(plan.dtype).contiguous()


def customer_rows_of(plan: ScoringPlan, v: torch.Tensor, cc_dots: torch.Tensor) -> torch.Tensor:
    """For customers as rows: E'_c [S, K'_c] in the plan's dtype, zero-padded like the products' U'."""
    k = plan.columns.u.shape[1]
    e = torch.cat([v.flatten(1), cc_dots], dim=1)
    return nn.functional.pad(e, (0, k - e.shape[1])).to(plan.dtype).contiguous()


def u_prime(plan: ScoringPlan, v_flat: torch.Tensor) -> torch.Tensor:
    """U' [S*H, K'] of customers' flattened vectors [S, Fc*D] (module docstring).

    U[s, h, j, :] = sum_i W_x[h, i, j] v[s, i, :] is one batched product [H*Fp, Fc] x [Fc, D] per
    customer whose output is already laid out (h, j, d). (As one GEMM by a [Fc*D, H*Fp*D] map it
    did D times the flops and cost twice as much.) With `plan.u_const` the W_pd and W_pp terms are that
    product's addend, so U' comes out of one `baddbmm` whole: on the 2-core Xeon with AMX, 248 us for 64
    customers in bf16 against 614 us for the product, the add and the concatenation below.
    """
    s, fc = v_flat.shape[0], plan.w_x_rows.shape[1]
    h = plan.w_pp.shape[0]
    if plan.u_const is not None:
        n = plan.u_rows.shape[0]
        return torch.baddbmm(plan.u_const.expand(s, n, -1), plan.u_rows.expand(s, n, fc),
                             v_flat.view(s, fc, -1)).view(s * h, -1)
    u = torch.matmul(plan.w_x_rows, v_flat.view(s, fc, -1)).view(s, h, -1)  # [S, H, Fp*D]
    if plan.u_fold is not None:
        d = plan.u_fold.shape[1]
        u[:, :, :d] += plan.u_fold  # a fifth of the work of adding a zero-padded [H, Fp*D]
    if plan.w_pp.shape[1]:
        u = torch.cat([u, plan.w_pp.expand(s, -1, -1)], dim=2)
    return u.view(s * h, -1)


def default_pairs_per_tile(device: torch.device, dtype: torch.dtype = torch.float32) -> int:
    if device.type != "cpu":
        return GPU_PAIRS_PER_TILE
    return AMX_BF16_PAIRS_PER_TILE if dtype != torch.float32 and has_amx() else DEFAULT_PAIRS_PER_TILE


def default_pairs_per_unit(device: torch.device) -> int:
    return DEFAULT_PAIRS_PER_UNIT if device.type == "cpu" else GPU_PAIRS_PER_UNIT


def tile_shape(num_products: int, pairs_per_tile: int, customer_rows: bool = False) -> tuple[int, int]:
    """(customers, products) per tile. Products as rows: all products for several customers, or a
    product chunk for one. Customers as rows: `row_tile_customers` customers x a product chunk."""
    if num_products == 0:
        return 1, 1
    if customer_rows:
        p = max(1, min(num_products, pairs_per_tile // row_tile_customers(pairs_per_tile)))
        return max(1, pairs_per_tile // p), p
    b = max(1, pairs_per_tile // num_products)
    return b, min(num_products, max(1, pairs_per_tile // b))


def unit_logits(plan: ScoringPlan, v: torch.Tensor, cc_dots: torch.Tensor, pairs_per_tile: int) -> torch.Tensor:
    """Logits [S, P'] in the scoring dtype, without the last layer's bias, of customers (`customer_vectors`)
    against scored products, in the plan's layout."""
    if plan.customer_rows:
        return customer_row_logits(plan, customer_rows_of(plan, v, cc_dots), pairs_per_tile)
    return product_row_logits(plan, *customer_factors(plan, v, cc_dots), pairs_per_tile)


def customer_row_logits(plan: ScoringPlan, e_c: torch.Tensor, pairs_per_tile: int) -> torch.Tensor:
    """`unit_logits` with customers as rows: e_c [S, K'_c] from `customer_rows_of`."""
    s_total, n_p = e_c.shape[0], plan.num_scored
    h = plan.w_pp.shape[0]
    b_tile, p_tile = tile_shape(n_p, pairs_per_tile, customer_rows=True)
    out = torch.empty((s_total, n_p), dtype=plan.dtype, device=e_c.device)
    chunks = list(zip(range(0, n_p, p_tile), plan.columns.u.split(p_tile * h), plan.columns.bias.split(p_tile * h)))
    for s0 in range(0, s_total, b_tile):
        e_b = e_c[s0 : s0 + b_tile]
        for p0, u_c, bias_c in chunks:
            # [B, K'] x [K', Pc*H] -> [B, Pc*H] == [B*Pc, H] row-major: rows ordered (customer, product).
            x = linear(e_b, u_c, bias_c, relu=True, onednn=plan.onednn)
            for w, b in plan.middle:
                x = linear(x.view(-1, w.shape[1]), w, b, relu=True, onednn=plan.onednn)
            y = torch.mm(x.view(-1, plan.last_w.shape[0]), plan.last_w)
            out[s0 : s0 + e_b.shape[0], p0 : p0 + u_c.shape[0] // h] = y.view(e_b.shape[0], -1)
    return out


def product_row_logits(plan: ScoringPlan, bias: torch.Tensor, v_flat: torch.Tensor, pairs_per_tile: int) -> torch.Tensor:
    """`unit_logits` with products as rows: bias [S, H] and v_flat [S, Fc*D] from `customer_factors`.

    The loop body is four calls per tile:
    Python's cost per call is a few microseconds, and a tile is ~0.5 ms of work.
    """
    s_total, h = bias.shape
    n_p = plan.num_scored
    b_tile, p_tile = tile_shape(n_p, pairs_per_tile)
    e_chunks = plan.e.split(p_tile)
    out = torch.empty((s_total, n_p), dtype=plan.dtype, device=bias.device)
    if b_tile > 1:  # one product chunk: tile t's logits land in tiles[t] ordered (product, customer)
        tiles = torch.empty((math.ceil(s_total / b_tile), n_p * b_tile), dtype=plan.dtype, device=bias.device)
    # U' of a group of customers is built right before its tiles read it, so it is still in cache:
    # built for a whole unit up front it cost 5% of the bf16 time, twice its cost this way.
    group = b_tile * max(1, U_PRIME_GROUP // b_tile)
    for g0 in range(0, s_total, group):
        g1 = min(s_total, g0 + group)
        u_tiles = u_prime(plan, v_flat[g0:g1]).split(b_tile * h)
        bias_tiles = bias[g0:g1].view(-1).split(b_tile * h)
        for i, (u_b, bias_b) in enumerate(zip(u_tiles, bias_tiles)):
            s0 = g0 + i * b_tile
            if b_tile > 1:
                targets = (tiles[s0 // b_tile, : n_p * (u_b.shape[0] // h)],)
            else:
                targets = out[s0].split(p_tile)
            for e_c, target in zip(e_chunks, targets):
                # [Pc, K'] x [K', B*H] -> [Pc, B*H] == [Pc*B, H] row-major: rows ordered (product, customer).
                x = linear(e_c, u_b, bias_b, relu=True, onednn=plan.onednn)
                for w, b in plan.middle:
                    x = linear(x.view(-1, w.shape[1]), w, b, relu=True, onednn=plan.onednn)
                torch.mm(x.view(-1, plan.last_w.shape[0]), plan.last_w, out=target.view(-1, 1))
    if b_tile > 1:
        full = s_total // b_tile * b_tile
        out[:full].view(-1, b_tile, n_p).copy_(tiles[: full // b_tile].view(-1, n_p, b_tile).transpose(1, 2))
        if full < s_total:
            out[full:] = tiles[-1, : n_p * (s_total - full)].view(n_p, -1).T
    return out


def candidate_logits(plan: ScoringPlan, bias: torch.Tensor, v_flat: torch.Tensor, columns: torch.Tensor) -> torch.Tensor:
    """Logits [S, C] (without the last bias) of each customer against its own candidate columns [S, C].

    The same chain as `unit_logits`, per customer over C products instead of over every product:
    x = relu(E'[columns] . U'^T + bias) as one batched product, then the remaining layers.
    """
    s, c = columns.shape
    h = bias.shape[1]
    out = torch.empty((s, c), dtype=plan.dtype, device=bias.device)
    for g0 in range(0, s, U_PRIME_GROUP):
        g1 = min(s, g0 + U_PRIME_GROUP)
        u = u_prime(plan, v_flat[g0:g1]).view(g1 - g0, h, -1)  # [G, H, K']
        x = torch.baddbmm(bias[g0:g1].unsqueeze(1), plan.e[columns[g0:g1]], u.transpose(1, 2)).relu_()
        x = x.view(-1, h)
        for w, b in plan.middle:
            x = torch.addmm(b, x, w.T).relu_()
        torch.mm(x, plan.last_w, out=out[g0:g1].view(-1, 1))
    return out


def _rerank(exact: ScoringPlan, logits: torch.Tensor, bias: torch.Tensor, v_flat: torch.Tensor,
            k: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Top k (values, columns) of fp32 logits over the best `rerank_candidates(k)` columns of low-precision `logits`."""
    _, candidates = top_k_rows(logits, min(logits.shape[1], rerank_candidates(k)))
    fp32 = candidate_logits(exact, bias, v_flat, candidates)
    fp32.masked_fill_(torch.gather(logits, 1, candidates) == float("-inf"), float("-inf"))  # excluded stay out
    values, best = torch.topk(fp32, k, dim=1)
    return values, torch.gather(candidates, 1, best)


def customer_units(n: int, num_products: int, pairs_per_tile: int, pairs_per_unit: int,
                   customer_rows: bool = False) -> list[tuple[int, int]]:
    """[start, stop) ranges of customers, each ~pairs_per_unit pairs (at most MAX_UNIT_CUSTOMERS
    customers) and a whole number of tiles of the layout."""
    b_tile, _ = tile_shape(num_products, pairs_per_tile, customer_rows)
    customers = min(MAX_UNIT_CUSTOMERS, max(1, pairs_per_unit // max(1, num_products)))
    per_unit = max(b_tile, customers // b_tile * b_tile)
    return [(s, min(n, s + per_unit)) for s in range(0, n, per_unit)]


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
    pairs_per_tile: int | None = None,
    pairs_per_unit: int | None = None,
    workers: int | None = None,
    plan: ScoringPlan | None = None,
    rerank: bool = False,
    layout_customer_rows: bool | None = None,
) -> TopN:
    """Top-N products per customer over all available products (exact in fp32; see module docstring).

    `unavailable`: product rows never recommended. `customer_rows` restricts scoring to those rows of
    `customers` (e.g. one rank's range); the result and `exclusions` are indexed by position in it.
    `workers`: threads, each running single-threaded kernels (default: torch.get_num_threads() on CPU,
    1 elsewhere); 1 runs inline with torch's own intra-op threads. `rerank`: with a low-precision dtype,
    re-score each customer's best `rerank_candidates(top_n)` columns in fp32 and keep the top_n of those.
    `layout_customer_rows`: `plan_scoring`'s `customer_rows` when no `plan` is given (default: its choice).
    """
    device = plan.e.device if plan is not None else next(model.parameters()).device
    workers = workers or default_workers(device)
    pairs_per_tile = pairs_per_tile or default_pairs_per_tile(device, dtype)
    pairs_per_unit = pairs_per_unit or default_pairs_per_unit(device)
    if device.type == "cpu":
        keep_freed_memory_mapped()
    with single_threaded_kernels(workers > 1), flush_denormals():
        return _score_all_pairs(
            model, customers, products, top_n, exclusions, unavailable, dtype, customer_rows, pairs_per_tile,
            pairs_per_unit, workers, plan, rerank, layout_customer_rows,
        )


def _score_all_pairs(
    model, customers, products, top_n, exclusions, unavailable, dtype, customer_rows, pairs_per_tile,
    pairs_per_unit, workers, plan, rerank, layout_customer_rows,
) -> TopN:
    plan = plan or plan_scoring(model, products, dtype=dtype, unavailable=unavailable, customer_rows=layout_customer_rows)
    exact = None
    if rerank and plan.dtype != torch.float32:  # re-ranking scores candidates with products as rows
        exact = plan_scoring(model, products, unavailable=unavailable, customer_rows=False)
    device = plan.e.device
    rows_all = customer_rows if customer_rows is not None else torch.arange(customers.num_rows, device=device)
    n = rows_all.numel()
    ex = (exclusions if exclusions is not None else Exclusions.none(n)).remapped(plan.column_of_row.cpu())
    n_p = plan.num_scored
    k = min(top_n, n_p)
    out_rows = torch.empty((n, k), dtype=torch.long)
    out_scores = torch.empty((n, k), dtype=torch.float32)
    # On a GPU the exclusion lists go over once, and each unit's top-N comes back without the CPU
    # waiting for it (HostCopies), so the GPU is not idle while the CPU queues the next unit.
    ex_device = ex.to(device) if device.type != "cpu" else None
    copies = HostCopies([out_rows, out_scores]) if device.type == "cuda" else None

    def work(start: int, stop: int) -> None:
        v, cc_dots = customer_vectors(plan, customers, rows_all[start:stop])
        logits = unit_logits(plan, v, cc_dots, pairs_per_tile)
        apply_exclusions(logits, ex, start, stop, ex_device)
        if exact is not None:
            values, columns = _rerank(exact, logits, *customer_factors(exact, v, cc_dots), k)
        else:
            values, columns = top_k_rows(logits, k)
        unfilled = values == float("-inf")
        rows = plan.product_rows[columns].masked_fill_(unfilled, -1)
        scores = torch.sigmoid_(values.float().add_(plan.last_b)).masked_fill_(unfilled, float("nan"))
        if copies is not None:
            copies.put(start, stop, rows, scores)
        else:
            out_rows[start:stop], out_scores[start:stop] = rows.cpu(), scores.cpu()

    run_units(customer_units(n, n_p, pairs_per_tile, pairs_per_unit, plan.customer_rows), work, workers)
    if copies is not None:
        copies.finish()
    return TopN(product_rows=out_rows, scores=out_scores)


@torch.inference_mode()
def pair_logits(
    model: TwoSidedDLRM,
    customers: SideTensors,
    products: SideTensors,
    customer_rows: torch.Tensor,
    *,
    dtype: torch.dtype = torch.float32,
    pairs_per_tile: int | None = None,
    layout_customer_rows: bool | None = None,
) -> torch.Tensor:
    """Logits [len(customer_rows), P] of every pair through the scorer's path (for checks and benchmarks).

    `layout_customer_rows`: the layout (`plan_scoring`'s `customer_rows`; default: the scorer's choice).
    One thread on CPU: a check should not wait on OpenMP barriers while other jobs hold a core.
    """
    device = next(model.parameters()).device
    with single_threaded_kernels(device.type == "cpu"), flush_denormals():
        plan = plan_scoring(model, products, dtype=dtype, customer_rows=layout_customer_rows)
        tile = pairs_per_tile or default_pairs_per_tile(plan.e.device, dtype)
        return unit_logits(plan, *customer_vectors(plan, customers, customer_rows), tile).float() + plan.last_b


@torch.no_grad()
def forward_pairs(
    model: TwoSidedDLRM, customers: SideTensors, products: SideTensors, c_rows: torch.Tensor, p_rows: torch.Tensor
) -> torch.Tensor:
    """Logits through the model's own forward for aligned (customer row, product row) pairs: the reference."""
    model.eval()
    cd, ck = customers.gather(c_rows)
    pd, pk = products.gather(p_rows)
    return model(cd, ck if customers.sparse_keys else None, pd, pk if products.sparse_keys else None)
