"""`train_dlrm` under torchrun: embedding tables sharded by TorchRec, dense arches data-parallel.

The model is built on the meta device (no rank ever allocates every table) and wrapped in
`DistributedModelParallel`; the `EmbeddingShardingPlanner` places each table on a rank (table-wise,
or split by rows when a table outgrows one rank) and DMP wraps the rest in DDP. As in one process,
the embedding tables learn with RowWiseAdagrad and the dense arches with Adam; here the tables'
optimizer runs fused into the backward of TorchRec's kernel (`_apply_optimizer_in_backward`) and
the dense one through `KeyedOptimizerWrapper`.

Data: each rank reads every world_size-th row of the examples (its share; no rank holds them all)
and takes `batch_size / world_size` rows per step, so a step covers `batch_size` examples as in one
process. Every rank runs the same number of steps (each forward is a collective); the few rows a
larger share has beyond the smallest share sit out that epoch, different ones each epoch.

Validation loss and AUC are computed on every rank from all ranks' logits (gathered), so every
rank takes the same early-stopping decision. The best epoch's weights are gathered to rank 0,
which returns a plain `TwoSidedDLRM`: the checkpoint is the one-process `TrainedModel` format.
"""

from __future__ import annotations

import logging
import math
import os
from pathlib import Path

import polars as pl
import torch
import torch.distributed as dist
from torch.distributed._shard.sharded_tensor import ShardedTensor
from torch.distributed.optim import _apply_optimizer_in_backward
from torchrec.distributed.embeddingbag import EmbeddingBagCollectionSharder
from torchrec.distributed.model_parallel import DistributedModelParallel
from torchrec.distributed.planner import EmbeddingShardingPlanner, ParameterConstraints
from torchrec.distributed.planner.storage_reservations import FixedPercentageStorageReservation
from torchrec.distributed.planner.types import KernelConfig, TopologyFactory, TrainerConfig
from torchrec.optim.keyed import KeyedOptimizerWrapper
from torchrec.optim.optimizers import in_backward_optimizer_filter
from torchrec.optim.rowwise_adagrad import RowWiseAdagrad

from feedpipe.model import ModelShape, TwoSidedDLRM
from feedpipe.process_group import RankGroup
from feedpipe.sources import FeatureSpec
from feedpipe.training import (
    ExampleTensors, TrainConfig, forward_examples, loss_and_auc, over_arch_dtype, split_examples,
)
from feedpipe.training_examples import SPLIT, TRAIN, VALIDATION

_LOG = logging.getLogger(__name__)
# Measured (session 8, fbgemm-gpu-cpu 1.8.0): the fused CPU kernel left every table bit-identical with decay 0 and
# 0.5, weight_decay_mode L2 set or not. Said at build, so a CPU torchrun run knows it trains without the decay.
TABLE_DECAY_ON_CPU = ("embedding_weight_decay {} is passed to TorchRec's fused row-wise Adagrad, whose CPU kernel in "
                      "this FBGEMM build applies no weight decay to the tables (measured): sharded CPU training runs "
                      "without it, where one process applies it")

# Model parallelism for every table by default, as the DLRM paper does at scale. "data_parallel"
# (a replica per rank) is what the planner picks for tiny tables when allowed; it is correct too
# but then those tables learn with the dense optimizer.
DEFAULT_SHARDING_TYPES = ("table_wise", "row_wise")
EVAL_BATCH = 16384


def read_rank_share(path: str | Path, group: RankGroup) -> pl.DataFrame:
    """Every world_size-th row of a Parquet file, starting at this rank's index."""
    return pl.scan_parquet(path).gather_every(group.world_size, offset=group.rank).collect()


def rank_example_tensors(
    path: str | Path, group: RankGroup, customer_specs: list[FeatureSpec], product_specs: list[FeatureSpec]
) -> tuple[ExampleTensors, ExampleTensors]:
    """This rank's share of the training and validation examples, as tensors."""
    share = read_rank_share(path, group)
    counts = share.group_by(SPLIT).len()
    for split in (TRAIN, VALIDATION):
        if counts.filter(pl.col(SPLIT) == split).is_empty():
            raise ValueError(
                f"{path}: rank {group.rank} of {group.world_size} has no '{split}' rows in column '{SPLIT}'; "
                "the examples are too few for this many ranks"
            )
    return split_examples(share, customer_specs, product_specs)


