"""Training the two-sided DLRM on pre-tensorized examples, and the checkpoint it ships as.

The examples frame (see training_examples.attach_features) becomes tensors once; a batch is a
slice of a shuffled permutation gathered with vectorized ops. Early stopping keeps the epoch with
the best validation log loss; a non-finite loss stops training with an error rather than saving a
broken model.
"""

from __future__ import annotations

import json
import logging
import math
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

import polars as pl
import torch
from torchmetrics.functional.classification import binary_auroc
from torchrec.optim.rowwise_adagrad import RowWiseAdagrad

from feedpipe.contract import CUSTOMERS, PRODUCTS
from feedpipe.feature_tensors import SideTensors, side_tensors
from feedpipe.flat_embeddings import FlatTables, SideBags
from feedpipe.model import ModelShape, SideVectors, TwoSidedDLRM, sparse_features_for
from feedpipe.scoring_runtime import emulated_precision_warning, intra_op_threads, native_bf16
from feedpipe.sources import FeatureSpec
from feedpipe.training_examples import LABEL, SPLIT, TRAIN, VALIDATION
from feedpipe.vocabularies import Vocabularies, dense_features


_LOG = logging.getLogger(__name__)


class TrainingDiverged(RuntimeError):
    pass


TRAINING_PRECISIONS = ("auto", "fp32", "bf16")


@dataclass(frozen=True)
class TrainConfig:
    """Defaults chosen by measurement on the default demo data (10,000 x 2,000, seed 0; 2-core CPU):
    12 sampled negatives per positive and RowWiseAdagrad on the tables took held-out recall@20 from
    0.241 (Adam everywhere, no decay, 4 negatives) to 0.278; embedding weight decay 1e-4 (3e-4 until
    session 10) was chosen on the validation half of two demo draws. See benchmarks/README.md."""

    embedding_dim: int = 16
    dense_arch_layers: tuple[int, ...] = (64, 16)
    over_arch_layers: tuple[int, ...] = (128, 64, 1)
    batch_size: int = 2048
    epochs: int = 6
    # "adam": Adam on the dense arches, TorchRec's RowWiseAdagrad (one accumulator per embedding row)
    # on the embedding tables. "sgd": plain SGD on everything (the source article's setting).
    optimizer: str = "adam"
    learning_rate: float = 3e-3
    embedding_learning_rate: float = 0.05
    embedding_weight_decay: float = 1e-4
    dense_weight_decay: float = 0.0
    patience: int = 1
    seed: int = 0
    # Intra-op threads while training on CPU; 0 picks by the over arch's width (`training_threads`).
    cpu_threads: int = 0
    # The over arch's matrix products: "fp32", "bf16" (autocast: weights, optimizer state and the
    # interaction stay fp32), or "auto": bf16 where the hardware multiplies bf16 natively
    # (`native_bf16`), else fp32. See `over_arch_dtype` for the measurements behind it.
    precision: str = "auto"

    def __post_init__(self):
        """Refuse settings that would crash mid-training or, worse, ship an untrained model."""
        problems = []
        for name in ("embedding_dim", "batch_size", "epochs"):
            if getattr(self, name) < 1:
                problems.append(f"{name} must be >= 1, got {getattr(self, name)}")
        for name in ("dense_arch_layers", "over_arch_layers"):
            layers = getattr(self, name)
            if not layers or any(w < 1 for w in layers):
                problems.append(f"{name} must be one or more widths >= 1, got {list(layers)}")
        if self.dense_arch_layers and self.dense_arch_layers[-1] != self.embedding_dim:
            problems.append(f"dense_arch_layers must end in embedding_dim ({self.embedding_dim}), got {list(self.dense_arch_layers)}")
        if self.over_arch_layers and self.over_arch_layers[-1] != 1:
            problems.append(f"over_arch_layers must end in 1 (a logit), got {list(self.over_arch_layers)}")
        if self.precision not in TRAINING_PRECISIONS:
            problems.append(f"precision must be one of {list(TRAINING_PRECISIONS)}, got {self.precision!r}")
        if self.optimizer not in ("adam", "sgd"):
            problems.append(f"optimizer must be 'adam' or 'sgd', got {self.optimizer!r}")
        for name in ("learning_rate", "embedding_learning_rate"):
            if not math.isfinite(getattr(self, name)) or getattr(self, name) <= 0:
                problems.append(f"{name} must be a number > 0, got {getattr(self, name)}")
        for name in ("embedding_weight_decay", "dense_weight_decay"):
            if not math.isfinite(getattr(self, name)) or getattr(self, name) < 0:
                problems.append(f"{name} must be a number >= 0, got {getattr(self, name)}")
        for name in ("patience", "cpu_threads"):
            if getattr(self, name) < 0:
                problems.append(f"{name} must be >= 0, got {getattr(self, name)}")
        if problems:
            raise ValueError("training config: " + "; ".join(problems))


