"""feedpipe: raw transactions -> encoded vocabularies -> DLRM (TorchRec) -> all-pairs scores -> ranked feeds in Postgres.

The modules in this package are the core: plain polars/torch/SQL with no Dagster import.
The Dagster layer lives in `feedpipe.defs` and `feedpipe.definitions`.
"""

import logging
import os

# OpenMP threads that spin while waiting make torch 100x slower when the cores are shared (measured:
# an Adam step on a 10k x 16 table took 115 ms instead of 0.8 ms beside one other busy process on
# 2 cores; 0.76 ms with passive waiting). Must be set before torch loads its OpenMP runtime,
# which is why it lives here, first.
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

# Importing torchrec trips a torch.fx deprecation warning on every CLI call; it is not ours to fix.
logging.getLogger("torch.fx._symbolic_trace").setLevel(logging.ERROR)
# RowWiseAdagrad warns on every construction that its (dense) weight decay differs from FBGEMM's
# sparse kernel's; we use the dense optimizer on purpose for unsharded training, so say it once here.
logging.getLogger("torchrec.optim.rowwise_adagrad").setLevel(logging.ERROR)

__version__ = "0.1.0"
