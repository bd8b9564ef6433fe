"""model_evaluation: the model's ranking against popularity, LightGBM and (demo data) the oracle,
with the blocking gate that keeps a model losing to popularity from reaching the feed."""

import datetime as dt
import json
from pathlib import Path

import dagster as dg
import polars as pl
from pydantic import Field

from feedpipe.defs.ingest import feed_date_of
from feedpipe.defs.metadata import latest_metadata, markdown_table
from feedpipe.defs.partitions import feed_date_partitions
from feedpipe.defs.resources import ArtifactsResource, DataResource
from feedpipe.model_evaluation import HeldOut, evaluate_rankers, split_pairs
from feedpipe.plots import loss_curves, score_histogram
from feedpipe.training import TrainedModel
from feedpipe.training_examples import Window, purchased_pairs, window_transactions


class EvaluationConfig(dg.Config):
    k: int = Field(default=20, ge=1, description="Ranking cut-off for recall/NDCG/MAP/hit rate (the feed length).")
    max_customers: int = Field(default=3000, ge=1, description="Evaluated customers (a deterministic sample above this).")
    lightgbm: bool = Field(default=True, description="Train and rank with the LightGBM baseline.")
    # The feed's exclusions (pair_scores' settings of the same names; `feedpipe run` refuses a run config where
    # they differ): every ranker is judged on what the feed could have shown.
    exclude_purchased: bool = Field(default=True, description="As pair_scores': rank without what the customer "
                                    "bought in the exclusion window before the held-out days.")
    exclude_window_days: int = Field(default=90, ge=1, description="As pair_scores': how far back before the held-out "
                                     "days a purchase excludes a product.")
    min_margin_over_popularity: float = Field(
        default=0.0, description="Blocking gate: DLRM recall@K must exceed popularity's by more than this "
        "(at the default 0 a tie fails: a model that only matches popularity is not worth publishing)."
    )


@dg.asset(
    partitions_def=feed_date_partitions,
    group_name="model",
    check_specs=[
        dg.AssetCheckSpec(
            "beats_popularity",
            asset="model_evaluation",
            blocking=True,
            description="DLRM recall@K beats the popularity ranking by the configured margin; otherwise nothing is published.",
        )
    ],
)
def model_evaluation(
    context: dg.AssetExecutionContext,
    config: EvaluationConfig,
    data: DataResource,
    artifacts: ArtifactsResource,
    dlrm_model: TrainedModel,
    training_examples: pl.DataFrame,
    customers: pl.DataFrame,
    products: pl.DataFrame,
    transactions: pl.DataFrame,
):
    """recall, NDCG, MAP, hit rate @K and coverage for every ranker on the held-out days; AUC and log loss.

    Ranked as a feed published on the first held-out day would be: its exclusions, its length."""
    holdout_start = latest_metadata(context.instance, "training_examples", context.partition_key).get("holdout_start")
    exclude, excluded = None, "nothing (exclude_purchased is off)"
    if config.exclude_purchased and holdout_start is not None:
        window = Window.last_days(dt.date.fromisoformat(holdout_start), config.exclude_window_days)
        exclude = purchased_pairs(window_transactions(transactions, window))
        excluded = f"the {config.exclude_window_days} days' purchases before {holdout_start}, as the feed's"
    elif config.exclude_purchased:
        # The examples' values are stored but this instance holds no record of their materialization (a
        # benchmark's fresh instance, say): their training days' purchases are the nearest to the feed's.
        exclude = split_pairs(training_examples)[0]
        excluded = "the training days' purchases (no holdout_start recorded for training_examples here)"
        context.log.warning(f"training_examples for {feed_date_of(context)} has no holdout_start in this instance's "
                            "records, so the evaluation excludes the training days' purchases, not the feed's window")
    truth_path = data.truth_path()
    truth = pl.read_parquet(truth_path) if truth_path is not None and truth_path.exists() else None
    held_out = HeldOut.of(dlrm_model, training_examples)  # one forward pass for the AUC and the histogram
    ev = evaluate_rankers(
        dlrm_model, training_examples, customers, products,
        k=config.k, max_customers=config.max_customers, truth=truth, with_lightgbm=config.lightgbm,
        held_out=held_out, exclude=exclude,
    )
    # Kept by model version too, so `feedpipe report` finds the evaluation of the model being served.
    ev.save(artifacts.path("evaluations", ev.model_version))
    pos, neg = held_out.probabilities()
    m = dlrm_model.metrics
    dlrm, pop = ev.ranking["dlrm"], ev.ranking["popularity"]
    numeric = {f"{name}_recall_at_{ev.k}": r["recall"] for name, r in ev.ranking.items()}
    numeric.update({f"{name}_ndcg_at_{ev.k}": r["ndcg"] for name, r in ev.ranking.items()})
    yield dg.Output(
        ev,
        metadata={
            "rankers": markdown_table(ev.table_rows()),
            # on the test split: customers no ranker early-stopped on (dlrm_model's validation_auc is the other half's)
            "held_out_auc": ev.model["auc"],
            "held_out_logloss": ev.model["logloss"],
            **numeric,
            "evaluated_customers": ev.customers,
            "held_out_from": holdout_start or "not recorded",
            "excluded": excluded,
            "excluded_pairs": 0 if exclude is None else exclude.height,
            "model_version": ev.model_version,
            "loss_curves": dg.MetadataValue.md(loss_curves(m.get("history", []), m.get("loss_curve", []))),
            "score_histogram": dg.MetadataValue.md(score_histogram(pos, neg)),
            "notes": "; ".join(ev.notes),
        },
    )
    # With K at least the catalogue, every ranker's top K holds every product and recall ties: only the
    # order can tell them apart, so the gate compares NDCG then.
    metric = gate_metric(ev.k, products.height)
    margin = dlrm[metric] - pop[metric]
    passed = margin > config.min_margin_over_popularity  # NaN (no evaluated customers) fails too
    if ev.customers == 0:
        why = ("no customer of the test half has purchases both before the held-out days and new ones in them, "
               "so no ranker could be judged: the feed is not published and yesterday's stays current (more "
               "validation_days or window_days in training_examples give the evaluation customers)")
    else:
        why = (f"DLRM {metric}@{ev.k} {dlrm[metric]:.4f} does not beat popularity {pop[metric]:.4f} by "
               f"{config.min_margin_over_popularity} on {ev.customers:,} customers: the feed is not published "
               "and yesterday's stays current")
    judged = {"k": ev.k, "exclude_purchased": config.exclude_purchased, "exclude_window_days": config.exclude_window_days}
    record_gate(artifacts.path("evaluations", ev.model_version), bool(passed), f"{metric}@{ev.k}", margin, judged)
    yield dg.AssetCheckResult(
        check_name="beats_popularity",
        passed=bool(passed),
        metadata={f"dlrm_{metric}": dlrm[metric], f"popularity_{metric}": pop[metric], "margin": margin,
                  "required_margin": config.min_margin_over_popularity, "compared": f"{metric}@{ev.k}",
                  "evaluated_customers": ev.customers},
        description=None if passed else why,
    )