# The source article's DLRM settings, kept as a preset for comparison.
ARTICLE_PRESET = TrainConfig(
    embedding_dim=10,
    dense_arch_layers=(512, 256, 10),
    over_arch_layers=(512, 512, 256, 1),
    optimizer="sgd",
    learning_rate=0.01,
    embedding_learning_rate=0.01,
    embedding_weight_decay=0.0,
)


def over_arch_dtype(config: TrainConfig, device: torch.device) -> torch.dtype | None:
    """The dtype the over arch multiplies in while training (None: fp32, no autocast).

    bf16 under `auto` because it is where a step's time goes: on the 2-core AMD EPYC (Zen 4,
    AVX512_BF16, one thread) the over arch's forward and backward took 2.8-3.0 ms in fp32 and
    1.08-1.09 ms under bf16 autocast, at the same loss (benchmarks/README.md, "Training"). Without
    native bf16 the products are emulated and slower, so `auto` keeps fp32 there.
    """
    if config.precision == "bf16" or (config.precision == "auto" and native_bf16(device)):
        return torch.bfloat16
    return None


def make_optimizers(
    model: TwoSidedDLRM, config: TrainConfig, tables: list[torch.nn.Parameter] | None = None
) -> list[torch.optim.Optimizer]:
    """Adam on the dense arches and RowWiseAdagrad on the tables (or SGD on all, the article's way).

    `tables`: the parameters holding the embedding rows, when they are not the EBC's own (the flat
    matrices of `flat_embeddings.FlatTables`); the EBC's weights are then left to them.
    """
    embedding = tables if tables is not None else [p for n, p in model.named_parameters() if "_ebc." in n]
    dense = [p for n, p in model.named_parameters() if "_ebc." not in n]
    if config.optimizer == "sgd":
        return [torch.optim.SGD(dense + embedding, lr=config.learning_rate)]
    if config.optimizer != "adam":
        raise ValueError(f"optimizer must be 'adam' or 'sgd', got {config.optimizer!r}")
    # fused: one kernel for all dense tensors (1.2 ms -> 0.4 ms a step at the default sizes).
    fused = all(p.device.type in ("cpu", "cuda") for p in dense)
    return [
        torch.optim.Adam(dense, lr=config.learning_rate, weight_decay=config.dense_weight_decay, fused=fused),
        RowWiseAdagrad(embedding, lr=config.embedding_learning_rate, weight_decay=config.embedding_weight_decay),
    ]


@dataclass
class ExampleTensors:
    customers: SideTensors
    products: SideTensors
    labels: torch.Tensor  # [N] float32

    @property
    def num_rows(self) -> int:
        return int(self.labels.shape[0])

    def to(self, device) -> "ExampleTensors":
        return ExampleTensors(self.customers.to(device), self.products.to(device), self.labels.to(device))


def example_tensors(examples: pl.DataFrame, customer_specs: list[FeatureSpec], product_specs: list[FeatureSpec]) -> ExampleTensors:
    return ExampleTensors(
        side_tensors(examples, customer_specs),
        side_tensors(examples, product_specs),
        torch.from_numpy(examples.get_column(LABEL).cast(pl.Float32).to_numpy().copy()),
    )


def split_examples(
    examples: pl.DataFrame, customer_specs: list[FeatureSpec], product_specs: list[FeatureSpec]
) -> tuple[ExampleTensors, ExampleTensors]:
    return tuple(  # type: ignore[return-value]
        example_tensors(examples.filter(pl.col(SPLIT) == s), customer_specs, product_specs) for s in (TRAIN, VALIDATION)
    )


def model_shape(
    customer_specs: list[FeatureSpec], product_specs: list[FeatureSpec], vocabularies: Vocabularies, config: TrainConfig
) -> ModelShape:
    sizes = vocabularies.sizes()
    return ModelShape(
        customer_sparse=sparse_features_for(customer_specs, sizes),
        product_sparse=sparse_features_for(product_specs, sizes),
        customer_dense_in=len(dense_features(customer_specs)),
        product_dense_in=len(dense_features(product_specs)),
        embedding_dim=config.embedding_dim,
        dense_arch_layers=tuple(config.dense_arch_layers),
        over_arch_layers=tuple(config.over_arch_layers),
    )


