"""A two-sided DLRM built from TorchRec's pieces.

Shapes (B batch, D embedding dim, Fc/Fp sparse features per side):

    customer dense [B, n_c]  -> DenseArch -> [B, D]        (absent when the side has no dense features)
    product dense  [B, n_p]  -> DenseArch -> [B, D]
    customer KJT (Fc keys)   -> EmbeddingBagCollection -> [B, Fc*D]
    product KJT  (Fp keys)   -> EmbeddingBagCollection -> [B, Fp*D]
    V = stack(customer vectors, product vectors)           [B, F, D],  F = Fc' + Fp'
    interactions = triu(V @ V^T, offset=1)                 [B, F*(F-1)/2]
    over input = cat(customer dense out, product dense out, interactions)
    OverArch -> logits [B]

Why two of everything: TorchRec's DLRM has one DenseArch and one EBC; here each side has its own so
that everything depending on one side (pooled embeddings, dense arch output, same-side dot products,
that side's block of the first over-arch layer) can be computed once per customer or once per product.
That is what makes scoring every pair affordable (see `scoring.py`). torchrec's `InteractionArch`
concatenates a single dense vector, so the interaction is written out here (a few lines).
"""

from __future__ import annotations

from dataclasses import asdict, dataclass

import torch
from torch import nn
from torchrec import EmbeddingBagCollection, EmbeddingBagConfig, KeyedJaggedTensor
from torchrec.models.dlrm import DenseArch, OverArch
from torchrec.modules.embedding_configs import PoolingType

from feedpipe.contract import DENSE, MULTI_CATEGORICAL


@dataclass(frozen=True)
class SparseFeature:
    name: str
    num_embeddings: int
    multi_valued: bool = False


@dataclass(frozen=True)
class ModelShape:
    """Everything needed to rebuild the module from a checkpoint."""

    customer_sparse: tuple[SparseFeature, ...]
    product_sparse: tuple[SparseFeature, ...]
    customer_dense_in: int
    product_dense_in: int
    embedding_dim: int = 16
    dense_arch_layers: tuple[int, ...] = (64, 16)
    over_arch_layers: tuple[int, ...] = (128, 64, 1)

    def to_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def from_dict(cls, d: dict) -> "ModelShape":
        d = dict(d)
        d["customer_sparse"] = tuple(SparseFeature(**f) for f in d["customer_sparse"])
        d["product_sparse"] = tuple(SparseFeature(**f) for f in d["product_sparse"])
        d["dense_arch_layers"] = tuple(d["dense_arch_layers"])
        d["over_arch_layers"] = tuple(d["over_arch_layers"])
        return cls(**d)


def _ebc(features: tuple[SparseFeature, ...], dim: int, device: torch.device | None) -> EmbeddingBagCollection | None:
    if not features:
        return None
    tables = [
        EmbeddingBagConfig(
            name="t_" + f.name.replace(".", "__"),  # ModuleDict keys may not contain dots
            embedding_dim=dim,
            num_embeddings=f.num_embeddings,
            feature_names=[f.name],
            # Multi-valued bags are averaged so a product with four tags is not four times as loud.
            pooling=PoolingType.MEAN if f.multi_valued else PoolingType.SUM,
        )
        for f in features
    ]
    return EmbeddingBagCollection(tables=tables, device=device)


