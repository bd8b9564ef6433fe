"""Input assets: the three contract tables, loaded and quarantined by the core, and the checks on what came in.

Each asset reads its table (a file in the data directory, or a Postgres export when the input config names one),
writes the rejected rows to `<artifacts>/rejected/<table>/<feed date>.parquet` (always, empty when none), records
counts per reason in metadata, and applies its rejection policy (the asset's config). Transactions are checked
against the accepted customers and products, so they depend on those two assets.

Transactions are checked a chunk at a time (`stream_transactions`, `chunk_rows` of the input config): accepted rows
go straight to a Parquet file that becomes the asset's output, and the checks below read it lazily, so for a
Parquet file or a Postgres source this step's memory is set by the chunk size and the customer and product ids,
not by the number of transactions (a CSV file is read whole).

A fatal input problem or a policy breach fails the asset with the loader's message (file, column, rows, what was
expected); nothing downstream runs, so the feed being served stays as it is.
"""

import shutil
import time
from collections.abc import Callable
from datetime import date
from pathlib import Path

import dagster as dg
import polars as pl
from pydantic import Field, model_validator

from feedpipe.contract import AVAILABLE, CUSTOMER_ID, CUSTOMERS, PRODUCT_ID, PRODUCTS, TRANSACTIONS, TS
from feedpipe.database import DatabaseError
from feedpipe.defs.io_manager import latest_partition_before
from feedpipe.defs.metadata import frame_metadata, markdown_table, table_metadata
from feedpipe.defs.partitions import feed_date_partitions
from feedpipe.defs.resources import ArtifactsResource, DataResource
from feedpipe.input_config import InputError
from feedpipe.input_health import counts_per_day, daily_volume, freshness, vocabulary_drift
from feedpipe.input_tables import References, open_table, stream_transactions
from feedpipe.quarantine import REASONS, RejectionPolicy, RejectionReport, TableLoad, enforce_policy, write_rejected
from feedpipe.sources import infer_features, load_customers, load_products
from feedpipe.spooled_load import SpooledLoad, SpooledParquet
from feedpipe.table_files import StoredTable
from feedpipe.vocabularies import Vocabularies, side_specs

REJECTED_DIR = "rejected"
SPOOL_DIR = "spool"
# Spool entries (Postgres exports, transactions being written) live as long as their step; one older than
# this was left by a step that was killed (SIGKILL, out of memory) before it could clean up.
STALE_SPOOL_SECONDS = 24 * 3600


def sweep_spool(spool: Path, older_than_s: float = STALE_SPOOL_SECONDS) -> list[Path]:
    """Remove what killed steps left in the spool directory; returns what was removed."""
    if not spool.is_dir():
        return []
    cutoff = time.time() - older_than_s
    removed = []
    for entry in spool.iterdir():
        try:
            if entry.stat().st_mtime >= cutoff:
                continue
            if entry.is_dir():
                shutil.rmtree(entry)
            else:
                entry.unlink()
            removed.append(entry)
        except FileNotFoundError:  # another step removed it first
            pass
    return removed


def feed_date_of(context: dg.AssetExecutionContext) -> date:
    return date.fromisoformat(context.partition_key)


class RejectionPolicyConfig(dg.Config):
    """How many bad rows a table may have before the run stops, and what makes a value absurd."""

    max_rejected_fraction: float = Field(
        default=0.01, description="Fail the table when rejected / received rows is above this (0: none, 1: never)."
    )
    exempt_reasons: list[str] = Field(
        default=[],
        description=f"Reasons still rejected and counted but not held against the fraction; one of {', '.join(REASONS)}. "
        "A backfill over a later export exempts ts_after_feed_date.",
    )
    max_id_chars: int = Field(default=256, description="Longer ids are rejected (text_too_long).")
    max_text_chars: int = Field(default=1024, description="Longer text attribute values are rejected (text_too_long).")

    # Checked when the config is built (InputError is a ValueError, so pydantic reports it): `feedpipe run`
    # builds every asset's config before any step runs.
    @model_validator(mode="after")
    def _consistent(self) -> "RejectionPolicyConfig":
        self.policy()
        return self

    def policy(self) -> RejectionPolicy:
        return RejectionPolicy(self.max_rejected_fraction, tuple(self.exempt_reasons), self.max_id_chars,
                               self.max_text_chars)