@dataclass
class EpochStats:
    epoch: int
    train_loss: float
    val_loss: float
    val_auc: float
    samples_per_s: float


@dataclass
class TrainResult:
    model: TwoSidedDLRM
    history: list[EpochStats]
    best_epoch: int
    seconds: float
    samples_per_s: float
    device: str
    loss_curve: list[float] = field(default_factory=list)  # per-batch-group training loss, for plots
    ranks: int = 1  # processes that trained it (torchrun world size)
    over_arch_precision: str = "fp32"  # what TrainConfig.precision resolved to on this device: fp32 or bf16

    @property
    def best(self) -> EpochStats:
        return self.history[self.best_epoch]


def _batches(n: int, batch_size: int, generator: torch.Generator | None, device: torch.device | str = "cpu"):
    # The order moves to the device once: a per-batch host-to-device copy would wait for the GPU each step.
    order = (torch.randperm(n, generator=generator) if generator is not None else torch.arange(n)).to(device)
    for start in range(0, n, batch_size):
        yield order[start : start + batch_size]


def forward_examples(
    model: TwoSidedDLRM, data: ExampleTensors, rows: torch.Tensor, over_arch_dtype: torch.dtype | None = None
) -> torch.Tensor:
    cd, ck = data.customers.gather(rows)
    pd, pk = data.products.gather(rows)
    # Through the module's call, not its methods: under torchrun `model` is DMP, whose forward
    # distributes the sharded tables' inputs.
    return model(cd, ck if data.customers.sparse_keys else None, pd, pk if data.products.sparse_keys else None,
                 over_arch_dtype=over_arch_dtype)


@torch.no_grad()
def evaluate_examples(model: TwoSidedDLRM, data: ExampleTensors, batch_size: int = 16384) -> tuple[float, float]:
    """(log loss, AUC) on labelled examples."""
    model.eval()
    batches = _batches(data.num_rows, batch_size, None, data.labels.device)
    logits = torch.cat([forward_examples(model, data, rows) for rows in batches])
    return loss_and_auc(logits, data.labels.to(logits.device))


def loss_and_auc(logits: torch.Tensor, labels: torch.Tensor) -> tuple[float, float]:
    """(log loss, AUC) of logits against 0/1 labels; AUC NaN for one class (torchmetrics would say 0.0, which
    reads as a bad model). One place for one process and for the ranks' gathered validation."""
    loss = torch.nn.functional.binary_cross_entropy_with_logits(logits, labels).item()
    if labels.numel() == 0 or bool((labels == labels[0]).all()):
        return loss, math.nan
    return loss, binary_auroc(torch.sigmoid(logits), labels.long()).item()


SIDES = (CUSTOMERS, PRODUCTS)  # ExampleTensors' attributes and FlatExamples' keys


@dataclass
class FlatExamples:
    """What one-process training reads: per side its dense features [N, n] and (for a side with
    tables) its bags of flat-matrix rows, and the labels [N]."""

    dense: dict[str, torch.Tensor]
    bags: dict[str, SideBags]
    labels: torch.Tensor
    # The order the rows are in now, as indices into the examples as built (None: as built).
    order: torch.Tensor | None = None

    @property
    def num_rows(self) -> int:
        return int(self.labels.shape[0])

    def permuted(self, order: torch.Tensor) -> "FlatExamples":
        """The rows in `order` (indices into the rows as they are now), as a new set."""
        return FlatExamples(
            {side: d.index_select(0, order) for side, d in self.dense.items()},
            {side: b.permuted(order) for side, b in self.bags.items()},
            self.labels.index_select(0, order),
        )

    def shuffle(self, order: torch.Tensor) -> None:
        """Put the rows in `order` (indices into the examples as built), in place and one tensor at
        a time: only one copy of the examples is kept, and at most one tensor's second copy exists
        at any moment. The epoch's batches are then exactly those of `order`, whatever came before."""
        if self.order is None:
            step = order
        else:  # from the current arrangement: row i now holds example self.order[i]
            where = torch.empty_like(self.order)
            where[self.order] = torch.arange(self.order.numel(), device=order.device, dtype=self.order.dtype)
            step = where.index_select(0, order)
        for side in self.dense:
            self.dense[side] = self.dense[side].index_select(0, step)
        for side in self.bags:
            self.bags[side] = self.bags[side].permuted(step)
        self.labels = self.labels.index_select(0, step)
        self.order = order

    def batches(self, batch_size: int):
        """Consecutive slices of `batch_size` rows, as views."""
        bags = {side: b.batches(batch_size) for side, b in self.bags.items()}
        for start in range(0, self.num_rows, batch_size):
            stop = start + batch_size
            yield FlatExamples(
                {side: d[start:stop] for side, d in self.dense.items()},
                {side: next(it) for side, it in bags.items()},
                self.labels[start:stop],
            )