class PairDots(torch.autograd.Function):
    """The F(F-1)/2 pairwise dot products of each row's F vectors: v [B, F, D] -> [B, F(F-1)/2].

    Forward is autograd's: one `bmm` for the Gram matrix, then the upper triangle. Backward is
    written out because autograd's is two `bmm`s over transposed views (dL/dV = G V + G^T V, G the
    triangle's gradient scattered into [B, F, F]), which MKL runs on its slow strided path: at the
    default sizes (B 2,048, F 9, D 16, one core) they took 2.5 ms of a 9 ms training step. The Gram
    matrix is symmetric, so dL/dV = (G + G^T) V: one `bmm` over contiguous operands (0.5 ms).
    (G + G^T) itself is one small matrix product with a fixed 0/1 matrix (`scatter` [P, F*F], each
    pair's 1 at (i, j) and at (j, i)): exact for finite gradients, as every output sums one gradient and
    zeros (a non-finite one spreads NaN over its row, and training stops on it), and on the 2-core AVX2
    EPYC faster than two `index_copy_`s along dim 1 (`benchmarks/interaction.py`).
    """

    @staticmethod
    def forward(ctx, v: torch.Tensor, flat: torch.Tensor, scatter: torch.Tensor) -> torch.Tensor:
        b, f, _ = v.shape
        ctx.save_for_backward(v, scatter)
        # In v's dtype even under an outer autocast, so backward's operands agree (and dots keep fp32).
        with torch.autocast(v.device.type, enabled=False):
            return torch.bmm(v, v.transpose(1, 2)).view(b, f * f).index_select(1, flat)

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        v, scatter = ctx.saved_tensors
        b, f, _ = v.shape
        with torch.autocast(v.device.type, enabled=False):
            g = torch.mm(grad.to(v.dtype), scatter.to(v.dtype))  # (G + G^T) [B, F*F]; the diagonal stays zero
            return torch.bmm(g.view(b, f, f), v), None, None


def pair_scatter(f: int, device: torch.device | None = None) -> torch.Tensor:
    """[F(F-1)/2, F*F]: pair p = (i, j), i < j in row-major order, has a 1 at i*F + j and at j*F + i."""
    rows, cols = torch.triu_indices(f, f, offset=1, device=device)
    scatter = torch.zeros((rows.numel(), f * f), device=device)
    pairs = torch.arange(rows.numel(), device=device)
    scatter[pairs, rows * f + cols] = 1.0
    scatter[pairs, cols * f + rows] = 1.0
    return scatter


@dataclass
class SideVectors:
    """One side's per-row vectors: dense arch output [N, D] or None, pooled embeddings [N, F, D]."""

    dense: torch.Tensor | None
    sparse: torch.Tensor

    def stacked(self) -> torch.Tensor:
        """[N, F', D]: the dense output (if any) first, then the pooled embeddings, in key order."""
        if self.dense is None:
            return self.sparse
        return torch.cat([*self.dense_first(), self.sparse], dim=1)

    def dense_first(self) -> list[torch.Tensor]:
        """The dense output as [N, 1, D], the first of the side's vectors, or nothing."""
        return [] if self.dense is None else [self.dense.unsqueeze(1)]


