"""Feed assets: pair_scores (top N per customer over all products) -> ranked_feed (top K, published)."""


import dagster as dg
import polars as pl
import psycopg
import torch
from pydantic import Field, field_validator

from feedpipe.contract import CUSTOMER_ID, PRODUCT_ID
from feedpipe.defs.ingest import feed_date_of
from feedpipe.defs.launchers import GPU_STEP_TAGS, LauncherResource
from feedpipe.defs.metadata import frame_metadata, latest_metadata
from feedpipe.defs.partitions import feed_date_partitions
from feedpipe.defs.evaluation import gate_failure, judged_otherwise
from feedpipe.defs.resources import ArtifactsResource, ComputeResource, DatabaseResource
from feedpipe.database import DatabaseError, connect
from feedpipe.feed_queries import version_counts
from feedpipe.publishing import FeedArrays, publish_feed
from feedpipe.ranking import (
    RANK, SCORE, customers_without_scores, model_ranking, top_k_overlap, unavailable_products,
)
from feedpipe.scoring import precision
from feedpipe.scoring_runtime import emulated_precision_warning
from feedpipe.training import TrainedModel
from feedpipe.training_examples import Window, purchased_pairs, window_transactions


class ScoringConfig(dg.Config):
    # Bounds here rather than checks in the body: `feedpipe run` validates every asset's config before any step.
    top_n: int = Field(default=100, ge=1, description="Products kept per customer in pair_scores.")
    exclude_purchased: bool = Field(default=True, description="Drop products the customer bought in the window.")
    exclude_window_days: int = Field(default=90, ge=1, description="How far back a purchase excludes a product from "
                                     "the feed.")
    dtype: str = Field(
        default="fp32",
        description="fp32 (exact), bf16 (3-4x faster where the CPU has AMX; may swap near-ties), or bf16-rerank "
        "(bf16, then each customer's best 1.5N products re-scored in fp32: fp32's ranking at 2.2x fp32's speed "
        "on a CPU with AMX).",
    )

    @field_validator("dtype")
    @classmethod
    def _known_precision(cls, value: str) -> str:
        precision(value)  # ValueError naming the choices
        return value


class FeedConfig(dg.Config):
    k: int = Field(default=20, ge=1, description="Feed length per customer (at most pair_scores' top_n).")
    # A bound here, not a check in the body: `feedpipe run` validates every asset's config before any step runs.
    retention: int = Field(default=3, ge=1, description="Feed versions kept in Postgres (the current one included); "
                           "at least 1.")
    serve_older_feed_date: bool = Field(
        default=False, description="Serve this feed even when a newer feed date is served (a backfill is otherwise "
        "loaded and kept, a view switch away, but readers stay on the newest date)."
    )