GATE_FILE = "beats_popularity.json"


def record_gate(directory: Path, passed: bool, compared: str, margin: float, judged: dict | None = None) -> None:
    """The gate's verdict beside the model's evaluation. Dagster stores a model before a blocking check fails
    its run, so a later pair_scores of the same date reads this to refuse a model that lost to popularity.
    `judged`: the feed settings it was judged with (k, exclusions), which the feed's steps compare with theirs."""
    directory.mkdir(parents=True, exist_ok=True)
    verdict = {"passed": passed, "compared": compared, "margin": margin, "judged": judged or {}}
    (directory / GATE_FILE).write_text(json.dumps(verdict))


def gate_failure(directory: Path) -> str | None:
    """Why the model evaluated in `directory` may not be published, or None when it passed.

    A model without a verdict was never judged (model_evaluation did not run for it, or failed before its
    check): it is refused too, or materializing pair_scores and ranked_feed alone would publish it."""
    path = directory / GATE_FILE
    if not path.exists():
        return ("it has not been evaluated (no beats_popularity verdict: model_evaluation did not run for it "
                "or failed first); materialize model_evaluation for this date")
    verdict = json.loads(path.read_text())
    if verdict["passed"]:
        return None
    return f"it failed beats_popularity ({verdict['compared']} margin {verdict['margin']:.4f})"


def judged_otherwise(directory: Path, asset: str, **settings) -> list[str]:
    """Which of a feed step's settings differ from those the model's evaluation judged it with, one line each.

    `feedpipe run` refuses such a run config before any work; this catches the launchpad and a step run alone."""
    path = directory / GATE_FILE
    judged = json.loads(path.read_text()).get("judged", {}) if path.exists() else {}
    return [f"{asset}.{name} is {value!r} but model_evaluation judged the model with {judged[name]!r}"
            for name, value in settings.items() if name in judged and judged[name] != value]


def gate_metric(k: int, products: int) -> str:
    """What beats_popularity compares: recall@K, or NDCG@K where K covers the whole catalogue."""
    return "ndcg" if k >= products else "recall"