class ShardedTraining:
    """The `train_dlrm` placement for one torchrun rank (see module docstring)."""

    def __init__(self, group: RankGroup, sharding_types: tuple[str, ...] = DEFAULT_SHARDING_TYPES):
        if not group.is_distributed:
            raise ValueError("ShardedTraining needs a process group of 2 or more ranks; use InProcess for one")
        self.group = group
        self.sharding_types = tuple(sharding_types)
        self.shape: ModelShape | None = None
        self.plan = None
        self.over_arch_dtype: torch.dtype | None = None
        self._snapshots = 0

    @property
    def rank(self) -> int:
        return self.group.rank

    @property
    def world_size(self) -> int:
        return self.group.world_size

    # -- model and optimizers --------------------------------------------------------------------
    def build(self, shape: ModelShape, config: TrainConfig, device: torch.device):
        self.shape = shape
        self.over_arch_dtype = over_arch_dtype(config, device)
        model = TwoSidedDLRM(shape, device=torch.device("meta"))
        # The interaction indices are plain CPU buffers; DDP broadcasts buffers, so they must live
        # on the device NCCL talks to.
        model.triu_rows, model.triu_cols = model.triu_rows.to(device), model.triu_cols.to(device)
        model.triu_flat, model.pair_scatter = model.triu_flat.to(device), model.pair_scatter.to(device)
        tables = [ebc for ebc in (model.customer_ebc, model.product_ebc) if ebc is not None]
        table_optimizer, table_kwargs = self._table_optimizer(config, device)
        for ebc in tables:
            _apply_optimizer_in_backward(table_optimizer, ebc.parameters(), table_kwargs)
        sharders = [EmbeddingBagCollectionSharder()]
        constraints = {
            t.name: ParameterConstraints(sharding_types=list(self.sharding_types))
            for ebc in tables
            for t in ebc.embedding_bag_configs()
        }
        topology = TopologyFactory.create_topology(
            trainer_config=TrainerConfig(
                world_size=self.world_size, local_world_size=int(os.environ.get("LOCAL_WORLD_SIZE", self.world_size))
            ),
            kernel_config=KernelConfig(compute_device=device.type),
        )
        planner = EmbeddingShardingPlanner(
            topology=topology,
            batch_size=math.ceil(config.batch_size / self.world_size),
            constraints=constraints,
            # Keep 15% of each rank's memory for everything but the tables (the planner's own
            # heuristic guesses the dense part from a dry run and warns that it over-estimates).
            storage_reservation=FixedPercentageStorageReservation(0.15),
        )
        self.plan = planner.collective_plan(model, sharders, dist.GroupMember.WORLD)
        dmp = DistributedModelParallel(model, device=device, plan=self.plan, sharders=sharders)
        dense = dict(in_backward_optimizer_filter(dmp.named_parameters()))
        if config.optimizer == "adam":
            make = lambda params: torch.optim.Adam(params, lr=config.learning_rate, weight_decay=config.dense_weight_decay)  # noqa: E731
        else:
            make = lambda params: torch.optim.SGD(params, lr=config.learning_rate)  # noqa: E731
        # The tables' optimizer steps inside backward; dmp.fused_optimizer.step() would be a no-op.
        return dmp, [KeyedOptimizerWrapper(dense, make)]

    def _table_optimizer(self, config: TrainConfig, device: torch.device | None = None):
        if config.optimizer == "adam":
            # eps: RowWiseAdagrad's own default, where the fused kernel's would be 1e-8.
            kwargs = {"lr": config.embedding_learning_rate, "weight_decay": config.embedding_weight_decay, "eps": 1e-10}
            if config.embedding_weight_decay:
                # The fused kernel's weight_decay_mode defaults to none: without it the decay is dropped silently.
                from fbgemm_gpu.tbe.config.optimizer_config import WeightDecayMode

                kwargs["weight_decay_mode"] = WeightDecayMode.L2
                if device is not None and device.type == "cpu":
                    _LOG.warning(TABLE_DECAY_ON_CPU.format(config.embedding_weight_decay))
            return RowWiseAdagrad, kwargs
        if config.optimizer == "sgd":
            # No rescaling: a table's gradient comes out as the gradient of the mean over all ranks'
            # rows, as DDP's averaged dense gradients do (pinned by test_distributed_training).
            return torch.optim.SGD, {"lr": config.learning_rate}
        raise ValueError(f"optimizer must be 'adam' or 'sgd', got {config.optimizer!r}")

    def plan_summary(self) -> dict[str, str]:
        """table -> 'sharding type @ ranks', for metadata."""
        out = {}
        for module_plan in (self.plan.plan if self.plan is not None else {}).values():
            for table, ps in module_plan.items():
                out[table] = f"{ps.sharding_type} @ ranks {ps.ranks}"
        return out

    # -- data ------------------------------------------------------------------------------------
    def prepare(self, data: ExampleTensors) -> ExampleTensors:
        return data

    def forward(self, model, data: ExampleTensors, rows: torch.Tensor) -> torch.Tensor:
        return forward_examples(model, data, rows, self.over_arch_dtype)

    def labels(self, data: ExampleTensors, rows: torch.Tensor) -> torch.Tensor:
        return data.labels.index_select(0, rows)

    def batches(self, data: ExampleTensors, batch_size: int, generator: torch.Generator):
        n = data.num_rows
        n_common = self.group.min(n)
        local = max(1, math.ceil(batch_size / self.world_size))
        # Same seed stream on every rank (from the shared generator), different order per rank.
        seed = int(torch.randint(0, 2**62, (1,), generator=generator))
        order = torch.randperm(n, generator=torch.Generator().manual_seed(seed + self.rank))[:n_common]
        order = order.to(data.labels.device)
        for start in range(0, n_common, local):
            yield order[start : start + local]

    @torch.no_grad()
    def evaluate(self, model, data: ExampleTensors) -> tuple[float, float]:
        model.eval()
        n_max = self.group.max(data.num_rows)
        n_batches = max(1, math.ceil(n_max / EVAL_BATCH))  # the same on every rank: a forward is a collective
        if data.num_rows < n_batches:
            raise ValueError(f"rank {self.rank} has {data.num_rows} validation rows, fewer than {n_batches} batches")
        rows = torch.arange(data.num_rows, device=data.labels.device)
        logits = torch.cat([forward_examples(model, data, chunk) for chunk in rows.tensor_split(n_batches)])
        logits = self.group.all_gather_rows(logits.float())
        labels = self.group.all_gather_rows(data.labels.float())
        return loss_and_auc(logits, labels)

    def sum(self, *values: float) -> tuple[float, ...]:
        return self.group.sum(*values)

    # -- weights ---------------------------------------------------------------------------------
    def snapshot(self, model) -> dict | None:
        """The full state dict on rank 0 (CPU tensors), None elsewhere; every rank must call it."""
        self._snapshots += 1
        return gather_full_state(model, self.group)

    def final_model(self, model, best_state: dict | None) -> TwoSidedDLRM | None:
        if self._snapshots == 0:  # no epoch ran: ship the initial weights
            best_state = self.snapshot(model)
        if not self.group.is_leader:
            return None
        plain = TwoSidedDLRM(self.shape, device=torch.device("cpu"))
        plain.load_state_dict(best_state)
        plain.eval()
        return plain


def gather_full_state(model: DistributedModelParallel, group: RankGroup) -> dict | None:
    """DMP's state dict with every sharded table assembled whole on rank 0 (CPU), None elsewhere.

    Dense parameters are replicas (DDP), so rank 0's copy is the value. Table shards are
    ShardedTensors (DTensors when TorchRec is configured to output them); both are gathered
    through collectives, so every rank calls this. Rank 0 needs memory for the whole model once;
    beyond that, save with torch.distributed.checkpoint instead (see docs/running-at-scale.md).
    """
    out: dict[str, torch.Tensor] = {}
    for key, value in model.state_dict().items():
        if isinstance(value, ShardedTensor):
            local = value.local_shards()
            dev = local[0].tensor.device if local else group.device
            full = torch.empty(value.size(), dtype=value.dtype, device=dev) if group.is_leader else None
            value.gather(dst=0, out=full)
            tensor = full
        elif hasattr(value, "full_tensor"):  # DTensor
            tensor = value.full_tensor()
        else:
            tensor = value.detach()
        if group.is_leader:
            out[key] = tensor.detach().to("cpu", copy=True)
    return out if group.is_leader else None