@dg.asset(
    partitions_def=feed_date_partitions,
    group_name="feed",
    kinds={"pytorch", "polars"},
    op_tags=GPU_STEP_TAGS,
    # Runs after the evaluation so its blocking gate (beats_popularity) can stop the publish.
    deps=["model_evaluation"],
    check_specs=[
        dg.AssetCheckSpec("no_null_ids", asset="pair_scores", blocking=True),
        dg.AssetCheckSpec(
            "customers_with_history_have_scores",
            asset="pair_scores",
            blocking=True,
            description="Every customer who bought something in the window gets a ranking.",
        ),
    ],
)
def pair_scores(
    context: dg.AssetExecutionContext,
    config: ScoringConfig,
    launcher: LauncherResource,
    compute: ComputeResource,
    artifacts: ArtifactsResource,
    dlrm_model: TrainedModel,
    customers: pl.DataFrame,
    products: pl.DataFrame,
    transactions: pl.DataFrame,
):
    """The model's top N products per customer over ALL products, past purchases excluded (configurable).

    In process it scores on the compute resource's device (a GPU when there is one, under `auto`).
    """
    # Dagster stores a model before its blocking checks fail the run: one that failed either stays unscored.
    failed = gate_failure(artifacts.path("evaluations", dlrm_model.version))
    if dlrm_model.metrics.get("passed_validation_auc_floor") is False:
        failed = f"it failed validation_auc_floor (AUC {dlrm_model.metrics.get('validation_auc')})"
    if failed is not None:
        raise dg.Failure(f"dlrm_model {dlrm_model.version} is stored but not scored: {failed}; train this date again")
    otherwise = judged_otherwise(artifacts.path("evaluations", dlrm_model.version), "pair_scores",
                                 exclude_purchased=config.exclude_purchased,
                                 exclude_window_days=config.exclude_window_days)
    if otherwise:
        raise dg.Failure("; ".join(otherwise) + ": the gate passed another ranking than this one. Set "
                         "model_evaluation's config to match and materialize it again, or this step's back")
    try:
        window = Window.last_days(feed_date_of(context), config.exclude_window_days)
        chosen = precision(config.dtype)
    except ValueError as e:
        raise dg.Failure(f"pair_scores config: {e}") from None
    in_window = window_transactions(transactions, window)
    exclude = purchased_pairs(in_window) if config.exclude_purchased else None
    unavailable = unavailable_products(products)  # the input config's products.available, when it names one
    n_unavailable = 0 if unavailable is None else unavailable.len()
    if n_unavailable == products.height:
        raise dg.Failure(f"all {products.height:,} products are unavailable (their products.available column is "
                         "false or empty): there is nothing to recommend, so yesterday's feed stays current")
    timings: dict[str, float] = {}
    device = None  # the launcher's ranks pick their own (and warn for themselves)
    # Where this process runs bf16: the scoring in process, and the fidelity check below either way
    # (on the launcher path the model stays on this host's CPU).
    here = compute.torch_device() if launcher.in_process else torch.device("cpu")
    slow = emulated_precision_warning(here, chosen.dtype)
    if slow is not None:
        context.log.warning(f"pair_scores dtype {config.dtype}: {slow}")
    if launcher.in_process:
        device = here
        dlrm_model = dlrm_model.to(device)  # the IO manager loads it on the CPU
        scores = model_ranking(
            dlrm_model, customers, products, top_n=config.top_n, exclude=exclude, unavailable=unavailable,
            dtype=chosen.dtype, rerank=chosen.rerank, timings=timings,
        )
        ranks = 1
    else:  # torchrun or a pod, through Dagster Pipes (feedpipe/defs/launchers.py)
        scores, summary = launcher.rank(
            context, dlrm_model, customers, products, top_n=config.top_n, exclude=exclude, dtype=config.dtype,
            unavailable=unavailable, device=compute.device,
        )
        ranks = summary["ranks"]
        timings = {"scoring_s": summary["scoring_seconds"]}
    fidelity = {}
    if config.dtype != "fp32":  # bf16's ranking against fp32's on this model, for a sample of customers
        fidelity[f"top20_overlap_{config.dtype}_vs_fp32"] = round(
            top_k_overlap(dlrm_model, customers, products, dtype=chosen.dtype, rerank=chosen.rerank), 4
        )
    scored = products if unavailable is None else products.filter(~pl.col(PRODUCT_ID).is_in(unavailable.implode()))
    pairs = customers.height * scored.height
    null_ids = scores.filter(pl.col(CUSTOMER_ID).is_null() | pl.col(PRODUCT_ID).is_null()).height
    with_history, missing, exhausted = customers_without_scores(in_window, scores, scored, exclude)
    yield dg.Output(
        scores,
        metadata=frame_metadata(
            scores,
            customers=scores.get_column(CUSTOMER_ID).n_unique(),
            pairs_scored=pairs,  # of the products that may be recommended
            products_unavailable=n_unavailable,
            # pairs_per_s is the scorer's alone, as benchmarks/scoring.py measures it; the other
            # seconds show what encoding, exclusions and the frame add around it (in-process only)
            pairs_per_s=round(pairs / max(timings["scoring_s"], 1e-9)),
            **{k.removesuffix("_s") + "_seconds": round(v, 2) for k, v in timings.items()},
            dtype=config.dtype,
            device=str(device) if device is not None else "launcher ranks",
            **fidelity,
            ranks=ranks,
            top_n=config.top_n,  # ranked_feed refuses a k above it
            model_version=dlrm_model.version,
            # Dagster stores the scores before the blocking checks below fail the run: ranked_feed run on its own
            # later reads these to refuse scores that failed them.
            passed_blocking_checks=bool(null_ids == 0 and missing == 0),
        ),
    )
    yield dg.AssetCheckResult(check_name="no_null_ids", passed=null_ids == 0, metadata={"null_id_rows": null_ids})
    yield dg.AssetCheckResult(
        check_name="customers_with_history_have_scores",
        passed=missing == 0,
        metadata={"customers_with_history": with_history, "missing": missing, "bought_every_product": exhausted},
    )


