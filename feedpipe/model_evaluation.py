"""The nightly model evaluation: the published ranking against popularity, LightGBM and (on demo
data) the generator's oracle, on the held-out days of the training examples.

The split comes from the examples themselves: training-split positives are the purchases before
the holdout (popularity's counts, and which customers have history), test-split positives are the
products first bought in the holdout by the half of the customers no ranker early-stopped on
(training_examples: `validation` is the other half). So the evaluation can never drift from the
split the model was trained on, and no ranker is judged on the examples it was tuned on.

Every ranker leaves out what a feed published on the first held-out day would hide (the asset passes
the purchases of the feed's exclusion window before that day), and a product it hides is no positive:
a hit on it would be one the real feed could never score.
"""

from __future__ import annotations

import json
import math
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np
import polars as pl

from feedpipe.contract import CUSTOMER_ID, PRODUCT_ID
from feedpipe.evaluation import evaluation_customers, ranking_metrics
from feedpipe.ranking import model_ranking, popularity_ranking
from feedpipe.training import TrainedModel
from feedpipe.training_examples import LABEL, SPLIT, TEST, TRAIN

if TYPE_CHECKING:
    import torch

RANKERS = ("dlrm", "popularity", "lightgbm", "oracle")


@dataclass
class ModelEvaluation:
    model_version: str
    k: int
    customers: int
    model: dict  # auc, logloss
    ranking: dict[str, dict] = field(default_factory=dict)  # ranker -> recall/ndcg/map/hit_rate/coverage
    notes: list[str] = field(default_factory=list)

    def save(self, directory: str | Path) -> None:
        Path(directory).mkdir(parents=True, exist_ok=True)
        (Path(directory) / "evaluation.json").write_text(json.dumps(asdict(self), indent=2))

    @classmethod
    def load(cls, directory: str | Path) -> "ModelEvaluation":
        return cls(**json.loads((Path(directory) / "evaluation.json").read_text()))

    def table_rows(self) -> list[dict]:
        return [{"ranker": name, **{m: v for m, v in metrics.items() if m != "customers"}} for name, metrics in self.ranking.items()]


def split_pairs(examples: pl.DataFrame) -> tuple[pl.DataFrame, pl.DataFrame]:
    """(purchases before the holdout, products first bought in the holdout by the test half) from the examples."""
    pos = examples.filter(pl.col(LABEL) == 1.0)
    train = pos.filter(pl.col(SPLIT) == TRAIN).select(CUSTOMER_ID, PRODUCT_ID).unique()
    held = pos.filter(pl.col(SPLIT) == TEST).select(CUSTOMER_ID, PRODUCT_ID).unique()
    return train, held


def sample_customers(train: pl.DataFrame, held: pl.DataFrame, max_customers: int, seed: int) -> pl.Series:
    """Customers with history and new holdout purchases; a deterministic sample above max_customers."""
    ids = evaluation_customers(train, held)
    if ids.len() > max_customers:
        ids = ids.sample(max_customers, seed=seed).sort()
    return ids


def evaluate_rankers(
    trained: TrainedModel,
    examples: pl.DataFrame,
    customers: pl.DataFrame,
    products: pl.DataFrame,
    *,
    k: int = 20,
    max_customers: int = 3000,
    truth: pl.DataFrame | None = None,
    with_lightgbm: bool = True,
    seed: int = 0,
    held_out: HeldOut | None = None,
    exclude: pl.DataFrame | None,
) -> ModelEvaluation:
    """Every ranker's top k for the test half's customers with history, `exclude` (the pairs the feed would hide;
    None: nothing) left out of each, against their new purchases in the held-out days that the feed could show."""
    train, held = split_pairs(examples)
    if exclude is not None:  # bought again within the feed's exclusion window: no ranker may show it
        held = held.join(exclude.select(CUSTOMER_ID, PRODUCT_ID), on=[CUSTOMER_ID, PRODUCT_ID], how="anti")
    ids = sample_customers(train, held, max_customers, seed)
    held = held.join(ids.to_frame(), on=CUSTOMER_ID, how="semi")
    eval_customers = customers.join(ids.to_frame(), on=CUSTOMER_ID, how="semi")
    n_products = products.height
    rankings = {
        "dlrm": model_ranking(trained, eval_customers, products, top_n=k, exclude=exclude),
        "popularity": popularity_ranking(train, ids, top_n=k, exclude=exclude),
    }
    notes = []
    if with_lightgbm:
        from feedpipe.lightgbm_baseline import lightgbm_ranking, train_lightgbm
        from feedpipe.vocabularies import encode_table

        voc = trained.vocabularies
        ranker = train_lightgbm(examples, voc, seed=seed)
        rankings["lightgbm"] = lightgbm_ranking(
            ranker,
            encode_table(eval_customers, CUSTOMER_ID, voc.customer_specs, voc),
            encode_table(products, PRODUCT_ID, voc.product_specs, voc),
            top_n=k,
            exclude=exclude,
        )
        notes.append(ranker.describe())
    if truth is not None:
        from feedpipe.lightgbm_baseline import oracle_ranking

        rankings["oracle"] = oracle_ranking(truth, ids, top_n=k, exclude=exclude,
                                            product_ids=products.get_column(PRODUCT_ID))
    logloss, auc = (held_out or HeldOut.of(trained, examples)).loss_and_auc()
    return ModelEvaluation(
        model_version=trained.version,
        k=k,
        customers=ids.len(),
        model={"auc": auc, "logloss": logloss},
        ranking={name: ranking_metrics(r, held, k, n_products) for name, r in rankings.items()},
        notes=notes,
    )


@dataclass(frozen=True)
class HeldOut:
    """The model's logits on the test split (held-out days of customers it was not early-stopped on), with labels:
    one forward pass for the evaluation's AUC and log loss and for the histogram."""

    logits: torch.Tensor
    labels: torch.Tensor

    @classmethod
    def of(cls, trained: TrainedModel, examples: pl.DataFrame) -> "HeldOut":
        import torch

        from feedpipe.training import example_tensors, forward_examples

        data = example_tensors(examples.filter(pl.col(SPLIT) == TEST), trained.customer_specs, trained.product_specs)
        trained.model.eval()
        with torch.no_grad():
            rows = torch.arange(data.num_rows).split(16384)
            batches = [forward_examples(trained.model, data, r) for r in rows]
        return cls(torch.cat(batches) if batches else torch.zeros(0), data.labels)

    def loss_and_auc(self) -> tuple[float, float]:
        from feedpipe.training import loss_and_auc

        return loss_and_auc(self.logits, self.labels) if self.labels.numel() else (math.nan, math.nan)

    def probabilities(self) -> tuple[np.ndarray, np.ndarray]:
        """Predicted probabilities of (positives, negatives)."""
        import torch

        probs, positive = torch.sigmoid(self.logits).numpy(), self.labels.numpy() == 1.0
        return probs[positive], probs[~positive]