class TransactionsConfig(RejectionPolicyConfig):
    max_age_days: float = Field(default=2.0, ge=0, description="Freshness check: newest transaction at most this many days before the feed date.")
    volume_trailing_days: int = Field(default=28, ge=1, description="Volume check: days the median daily count is taken over.")
    volume_max_change: float = Field(default=0.5, ge=0, description="Volume check warns when the last day differs from the median by more than this share.")


class AttributeTableConfig(RejectionPolicyConfig):
    max_oov_share: float = Field(default=0.2, ge=0, le=1, description="Drift check warns when a feature has more than this share of values the last vocabulary does not know.")


def _drift_spec(table: str) -> dg.AssetCheckSpec:
    return dg.AssetCheckSpec("vocabulary_drift", asset=table,
                             description="Share of values unknown to the last night's vocabularies (warning).")


def _attribute_table(context: dg.AssetExecutionContext, table: str, config: AttributeTableConfig, data: DataResource,
                     artifacts: ArtifactsResource, loader):
    """What the customers and products assets do: load, quarantine, output with features, drift check."""
    policy = config.policy()
    load = _load(context, table, data, artifacts, policy, lambda stored: loader(stored, data.config(), policy))
    yield _output(load, context, artifacts, features=_features(table, load.accepted, data),
                  **_availability_metadata(load.accepted))
    yield _drift_check(context, table, load.accepted, data, artifacts, config.max_oov_share)


@dg.asset(partitions_def=feed_date_partitions, group_name="input", kinds={"polars"},
          check_specs=[_drift_spec(CUSTOMERS)])
def customers(context: dg.AssetExecutionContext, config: AttributeTableConfig, data: DataResource,
              artifacts: ArtifactsResource):
    """Customer ids (as text) and attributes typed by role; rejected rows set aside with their reason."""
    yield from _attribute_table(context, CUSTOMERS, config, data, artifacts, load_customers)


@dg.asset(partitions_def=feed_date_partitions, group_name="input", kinds={"polars"},
          check_specs=[_drift_spec(PRODUCTS)])
def products(context: dg.AssetExecutionContext, config: AttributeTableConfig, data: DataResource,
             artifacts: ArtifactsResource):
    """Product ids (as text) and attributes typed by role: the catalogue every customer is scored against."""
    yield from _attribute_table(context, PRODUCTS, config, data, artifacts, load_products)


