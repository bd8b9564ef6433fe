"""feedpipe: raw transactions -> encoded vocabularies -> DLRM (TorchRec) -> all-pairs scores -> ranked feeds in Postgres.

The modules in this package are the core: plain polars/torch/SQL with no Dagster import.
The Dagster layer lives in `feedpipe.defs` and `feedpipe.definitions`.
"""

import logging

# Importing torchrec trips a torch.fx deprecation warning on every CLI call; it is not ours to fix.
logging.getLogger("torch.fx._symbolic_trace").setLevel(logging.ERROR)

__version__ = "0.1.0"