class InProcess:
    """Where `train_dlrm` puts the model, its batches and its evaluation: here, one process.

    Each side's embedding tables train as one flat matrix (`flat_embeddings.FlatTables`; the EBC's
    weights are views of it), so a batch is one lookup and one optimizer step per side; `flat=False`
    trains through the EBC itself, as `ShardedTraining` does (kept to pin that both learn the same).

    `feedpipe.sharded_training.ShardedTraining` has the same methods for a torchrun rank (model
    sharded by DistributedModelParallel, each rank holding its share of the examples).
    """

    rank = 0
    world_size = 1

    def __init__(self, flat: bool = True) -> None:
        self.flat = flat
        self.tables: dict[str, FlatTables] = {}
        self.device = torch.device("cpu")
        self.over_arch_dtype: torch.dtype | None = None

    def build(self, shape: ModelShape, config: TrainConfig, device: torch.device):
        self.device = device
        self.over_arch_dtype = over_arch_dtype(config, device)
        model = TwoSidedDLRM(shape, device=device)
        if not self.flat:
            return model, make_optimizers(model, config)
        self.tables = {
            side: FlatTables(ebc, features)
            for side, ebc, features in (
                ("customers", model.customer_ebc, shape.customer_sparse),
                ("products", model.product_ebc, shape.product_sparse),
            )
            if ebc is not None
        }
        return model, make_optimizers(model, config, tables=[t.weight for t in self.tables.values()])

    def prepare(self, data: ExampleTensors):
        """What `batches` and `forward` read: each side's dense features and bags, computed once."""
        if not self.flat:
            return data
        return FlatExamples(
            dense={side: getattr(data, side).dense for side in SIDES},
            bags={side: t.bags(getattr(data, side)) for side, t in self.tables.items()},
            labels=data.labels,
        )

    def batches(self, prepared, batch_size: int, generator: torch.Generator):
        """The epoch's batches: the examples shuffled once, then sliced (see flat_embeddings)."""
        if not self.flat:
            yield from _batches(prepared.num_rows, batch_size, generator, self.device)
            return
        prepared.shuffle(torch.randperm(prepared.num_rows, generator=generator).to(self.device))
        yield from prepared.batches(batch_size)

    def forward(self, model: TwoSidedDLRM, prepared, batch) -> torch.Tensor:
        if not self.flat:
            return forward_examples(model, prepared, batch, self.over_arch_dtype)
        sides = []
        for side, arch in zip(SIDES, (model.customer_dense_arch, model.product_dense_arch)):
            dense = arch(batch.dense[side]) if arch is not None else None
            table = self.tables.get(side)
            pooled = (table.pool(batch.bags[side]) if table is not None
                      else batch.labels.new_zeros((batch.num_rows, 0, model.shape.embedding_dim)))
            sides.append(SideVectors(dense, pooled))
        return model.logits_from_vectors(*sides, over_arch_dtype=self.over_arch_dtype)

    def labels(self, prepared, batch) -> torch.Tensor:
        return prepared.labels.index_select(0, batch) if not self.flat else batch.labels

    def evaluate(self, model, data: ExampleTensors) -> tuple[float, float]:
        return evaluate_examples(model, data)

    def sum(self, *values: float) -> tuple[float, ...]:
        return values

    def snapshot(self, model) -> dict | None:
        return {k: v.detach().clone() for k, v in model.state_dict().items()}

    def final_model(self, model, best_state: dict | None) -> TwoSidedDLRM | None:
        if best_state is not None:
            model.load_state_dict(best_state)  # into the EBC's views: the flat matrices too
        model.eval()
        return model