@dg.asset(
    partitions_def=feed_date_partitions,
    group_name="input",
    kinds={"polars"},
    check_specs=[
        dg.AssetCheckSpec("referential_integrity", asset=TRANSACTIONS, blocking=True,
                          description="Every accepted transaction names an accepted customer and product."),
        dg.AssetCheckSpec("freshness", asset=TRANSACTIONS,
                          description="The newest transaction is at most max_age_days before the feed date."),
        dg.AssetCheckSpec("daily_volume", asset=TRANSACTIONS,
                          description="The last day's count against the trailing median (warning)."),
    ],
)
def transactions(context: dg.AssetExecutionContext, config: TransactionsConfig, data: DataResource,
                 artifacts: ArtifactsResource, customers: pl.DataFrame, products: pl.DataFrame):
    """Every transaction before the feed date (the feed for day D is built from what happened before D) that names
    an accepted customer and product; later and dangling rows are rejected with their reason."""
    feed_date = feed_date_of(context)
    policy = config.policy()
    references = References.of(customers, products)
    rejected_path = _rejected_path(context, TRANSACTIONS, artifacts)
    # Beside the artifacts, so that handing the file to the IO manager is a rename.
    accepted_path = artifacts.path(SPOOL_DIR, f"{TRANSACTIONS}-{context.partition_key}-{context.run_id}.parquet")

    def load(stored: StoredTable) -> SpooledLoad:
        return stream_transactions(stored, references, accepted_path, rejected_path, policy, feed_date,
                                   data.config().chunk_rows)

    try:
        tx = _load(context, TRANSACTIONS, data, artifacts, policy, load)
        if tx.accepted_rows == 0:
            raise dg.Failure(f"{tx.source}: no transactions accepted before the feed date {feed_date}")
        accepted = tx.scan_accepted()
        span = accepted.select(pl.col(TS).min().alias("first"), pl.col(TS).max().alias("last"))
        first_ts, last_ts = span.collect(engine="streaming").row(0)
        per_day = counts_per_day(accepted)
        dangling = accepted.filter(
            ~pl.col(CUSTOMER_ID).is_in(customers.get_column(CUSTOMER_ID))
            | ~pl.col(PRODUCT_ID).is_in(products.get_column(PRODUCT_ID))
        ).select(pl.len()).collect(engine="streaming").item()
        schema = accepted.collect_schema()
    except BaseException:
        accepted_path.unlink(missing_ok=True)
        raise
    metadata = table_metadata(schema, tx.accepted_rows, **_rejection_metadata(tx, rejected_path),
                              first_ts=str(first_ts), last_ts=str(last_ts))
    yield dg.Output(SpooledParquet(accepted_path), metadata=metadata)
    yield _integrity_check(tx, dangling)

    fresh = freshness(last_ts, feed_date, config.max_age_days)
    yield dg.AssetCheckResult(
        check_name="freshness",
        passed=fresh.passed,
        metadata={"latest_ts": str(fresh.latest), "age_days": round(fresh.age_days, 2), "max_age_days": config.max_age_days},
        description=None if fresh.passed else f"the newest transaction ({fresh.latest}) is {fresh.age_days:.1f} days "
        f"before the feed date; is the export still updating?",
    )
    volume = daily_volume(per_day, feed_date, config.volume_trailing_days, config.volume_max_change)
    yield dg.AssetCheckResult(
        check_name="daily_volume",
        passed=not volume.anomalous,
        severity=dg.AssetCheckSeverity.WARN,
        metadata={
            "day": str(volume.day),
            "count": volume.count,
            "trailing_median": volume.trailing_median if volume.trailing_median is not None else "n/a",
            "trailing_days": volume.trailing_days,
            "change": round(volume.change, 4) if volume.change is not None else "n/a",
            "max_change": config.volume_max_change,
        },
    )


# --- shared steps ----------------------------------------------------------------------------------------------------


def _load(context: dg.AssetExecutionContext, table: str, data: DataResource, artifacts: ArtifactsResource,
          policy: RejectionPolicy, loader: Callable[[StoredTable], RejectionReport]) -> RejectionReport:
    """Read, quarantine, write the rejected rows, enforce the policy; input problems become a `dg.Failure`.

    A `TableLoad` is in memory and its rejected rows are written here; a `SpooledLoad` wrote its own as it went.
    """
    rejected_path = _rejected_path(context, table, artifacts)
    rejected_path.unlink(missing_ok=True)  # a stale file from an earlier run of this partition would mislead
    for stale in sweep_spool(artifacts.path(SPOOL_DIR)):
        context.log.warning(f"removed {stale}, left in the spool by a step that did not finish")
    try:
        input_config = data.config()
        data_dir = data.directory() if input_config.postgres is None else None
        with open_table(table, data_dir, input_config, artifacts.path(SPOOL_DIR)) as stored:
            load = loader(stored)
        if isinstance(load, TableLoad):
            write_rejected(load, rejected_path)
        enforce_policy(load, policy, rejected_path)
    except (InputError, DatabaseError) as exc:
        metadata = _rejection_metadata(exc.load, rejected_path) if hasattr(exc, "load") else {}
        raise dg.Failure(description=str(exc), metadata=metadata, allow_retries=False) from None
    accepted = load.received - load.rejected_rows
    context.log.info(f"{table}: {accepted:,} of {load.received:,} rows accepted from {load.source}")
    return load


