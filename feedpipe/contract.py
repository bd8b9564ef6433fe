"""The input contract: table and column names, defined once and imported everywhere.

A data directory holds `transactions`, `customers` and `products`, each as `.parquet` or `.csv`.
After loading, ids are always text (`pl.Utf8`) exactly as they came in, so a feed gives them back unchanged.
"""

from __future__ import annotations

from datetime import date, datetime, timezone

TRANSACTIONS = "transactions"
CUSTOMERS = "customers"
PRODUCTS = "products"
TABLES = (TRANSACTIONS, CUSTOMERS, PRODUCTS)
FILE_SUFFIXES = (".parquet", ".csv")

CUSTOMER_ID = "customer_id"
PRODUCT_ID = "product_id"
TS = "ts"
QUANTITY = "quantity"

# Columns every table must have (quantity is optional and defaults to 1).
# Columns the loader adds to rejected rows (their row number, reason and the column at fault): an input
# column of one of these names would be overwritten, so it is refused.
BOOKKEEPING_COLUMNS = ("_row", "_reason", "_column")
# The products frame's availability (Boolean: false for a product never to be recommended), read from the column
# the input config names under `products.available`; reserved like the bookkeeping columns, so an input column of
# this name can never be taken for it.
AVAILABLE = "_available"
RESERVED_COLUMNS = (*BOOKKEEPING_COLUMNS, AVAILABLE)
REQUIRED_COLUMNS = {
    TRANSACTIONS: (CUSTOMER_ID, PRODUCT_ID, TS),
    CUSTOMERS: (CUSTOMER_ID,),
    PRODUCTS: (PRODUCT_ID,),
}
ID_COLUMN = {CUSTOMERS: CUSTOMER_ID, PRODUCTS: PRODUCT_ID}
# Every column the loader reads from transactions; any other column is ignored (customers and products keep theirs as
# attributes).
TRANSACTION_COLUMNS = (CUSTOMER_ID, PRODUCT_ID, TS, QUANTITY)

# Feature roles, inferred from dtypes unless the YAML config overrides them.
DENSE = "dense"
CATEGORICAL = "categorical"
MULTI_CATEGORICAL = "multi_categorical"
ROLES = (DENSE, CATEGORICAL, MULTI_CATEGORICAL)

DEFAULT_DELIMITER = "|"

# A data directory's own input config (a CSV export names its multi-valued columns there), read when no other
# config file is given.
INPUT_CONFIG_FILE = "feedpipe.yaml"

# The generator's truth file beside a demo data set; the pipeline never reads it for training.
TRUTH_FILE = "truth.parquet"


def utc_today(now: datetime | None = None) -> date:
    """Today's feed date. Feed dates are UTC days, as the partitions and the nightly schedule count them:
    a default taken from the host's local clock would name yesterday's or tomorrow's partition near midnight."""
    now = now or datetime.now(timezone.utc)
    return now.astimezone(timezone.utc).date()
