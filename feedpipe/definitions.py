"""Dagster entry point (workspace.yaml): `feedpipe ui` starts the UI on it with the instance's storage and inputs
set; a bare `dagster dev` needs FEEDPIPE_DAGSTER_STORAGE_URL and FEEDPIPE_DATA_DIR set first (see dagster.yaml)."""

import dagster as dg

from feedpipe.defs import evaluation, feed, ingest, modeling
from feedpipe.defs.console_logger import console_logger
from feedpipe.defs.io_manager import ArtifactIOManager
from feedpipe.defs.jobs import nightly_feed, nightly_schedule
from feedpipe.defs.launchers import LauncherResource
from feedpipe.defs.resources import ArtifactsResource, ComputeResource, DatabaseResource, DataResource


def build_resources(artifacts_root: str = "", data_dir: str = "", input_config: str = "") -> dict:
    """Resources with defaults from the environment; tests and notebooks pass explicit paths.

    The artifacts root is configured at launch and shared: a root set in a run's config (the UI's
    launchpad) reaches the IO manager and the launcher as well as the assets. As a fully built
    instance nested in them, each would keep its own copy, and the assets would read one root while
    the IO manager wrote another.
    """
    artifacts = ArtifactsResource.configure_at_launch(root=artifacts_root)
    return {
        "data": DataResource(data_dir=data_dir, input_config=input_config),
        "artifacts": artifacts,
        "database": DatabaseResource(),
        "compute": ComputeResource(),
        "launcher": LauncherResource(artifacts=artifacts),
        "io_manager": ArtifactIOManager(artifacts=artifacts),
    }


defs = dg.Definitions(
    assets=dg.load_assets_from_modules([ingest, modeling, evaluation, feed]),
    asset_checks=dg.load_asset_checks_from_modules([ingest, modeling, evaluation, feed]),
    jobs=[nightly_feed],
    schedules=[nightly_schedule],
    resources=build_resources(),
    loggers={"console": console_logger},  # failures' messages without stack traces on a terminal
)
