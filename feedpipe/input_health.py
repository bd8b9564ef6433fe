"""Whether the night's accepted input looks like the nights before it: freshness, daily volume, vocabulary drift.

Valid rows can still be the wrong data: an export that stopped updating, a day with half the usual orders, a
category column whose values were renamed upstream. These are measured here in plain polars; the Dagster asset checks
in `feedpipe/defs/ingest.py` report them (freshness as an error, volume and drift as warnings).
"""

from __future__ import annotations

from dataclasses import dataclass
from datetime import date, datetime, timedelta

import polars as pl

from feedpipe.contract import CUSTOMER_ID, DENSE, PRODUCT_ID, TS
from feedpipe.sources import FeatureSpec
from feedpipe.vocabularies import Vocabularies, feature_key, oov_share


@dataclass(frozen=True)
class Freshness:
    """The newest accepted transaction against the feed date's midnight."""

    latest: datetime | None
    age_days: float | None
    max_age_days: float

    @property
    def passed(self) -> bool:
        return self.age_days is not None and self.age_days <= self.max_age_days


def freshness(ts: pl.Series | datetime | None, feed_date: date, max_age_days: float) -> Freshness:
    """`ts`: the accepted timestamps, or only the newest of them (None: there are none)."""
    latest = ts.max() if isinstance(ts, pl.Series) else ts
    if latest is None:
        return Freshness(None, None, max_age_days)
    age = datetime.combine(feed_date, datetime.min.time()) - latest
    return Freshness(latest, age / timedelta(days=1), max_age_days)


@dataclass(frozen=True)
class DailyVolume:
    """Transactions on the last day before the feed date against the median of the days before it."""

    day: date
    count: int
    trailing_median: float | None
    trailing_days: int
    max_change: float

    @property
    def change(self) -> float | None:
        """count / median - 1: -0.5 is half the usual volume; None without a usable median."""
        if not self.trailing_median:
            return None
        return self.count / self.trailing_median - 1.0

    @property
    def anomalous(self) -> bool:
        change = self.change
        return change is not None and abs(change) > self.max_change


def counts_per_day(ts: pl.Series | pl.LazyFrame) -> pl.DataFrame:
    """`day` (Date), `n`: transactions per calendar day, sorted. A lazy frame with a `ts` column (the accepted
    transactions on disk) is counted by polars' streaming engine, so the column is never held whole."""
    frame = ts.to_frame(TS) if isinstance(ts, pl.Series) else ts.select(TS)
    per_day = frame.lazy().group_by(pl.col(TS).dt.date().alias("day")).agg(pl.len().cast(pl.Int64).alias("n"))
    return per_day.drop_nulls("day").sort("day").collect(engine="streaming")


def daily_volume(ts: pl.Series | pl.DataFrame, feed_date: date, trailing_days: int, max_change: float) -> DailyVolume:
    """Counts per calendar day (days without transactions count 0) over the `trailing_days` before the last day,
    starting no earlier than the first transaction (an export that began last week has a week of history).

    `ts`: the accepted timestamps, or their `counts_per_day`.
    """
    per_day = counts_per_day(ts) if isinstance(ts, pl.Series) else ts
    day = feed_date - timedelta(days=1)
    count = int(per_day.filter(pl.col("day") == day).get_column("n").sum())
    first = per_day.get_column("day").min()
    start = max(first, day - timedelta(days=trailing_days)) if first is not None else day
    if start >= day:
        return DailyVolume(day, count, None, 0, max_change)
    calendar = pl.DataFrame({"day": pl.date_range(start, day - timedelta(days=1), "1d", eager=True)})
    trailing = calendar.join(per_day, on="day", how="left").get_column("n").fill_null(0)
    return DailyVolume(day, count, float(trailing.median()), trailing.len(), max_change)


@dataclass(frozen=True)
class FeatureDrift:
    """Share of a feature's non-null values that an earlier night's vocabulary does not know."""

    feature: str
    oov_share: float


def vocabulary_drift(frame: pl.DataFrame, specs: list[FeatureSpec], vocabularies: Vocabularies) -> list[FeatureDrift]:
    """One entry per categorical feature of `specs` (ids included) that `vocabularies` has; dense features and
    features new since then are skipped (a new column has no baseline to drift from)."""
    known = set(vocabularies.features())
    drift = []
    for spec in specs:
        key = feature_key(spec)
        if spec.role == DENSE or key not in known or spec.name not in frame.columns:
            continue
        # Ids get a row whatever their count (min count 0); other values need the vocabulary's min_count.
        min_count = 1 if spec.name in (CUSTOMER_ID, PRODUCT_ID) else vocabularies.min_count
        drift.append(FeatureDrift(key, oov_share(frame.get_column(spec.name), vocabularies.for_feature(key), spec.role,
                                                 min_count)))
    return drift
