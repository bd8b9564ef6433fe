"""feedpipe: raw transactions -> encoded vocabularies -> DLRM (TorchRec) -> all-pairs scores -> ranked feeds in Postgres.

The modules in this package are the core: plain polars/torch/SQL with no Dagster import.
The Dagster layer lives in `feedpipe.defs` and `feedpipe.definitions`.
"""

__version__ = "0.1.0"
