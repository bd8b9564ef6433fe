"""The nightly job and its 02:00 UTC schedule (feed dates are UTC days: `contract.utc_today`, and the
partitions' own timezone, which the schedule keeps)."""

import dagster as dg

from feedpipe.defs.partitions import feed_date_partitions

nightly_feed = dg.define_asset_job(
    "nightly_feed",
    selection=dg.AssetSelection.all(),
    partitions_def=feed_date_partitions,
    description="Raw transactions to a ranked feed in Postgres for one feed date.",
)

nightly_schedule = dg.build_schedule_from_partitioned_job(
    nightly_feed, hour_of_day=2, minute_of_hour=0, name="nightly_feed_0200"
)