# Below this many multiply-adds per example in the over arch, one thread trains faster than two:
# each small op of a step opens an OpenMP region whose wake-up costs more than the split saves.
# Measured on the 2-core Intel Xeon: the default model (128-64-1, ~17k) 239k samples/s on one
# thread against 127k on two; the article preset (512-512-256-1, ~0.4M) 24k against 34k.
ONE_THREAD_BELOW_MACS = 100_000


def training_threads(config: TrainConfig, shape: ModelShape) -> int:
    """Intra-op threads for training on CPU: `config.cpu_threads`, or by model size when it is 0."""
    if config.cpu_threads > 0:
        return config.cpu_threads
    widths = [TwoSidedDLRM.over_arch_input_width(shape), *shape.over_arch_layers]
    macs = sum(a * b for a, b in zip(widths, widths[1:]))
    return 1 if macs < ONE_THREAD_BELOW_MACS else torch.get_num_threads()


# Batches whose losses are read back (and checked) at once; also one point of the loss curve.
LOSS_GROUP = 20


class _EpochLosses:
    """An epoch's batch losses, kept on the device and read back LOSS_GROUP batches at a time.

    Reading each loss as it comes (`loss.item()`) makes the CPU wait for the GPU every step, so its
    launches of the next step never overlap the current one. A non-finite loss is still caught within
    LOSS_GROUP steps, and training stops before the model is evaluated or saved. `agree` sums a value
    over the ranks (`parallel.sum`): every rank checks at the same batch counts, so when one rank's loss
    goes bad all of them stop together instead of the others waiting in the next collective.
    """

    def __init__(self, epoch: int, learning_rate: float, curve: list[float], agree=None) -> None:
        self.epoch, self.learning_rate, self.curve = epoch, learning_rate, curve
        self.agree = agree or (lambda *values: values)
        self.pending: list[tuple[torch.Tensor, int]] = []
        self.total, self.count, self.batches = 0.0, 0, 0

    def add(self, loss: torch.Tensor, rows: int) -> None:
        self.pending.append((loss.detach(), rows))
        if len(self.pending) == LOSS_GROUP:
            self.check()

    def check(self) -> None:
        if not self.pending:
            return
        values = torch.stack([loss for loss, _ in self.pending]).tolist()
        bad = next(((i, v) for i, v in enumerate(values) if not math.isfinite(v)), None)
        if self.agree(float(bad is not None))[0] > 0:
            where = (f"training loss became {bad[1]} at epoch {self.epoch}, batch {self.batches + bad[0]}"
                     if bad is not None else f"training loss became non-finite on another rank at epoch {self.epoch}")
            raise TrainingDiverged(
                f"{where}; lower the learning rate (now {self.learning_rate}) or check the input features"
            )
        self.total += sum(v * n for v, (_, n) in zip(values, self.pending))
        self.count += sum(n for _, n in self.pending)
        self.batches += len(values)
        if len(values) == LOSS_GROUP:  # the curve's points are whole groups, as before
            self.curve.append(sum(values) / len(values))
        self.pending = []


def train_dlrm(
    train: ExampleTensors,
    valid: ExampleTensors,
    shape: ModelShape,
    config: TrainConfig = TrainConfig(),
    device: torch.device | str = "cpu",
    log=None,
    parallel: InProcess | None = None,
) -> TrainResult:
    """Train with early stopping on validation log loss.

    `parallel` (default: `InProcess()`) places the model and the data; under torchrun pass a
    `ShardedTraining`, whose rank 0 gets the gathered model back (other ranks get model=None).
    """
    parallel = parallel or InProcess()
    device = torch.device(device)
    with intra_op_threads(training_threads(config, shape) if device.type == "cpu" else 0):
        return _train(train, valid, shape, config, device, log, parallel)