def _rejected_path(context: dg.AssetExecutionContext, table: str, artifacts: ArtifactsResource) -> Path:
    return artifacts.path(REJECTED_DIR, table, f"{context.partition_key}.parquet")


def _rejection_metadata(load: RejectionReport, rejected_path: Path) -> dict:
    counts = load.counts()
    return {
        "rows_received": load.received,
        "rows_accepted": load.received - load.rejected_rows,
        "rows_rejected": load.rejected_rows,
        "rejected_by_reason": markdown_table(counts.to_dicts()),
        "rejected_counts": dg.MetadataValue.json(load.counts_by_reason()),
        "rejected_rows": dg.MetadataValue.path(str(rejected_path)),
        "source": load.source,
    }


def _output(load: TableLoad, context: dg.AssetExecutionContext, artifacts: ArtifactsResource, **extra) -> dg.Output:
    metadata = frame_metadata(load.accepted, **_rejection_metadata(load, _rejected_path(context, load.table, artifacts)), **extra)
    return dg.Output(load.accepted, metadata=metadata)


def _availability_metadata(df: pl.DataFrame) -> dict[str, int]:
    """Accepted products that may and may not be recommended (products.available in the input config), if told."""
    if AVAILABLE not in df.columns:
        return {}
    available = int(df.get_column(AVAILABLE).sum())
    return {"available": available, "unavailable": df.height - available}


def _features(table: str, df: pl.DataFrame, data: DataResource) -> dg.MetadataValue:
    return markdown_table([{"column": s.name, "role": s.role} for s in infer_features(table, df, data.config())])


def _integrity_check(tx: RejectionReport, dangling: int) -> dg.AssetCheckResult:
    """`dangling`: accepted rows whose customer or product is not among the accepted ones (0 by construction)."""
    counts = tx.counts_by_reason()
    return dg.AssetCheckResult(
        check_name="referential_integrity",
        passed=dangling == 0,
        metadata={
            "accepted_rows_with_unknown_ids": dangling,
            **{f"rejected_{r}": counts.get(r, 0) for r in ("unknown_customer", "unknown_product", "id_matches_only_as_number")},
        },
    )


def _drift_check(context: dg.AssetExecutionContext, table: str, frame: pl.DataFrame, data: DataResource,
                 artifacts: ArtifactsResource, max_oov_share: float) -> dg.AssetCheckResult:
    previous_dir = latest_partition_before(artifacts.path(), "vocabularies", context.partition_key)
    if previous_dir is None:
        return dg.AssetCheckResult(check_name="vocabulary_drift", passed=True, severity=dg.AssetCheckSeverity.WARN,
                                   metadata={"baseline": "none (no earlier vocabularies)"})
    drift = vocabulary_drift(frame, side_specs(table, frame, data.config()), Vocabularies.load(previous_dir))
    drifted = [d for d in drift if d.oov_share > max_oov_share]
    return dg.AssetCheckResult(
        check_name="vocabulary_drift",
        passed=not drifted,
        severity=dg.AssetCheckSeverity.WARN,
        metadata={
            "baseline": previous_dir.name,
            "max_oov_share": max_oov_share,
            "oov_share": markdown_table([{"feature": d.feature, "oov_share": d.oov_share} for d in drift]),
        },
        description=None if not drifted else "out-of-vocabulary share above the limit: "
        + ", ".join(f"{d.feature} {d.oov_share:.1%}" for d in drifted),
    )