class TwoSidedDLRM(nn.Module):
    def __init__(self, shape: ModelShape, device: torch.device | None = None) -> None:
        super().__init__()
        if shape.dense_arch_layers[-1] != shape.embedding_dim:
            raise ValueError(
                f"dense_arch_layers must end in embedding_dim ({shape.embedding_dim}), got {shape.dense_arch_layers}"
            )
        if shape.over_arch_layers[-1] != 1:
            raise ValueError(f"over_arch_layers must end in 1 (a logit), got {shape.over_arch_layers}")
        self.shape = shape
        d = shape.embedding_dim
        self.customer_ebc = _ebc(shape.customer_sparse, d, device)
        self.product_ebc = _ebc(shape.product_sparse, d, device)
        self.customer_dense_arch = (
            DenseArch(shape.customer_dense_in, list(shape.dense_arch_layers), device) if shape.customer_dense_in else None
        )
        self.product_dense_arch = (
            DenseArch(shape.product_dense_in, list(shape.dense_arch_layers), device) if shape.product_dense_in else None
        )
        self.num_customer_vectors = len(shape.customer_sparse) + (1 if shape.customer_dense_in else 0)
        self.num_product_vectors = len(shape.product_sparse) + (1 if shape.product_dense_in else 0)
        f = self.num_customer_vectors + self.num_product_vectors
        if f < 2:
            raise ValueError("the model needs at least one feature on each side")
        # On the model's device, as forward indexes with them (a meta model's stay on the CPU: DMP moves them).
        on = device if device is not None and torch.device(device).type != "meta" else None
        rows, cols = torch.triu_indices(f, f, offset=1, device=on)
        self.register_buffer("triu_rows", rows, persistent=False)
        self.register_buffer("triu_cols", cols, persistent=False)
        # The same pairs as positions in the flattened [F*F] Gram matrix (see PairDots).
        self.register_buffer("triu_flat", rows * f + cols, persistent=False)
        self.register_buffer("pair_scatter", pair_scatter(f, on), persistent=False)  # PairDots' backward
        self.over_in_features = self.over_arch_input_width(shape)
        self.over_arch = OverArch(self.over_in_features, list(shape.over_arch_layers), device)

    @staticmethod
    def over_arch_input_width(shape: ModelShape) -> int:
        """The dense arches' outputs and the F(F-1)/2 pairwise dot products of the F side vectors."""
        sides = [(len(shape.customer_sparse), shape.customer_dense_in), (len(shape.product_sparse), shape.product_dense_in)]
        f = sum(n_sparse + (1 if n_dense else 0) for n_sparse, n_dense in sides)
        return shape.embedding_dim * sum(1 for _, n_dense in sides if n_dense) + f * (f - 1) // 2

    # -- per side ------------------------------------------------------------------------------
    def customer_vectors(self, dense: torch.Tensor, kjt: KeyedJaggedTensor | None) -> SideVectors:
        return self._side(dense, kjt, self.customer_dense_arch, self.customer_ebc, self.shape.customer_sparse)

    def product_vectors(self, dense: torch.Tensor, kjt: KeyedJaggedTensor | None) -> SideVectors:
        return self._side(dense, kjt, self.product_dense_arch, self.product_ebc, self.shape.product_sparse)

    def _side(self, dense, kjt, arch, ebc, features) -> SideVectors:
        b = dense.shape[0]
        dense_out = arch(dense) if arch is not None else None
        if ebc is not None:
            pooled_kt = ebc(kjt)
            names = [f.name for f in features]
            if pooled_kt.keys() == names:
                pooled = pooled_kt.values().view(b, len(features), self.shape.embedding_dim)
            else:
                # A sharded EBC (DistributedModelParallel) returns its keys grouped by shard, not in
                # config order; read them by name, as torchrec's own SparseArch does.
                by_name = pooled_kt.to_dict()
                pooled = torch.stack([by_name[n] for n in names], dim=1)
        else:
            pooled = dense.new_zeros((b, 0, self.shape.embedding_dim))
        return SideVectors(dense_out, pooled)

    # -- pairs ---------------------------------------------------------------------------------
    def forward(
        self,
        customer_dense: torch.Tensor,
        customer_kjt: KeyedJaggedTensor | None,
        product_dense: torch.Tensor,
        product_kjt: KeyedJaggedTensor | None,
        over_arch_dtype: torch.dtype | None = None,
    ) -> torch.Tensor:
        """Logits [B] for B aligned (customer, product) rows (`over_arch_dtype`: see logits_from_vectors)."""
        c = self.customer_vectors(customer_dense, customer_kjt)
        p = self.product_vectors(product_dense, product_kjt)
        return self.logits_from_vectors(c, p, over_arch_dtype)

    def logits_from_vectors(
        self, c: SideVectors, p: SideVectors, over_arch_dtype: torch.dtype | None = None
    ) -> torch.Tensor:
        """Logits [B]. `over_arch_dtype` (training's bf16): the over arch's matrix products run in it
        under autocast, with fp32 weights and accumulation; the interaction stays fp32."""
        vectors = [x for side in (c, p) for x in (side.dense_first() + [side.sparse])]
        v = torch.cat(vectors, dim=1)  # [B, F, D]: both sides' `stacked`, in one copy
        dots = PairDots.apply(v, self.triu_flat, self.pair_scatter)  # [B, F(F-1)/2]
        parts = [x for x in (c.dense, p.dense) if x is not None] + [dots]
        x = torch.cat(parts, dim=1)
        if over_arch_dtype is None or over_arch_dtype == x.dtype:
            return self.over_arch(x).squeeze(1)
        with torch.autocast(x.device.type, dtype=over_arch_dtype):
            logits = self.over_arch(x)
        return logits.float().squeeze(1)

    def parameter_count(self) -> int:
        return sum(p.numel() for p in self.parameters())


def sparse_features_for(specs, sizes: dict[str, int]) -> tuple[SparseFeature, ...]:
    """One SparseFeature per categorical spec, named by its feature key, sized by its vocabulary."""
    from feedpipe.vocabularies import feature_key

    return tuple(
        SparseFeature(feature_key(s), sizes[feature_key(s)], s.role == MULTI_CATEGORICAL)
        for s in specs
        if s.role != DENSE
    )
