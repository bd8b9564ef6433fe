"""Small encoded data sets built in code, shared by the model, training and ranking tests."""

import numpy as np
import polars as pl
import torch

from feedpipe.contract import CATEGORICAL, CUSTOMERS, DENSE, MULTI_CATEGORICAL, PRODUCTS
from feedpipe.feature_tensors import SideTensors
from feedpipe.sources import FeatureSpec
from feedpipe.training_examples import LABEL, SPLIT
from feedpipe.vocabularies import build_vocabularies, encode_table

CUSTOMER_SPECS = [
    FeatureSpec("customer_id", CUSTOMERS, CATEGORICAL),
    FeatureSpec("age", CUSTOMERS, DENSE),
    FeatureSpec("group", CUSTOMERS, CATEGORICAL),
]
PRODUCT_SPECS = [
    FeatureSpec("product_id", PRODUCTS, CATEGORICAL),
    FeatureSpec("price", PRODUCTS, DENSE),
    FeatureSpec("group", PRODUCTS, CATEGORICAL),
    FeatureSpec("tags", PRODUCTS, MULTI_CATEGORICAL),
]


def grouped_data(n_customers=120, n_products=40, groups=3, seed=0):
    """Customers like exactly the products of their own group: learnable from the `group` features."""
    rng = np.random.default_rng(seed)
    customers = pl.DataFrame(
        {
            "customer_id": [f"c{i}" for i in range(n_customers)],
            "age": rng.uniform(18, 80, n_customers),
            "group": [f"g{i % groups}" for i in range(n_customers)],
        }
    )
    products = pl.DataFrame(
        {
            "product_id": [f"p{i}" for i in range(n_products)],
            "price": rng.lognormal(2, 1, n_products),
            "group": [f"g{i % groups}" for i in range(n_products)],
            "tags": [[f"t{(i + k) % 7}" for k in range(1 + i % 3)] for i in range(n_products)],
        }
    )
    vocab = build_vocabularies({CUSTOMERS: customers, PRODUCTS: products}, CUSTOMER_SPECS + PRODUCT_SPECS)
    pairs = customers.select("customer_id", pl.col("group").alias("cg")).join(
        products.select("product_id", pl.col("group").alias("pg")), how="cross"
    )
    pairs = pairs.with_columns(
        (pl.col("cg") == pl.col("pg")).cast(pl.Float32).alias(LABEL),
        pl.when(pl.Series(rng.random(pairs.height)) < 0.8).then(pl.lit("train")).otherwise(pl.lit("validation")).alias(SPLIT),
    ).select("customer_id", "product_id", LABEL, SPLIT)
    enc_c = encode_table(customers, "customer_id", CUSTOMER_SPECS, vocab)
    enc_p = encode_table(products, "product_id", PRODUCT_SPECS, vocab)
    examples = pairs.join(enc_c, on="customer_id").join(enc_p, on="product_id")
    return customers, products, vocab, examples


def random_side(n: int, features, n_dense: int, g: torch.Generator) -> SideTensors:
    """Random encoded rows of one side; multi-valued bags hold 0-3 ids (an empty bag pools to zeros)."""
    sparse = {}
    for f in features:
        lengths = torch.randint(0, 4, (n,), generator=g) if f.multi_valued else torch.ones(n, dtype=torch.long)
        offsets = torch.zeros(n + 1, dtype=torch.long)
        torch.cumsum(lengths, 0, out=offsets[1:])
        sparse[f.name] = (torch.randint(0, f.num_embeddings, (int(offsets[-1]),), generator=g), offsets)
    return SideTensors(torch.randn(n, n_dense, generator=g) * 2, [f.name for f in features], sparse)