def _train(train, valid, shape, config, device, log, parallel) -> TrainResult:
    torch.manual_seed(config.seed)
    model, optimizers = parallel.build(shape, config, device)
    slow = emulated_precision_warning(device, parallel.over_arch_dtype or torch.float32)
    if slow is not None:  # precision "bf16" forced where it is emulated: ~9x slower over arch
        (log or _LOG.warning)(f"training precision {config.precision}: {slow}")
    train, valid = train.to(device), valid.to(device)
    prepared = parallel.prepare(train)
    generator = torch.Generator().manual_seed(config.seed)
    history: list[EpochStats] = []
    loss_curve: list[float] = []
    best_loss, best_state, best_epoch, bad_epochs = math.inf, None, 0, 0
    samples, train_seconds = 0, 0.0
    t_all = time.perf_counter()
    for epoch in range(config.epochs):
        model.train()
        t0 = time.perf_counter()
        losses = _EpochLosses(epoch, config.learning_rate, loss_curve, agree=parallel.sum)
        for batch in parallel.batches(prepared, config.batch_size, generator):
            logits = parallel.forward(model, prepared, batch)
            labels = parallel.labels(prepared, batch)
            loss = torch.nn.functional.binary_cross_entropy_with_logits(logits, labels)
            for opt in optimizers:
                opt.zero_grad(set_to_none=True)
            loss.backward()
            for opt in optimizers:
                opt.step()
            losses.add(loss, labels.numel())
        # The last batch holds views of the examples' tensors: let it go before the next epoch's
        # shuffle replaces them, or the old ones stay alive beside the new.
        batch = logits = labels = loss = None
        losses.check()
        total, count = losses.total, losses.count
        epoch_seconds = time.perf_counter() - t0
        total, count = parallel.sum(total, count)  # over ranks
        samples += count
        train_seconds += epoch_seconds
        val_loss, val_auc = parallel.evaluate(model, valid)
        stats = EpochStats(epoch, total / max(count, 1), val_loss, val_auc, count / max(epoch_seconds, 1e-9))
        history.append(stats)
        if log is not None:
            log(f"epoch {epoch}: train loss {stats.train_loss:.4f} val loss {val_loss:.4f} val AUC {val_auc:.4f} "
                f"({stats.samples_per_s:,.0f} samples/s)")
        if not math.isfinite(val_loss):
            raise TrainingDiverged(f"validation loss became {val_loss} at epoch {epoch}")
        if val_loss < best_loss - 1e-4:
            best_loss, best_epoch, bad_epochs = val_loss, epoch, 0
            best_state = parallel.snapshot(model)
        else:
            bad_epochs += 1
            if bad_epochs > config.patience:
                break
    model = parallel.final_model(model, best_state)
    return TrainResult(
        model=model,
        history=history,
        best_epoch=best_epoch,
        seconds=time.perf_counter() - t_all,
        samples_per_s=samples / max(train_seconds, 1e-9),
        device=str(device),
        loss_curve=loss_curve,
        ranks=parallel.world_size,
        over_arch_precision="bf16" if parallel.over_arch_dtype == torch.bfloat16 else "fp32",
    )


# -- checkpoint ---------------------------------------------------------------------------------


@dataclass
class TrainedModel:
    """What `dlrm_model` ships: the weights, the shape, the features and vocabularies they need."""

    model: TwoSidedDLRM
    customer_specs: list[FeatureSpec]
    product_specs: list[FeatureSpec]
    vocabularies: Vocabularies
    version: str
    metrics: dict = field(default_factory=dict)

    def save(self, directory: str | Path) -> None:
        directory = Path(directory)
        directory.mkdir(parents=True, exist_ok=True)
        torch.save({k: v.cpu() for k, v in self.model.state_dict().items()}, directory / "model.pt")
        self.vocabularies.save(directory)
        meta = {
            "version": self.version,
            "shape": self.model.shape.to_dict(),
            "customer_specs": [asdict(s) for s in self.customer_specs],
            "product_specs": [asdict(s) for s in self.product_specs],
            "metrics": self.metrics,
        }
        (directory / "model.json").write_text(json.dumps(meta, indent=2, default=str))

    def to(self, device: torch.device | str) -> "TrainedModel":
        """The same model on `device` (moved in place, as nn.Module.to does); returns self."""
        self.model.to(torch.device(device))
        return self

    @classmethod
    def load(cls, directory: str | Path, device: torch.device | str = "cpu") -> "TrainedModel":
        directory = Path(directory)
        meta = json.loads((directory / "model.json").read_text())
        model = TwoSidedDLRM(ModelShape.from_dict(meta["shape"]), device=torch.device(device))
        model.load_state_dict(torch.load(directory / "model.pt", map_location=device, weights_only=True))
        model.eval()
        return cls(
            model=model,
            customer_specs=[FeatureSpec(**s) for s in meta["customer_specs"]],
            product_specs=[FeatureSpec(**s) for s in meta["product_specs"]],
            vocabularies=Vocabularies.load(directory),
            version=meta["version"],
            metrics=meta.get("metrics", {}),
        )
