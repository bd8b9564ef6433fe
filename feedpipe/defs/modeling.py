"""Model assets: vocabularies -> training_examples -> dlrm_model, with the blocking quality check."""


import math
from dataclasses import asdict, fields, replace
from typing import Optional

import dagster as dg
from pydantic import Field, model_validator
import polars as pl

from feedpipe.contract import CUSTOMER_ID, CUSTOMERS, PRODUCT_ID, PRODUCTS
from feedpipe.defs.ingest import feed_date_of
from feedpipe.defs.io_manager import latest_partition_before
from feedpipe.defs.launchers import GPU_STEP_TAGS, LauncherResource
from feedpipe.defs.metadata import frame_metadata, markdown_table
from feedpipe.defs.partitions import feed_date_partitions
from feedpipe.defs.resources import ArtifactsResource, ComputeResource, DataResource
from feedpipe.training import ARTICLE_PRESET, TrainConfig, TrainedModel, model_shape, split_examples, train_dlrm
from feedpipe.training_examples import SPLIT, ExampleConfig, Window, attach_features, build_training_examples
from feedpipe.vocabularies import Vocabularies, build_vocabularies, encode_table, side_specs


class VocabularyConfig(dg.Config):
    min_count: int = Field(default=2, ge=1, description="Attribute values seen fewer times map to the OOV index.")


class ExamplesConfig(dg.Config):
    window_days: int = 90
    validation_days: int = 7
    negatives_per_positive: int = 12
    seed: int = 0

    # A ValueError here is a pydantic error when the config is built: `feedpipe run` builds every asset's
    # before any step runs, where the dataclass's own check would wait for the step.
    @model_validator(mode="after")
    def _consistent(self) -> "ExamplesConfig":
        self.core()
        return self

    def core(self) -> ExampleConfig:
        return ExampleConfig(self.window_days, self.validation_days, self.negatives_per_positive, self.seed)


class TrainingConfig(dg.Config):
    """Training hyperparameters. Unset fields take the preset's value: `default` (chosen by
    measurement on the demo data, see feedpipe.training.TrainConfig) or `article` (the source
    article's DLRM: embedding dim 10, dense arch 512-256-10, over arch 512-512-256-1, SGD lr 0.01)."""

    preset: str = Field(default="default", description="default | article")
    embedding_dim: Optional[int] = None
    dense_arch_layers: Optional[list[int]] = Field(default=None, description="Must end in embedding_dim.")
    over_arch_layers: Optional[list[int]] = Field(default=None, description="Must end in 1.")
    batch_size: Optional[int] = None
    epochs: Optional[int] = None
    optimizer: Optional[str] = Field(default=None, description="adam (Adam dense + RowWiseAdagrad embeddings) | sgd")
    learning_rate: Optional[float] = None
    embedding_learning_rate: Optional[float] = None
    embedding_weight_decay: Optional[float] = None
    dense_weight_decay: Optional[float] = None
    patience: Optional[int] = Field(default=None, description="Epochs without validation improvement before stopping.")
    seed: Optional[int] = None
    cpu_threads: Optional[int] = Field(default=None, description="Intra-op threads on CPU; 0 = by the over arch's width.")
    precision: Optional[str] = Field(default=None, description="Over arch matrix products: auto (bf16 where the hardware has it) | fp32 | bf16.")
    min_validation_auc: float = Field(default=0.6, description="Blocking check: below this the feed is not published.")

    @model_validator(mode="after")
    def _consistent(self) -> "TrainingConfig":  # as ExamplesConfig's
        self.core()
        return self

    def core(self) -> TrainConfig:
        presets = {"default": TrainConfig(), "article": ARTICLE_PRESET}
        if self.preset not in presets:
            raise ValueError(f"training preset must be one of {sorted(presets)}, got {self.preset!r}")
        overrides = {
            f.name: tuple(v) if isinstance(v, list) else v
            for f in fields(TrainConfig)
            if (v := getattr(self, f.name, None)) is not None
        }
        return replace(presets[self.preset], **overrides)


@dg.asset(partitions_def=feed_date_partitions, group_name="model")
def vocabularies(
    context: dg.AssetExecutionContext,
    config: VocabularyConfig,
    data: DataResource,
    artifacts: ArtifactsResource,
    transactions: pl.DataFrame,
    customers: pl.DataFrame,
    products: pl.DataFrame,
) -> dg.Output[Vocabularies]:
    """value -> index per categorical feature (0 pad, 1 null, 2 OOV, then most frequent first), and dense scalers.

    Extends the newest earlier night's vocabularies, so a known value keeps its index.
    """
    input_config = data.config()
    specs = side_specs(CUSTOMERS, customers, input_config) + side_specs(PRODUCTS, products, input_config)
    prev_dir = latest_partition_before(artifacts.path(), "vocabularies", context.partition_key)
    previous = Vocabularies.load(prev_dir) if prev_dir is not None else None
    id_counts = {
        CUSTOMER_ID: transactions.group_by(CUSTOMER_ID).agg(pl.len().alias("count")),
        PRODUCT_ID: transactions.group_by(PRODUCT_ID).agg(pl.len().alias("count")),
    }
    vocab = build_vocabularies(
        {CUSTOMERS: customers, PRODUCTS: products}, specs, id_counts=id_counts, previous=previous, min_count=config.min_count
    )
    sizes = vocab.sizes()
    return dg.Output(
        vocab,
        metadata={
            "extends_partition": prev_dir.name if prev_dir is not None else "",
            "features": markdown_table(
                [{"feature": f, "rows": sizes[f]} for f in sizes]
                + [{"feature": f, "rows": "dense"} for f in vocab.scalers]
            ),
            "total_embedding_rows": sum(sizes.values()),
        },
    )


