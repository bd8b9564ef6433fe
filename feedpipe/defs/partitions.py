"""Daily partitions keyed by feed date. end_offset=1 makes today's date a partition, so the 02:00 run
builds today's feed from every transaction before today."""

import dagster as dg

feed_date_partitions = dg.DailyPartitionsDefinition(start_date="2000-01-01", end_offset=1)