@dg.asset(
    partitions_def=feed_date_partitions,
    group_name="feed",
    kinds={"postgres"},
    check_specs=[dg.AssetCheckSpec(
        "published_rows_match", asset="ranked_feed",
        description="The published version's table, counted in the database after the switch, holds every row "
                    "and customer that was sent.",
    )],
)
def ranked_feed(
    context: dg.AssetExecutionContext,
    config: FeedConfig,
    database: DatabaseResource,
    artifacts: ArtifactsResource,
    pair_scores: pl.DataFrame,
    dlrm_model: TrainedModel,
) -> dg.MaterializeResult:
    """Top K per customer, COPY'd into a new versioned table and switched into `feedpipe.current_feed` atomically."""
    scored = latest_metadata(context.instance, "pair_scores", context.partition_key)
    if scored.get("passed_blocking_checks") is False:
        raise dg.Failure(
            f"pair_scores for {context.partition_key} is stored but failed its blocking checks (no_null_ids or "
            "customers_with_history_have_scores): it is not published; materialize pair_scores again"
        )
    top_n = int(scored["top_n"]) if "top_n" in scored else None
    if top_n is not None and config.k > top_n:
        raise dg.Failure(
            f"ranked_feed's k is {config.k} but pair_scores kept only its top {top_n} products per customer: "
            f"the feed would be cut at {top_n}. Raise pair_scores' top_n to at least {config.k}, or lower k."
        )
    feed = pair_scores.filter(pl.col(RANK) <= config.k).sort(CUSTOMER_ID, RANK)
    # The model that made these scores: a later dlrm_model of this date (one that failed its check, say)
    # may have replaced the stored model since pair_scores ran.
    model_version = scored.get("model_version") or dlrm_model.version
    # Another length is the same ranking cut elsewhere (other exclusions would not be: pair_scores refuses those)
    otherwise = judged_otherwise(artifacts.path("evaluations", model_version), "ranked_feed", k=config.k)
    if otherwise:
        context.log.warning("; ".join(otherwise) + ": the gate measured recall on another feed length")
    result = publish_feed(
        database.url(),
        FeedArrays(
            customer_id=feed.get_column(CUSTOMER_ID).to_arrow(),
            product_id=feed.get_column(PRODUCT_ID).to_arrow(),
            rank=feed.get_column(RANK).to_numpy(),
            score=feed.get_column(SCORE).to_numpy(),
        ),
        feed_date=feed_date_of(context),
        model_version=model_version,
        run_id=context.run_id,
        retention=config.retention,
        replace_newer=config.serve_older_feed_date,
    )
    # Read back after the switch, apart from the COPY's own count (which publish_feed has already checked):
    # what readers of this version's table will find.
    customers_sent = result.customers  # counted from what was sent, beside the COPY
    unreadable = None
    try:
        with connect(database.url()) as conn:
            in_table, customers_in_table = version_counts(conn, result.version)
    except (DatabaseError, psycopg.Error, LookupError) as e:
        # The feed is published and served: a read-back that cannot run (a later publish's retention dropped the
        # table, the server went away) fails the check, not the step, which would publish the feed again.
        in_table = customers_in_table = -1
        unreadable = f"the published table could not be counted: {type(e).__name__}: {e}"
    if not result.served:
        context.log.warning(
            f"feed version {result.version} for {feed_date_of(context)} is loaded but not served: the served feed is "
            f"for {result.served_feed_date}, which is newer (set serve_older_feed_date to serve this one)"
        )
    return dg.MaterializeResult(
        metadata={
            "dagster/row_count": result.rows,
            "feed_version": result.version,
            "table": result.table_name,
            "customers": result.customers,
            "k": config.k,
            "publish_seconds": round(result.seconds, 2),
            "model_version": model_version,
            "view": "feedpipe.current_feed",
            "served": result.served,
            "served_feed_date": str(result.served_feed_date),
        },
        check_results=[
            dg.AssetCheckResult(
                check_name="published_rows_match",
                passed=in_table == feed.height and customers_in_table == customers_sent,
                metadata={"rows_sent": feed.height, "rows_in_table": in_table,
                          "customers_sent": customers_sent, "customers_in_table": customers_in_table},
                description=unreadable,
            )
        ],
    )