@dg.asset(partitions_def=feed_date_partitions, group_name="model", kinds={"polars"})
def training_examples(
    context: dg.AssetExecutionContext,
    config: ExamplesConfig,
    transactions: pl.DataFrame,
    customers: pl.DataFrame,
    products: pl.DataFrame,
    vocabularies: Vocabularies,
) -> dg.Output[pl.DataFrame]:
    """Positives and sampled negatives, encoded, split by time (the last days held out for validation)."""
    pairs = build_training_examples(transactions, products.get_column(PRODUCT_ID), feed_date_of(context), config.core())
    enc_c = encode_table(customers, CUSTOMER_ID, vocabularies.customer_specs, vocabularies)
    enc_p = encode_table(products, PRODUCT_ID, vocabularies.product_specs, vocabularies)
    examples = attach_features(pairs, enc_c, enc_p)
    counts = examples.group_by(SPLIT, "label").agg(pl.len()).sort(SPLIT, "label")
    return dg.Output(
        examples,
        metadata=frame_metadata(
            examples,
            unmatched_rows=pairs.height - examples.height,
            split_counts=markdown_table(counts.to_dicts()),
            # model_evaluation ranks as a feed published on this day would, with that feed's exclusions
            holdout_start=str(Window.for_feed_date(feed_date_of(context), config.core()).holdout.date()),
        ),
    )


@dg.asset(
    partitions_def=feed_date_partitions,
    group_name="model",
    kinds={"pytorch"},
    op_tags=GPU_STEP_TAGS,
    check_specs=[
        dg.AssetCheckSpec(
            "validation_auc_floor",
            asset="dlrm_model",
            blocking=True,
            description="Validation AUC at or above the configured floor; otherwise nothing downstream runs and yesterday's feed stays current.",
        )
    ],
)
def dlrm_model(
    context: dg.AssetExecutionContext,
    config: TrainingConfig,
    compute: ComputeResource,
    launcher: LauncherResource,
    training_examples: pl.DataFrame,
    vocabularies: Vocabularies,
):
    """A two-sided DLRM (TorchRec EmbeddingBagCollections + DLRM arches) trained on the compute resource's device.

    Metadata: per-epoch losses and validation AUC, samples/s, parameters, device. Ranking quality
    against the baselines is `model_evaluation`'s job.
    """
    train_cfg = config.core()
    if launcher.in_process:
        device = compute.torch_device()  # checked here only: a launcher's ranks run elsewhere, GPUs and all
        train, valid = split_examples(training_examples, vocabularies.customer_specs, vocabularies.product_specs)
        shape = model_shape(vocabularies.customer_specs, vocabularies.product_specs, vocabularies, train_cfg)
        result = train_dlrm(train, valid, shape, train_cfg, device, log=context.log.info)
    else:  # torchrun or a pod, through Dagster Pipes (feedpipe/defs/launchers.py)
        result = launcher.train(context, training_examples, vocabularies, train_cfg, compute.device)
    best = result.best
    floor_passed = bool(best.val_auc >= config.min_validation_auc)

    trained = TrainedModel(
        model=result.model,
        customer_specs=vocabularies.customer_specs,
        product_specs=vocabularies.product_specs,
        vocabularies=vocabularies,
        version=f"{context.partition_key}-{context.run_id[:8]}",
        metrics={
            "validation_auc": best.val_auc,
            "validation_logloss": best.val_loss,
            "best_epoch": best.epoch,
            "samples_per_s": result.samples_per_s,
            "device": result.device,
            "ranks": result.ranks,
            "over_arch_precision": result.over_arch_precision,
            "history": [asdict(h) for h in result.history],
            "loss_curve": result.loss_curve,
            # Kept with the weights: the check fails the step only after the IO manager has stored them, and
            # a later pair_scores of this date must not score a model that failed it.
            "passed_validation_auc_floor": floor_passed,
        },
    )
    yield dg.Output(
        trained,
        metadata={
            "validation_auc": best.val_auc,
            "validation_logloss": best.val_loss,
            "epochs": markdown_table(
                [
                    {"epoch": h.epoch, "train_loss": h.train_loss, "val_loss": h.val_loss, "val_auc": h.val_auc, "samples_per_s": round(h.samples_per_s)}
                    for h in result.history
                ]
            ),
            "loss_curve": dg.MetadataValue.json({"train_loss_per_20_batches": [round(x, 5) for x in result.loss_curve]}),
            "parameters": result.model.parameter_count(),
            "samples_per_s": round(result.samples_per_s),
            "train_seconds": round(result.seconds, 1),
            "device": result.device,
            "ranks": result.ranks,
            "over_arch_precision": result.over_arch_precision,
            "model_version": trained.version,
        },
    )
    yield dg.AssetCheckResult(
        check_name="validation_auc_floor",
        passed=floor_passed,
        metadata={"validation_auc": best.val_auc, "floor": config.min_validation_auc},
        description=None if floor_passed else (
            "validation AUC is undefined: the validation examples hold one class only (no negatives could be "
            "sampled: does every customer buy every product?); the feed will not be published"
            if math.isnan(best.val_auc) else
            f"validation AUC {best.val_auc:.4f} is below the floor {config.min_validation_auc}: the feed will not be published"
        ),
    )
