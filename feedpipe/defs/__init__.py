"""The Dagster layer: thin assets over the core modules, resources, checks and the nightly schedule."""
