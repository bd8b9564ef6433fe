"""LightGBM on the same encoded features and negatives as the DLRM: the strong tabular baseline.

Single-valued categoricals (ids included) go in as LightGBM categorical features (their vocabulary
indices), dense features as they are, and multi-valued bags as multi-hot columns when the
vocabulary is small (a bag over thousands of values would be thousands of columns; those are
skipped, and named in the evaluation's notes). Ranking scores customers x products in chunks of
customers and keeps each customer's top N, ties broken by catalogue order as the other rankers break
them, so memory is bounded by the chunk.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import polars as pl

from feedpipe.contract import CUSTOMER_ID, DENSE, MULTI_CATEGORICAL, PRODUCT_ID
from feedpipe.ranking import RANK, RANKING_SCHEMA, SCORE, exclusions_for
from feedpipe.sources import FeatureSpec
from feedpipe.training_examples import LABEL, SPLIT, TRAIN, VALIDATION
from feedpipe.vocabularies import Vocabularies, feature_key

MAX_MULTI_HOT = 64


@dataclass
class LightGBMRanker:
    booster: object
    columns: list[str]
    categorical: list[str]
    specs: list[FeatureSpec]
    sizes: dict[str, int]
    best_iteration: int
    rounds: int  # the most it was allowed: best_iteration below it means early stopping ended it
    skipped: tuple[str, ...] = ()  # multi-valued features over MAX_MULTI_HOT values, left out

    def describe(self) -> str:
        stopped = ("early-stopped on the validation split" if self.best_iteration < self.rounds
                   else f"all {self.rounds} rounds: the validation loss was still falling")
        left_out = f"; left out, over {MAX_MULTI_HOT} values: {', '.join(self.skipped)}" if self.skipped else ""
        return f"lightgbm: {self.best_iteration} trees ({stopped}){left_out}"


def _left_out(specs: list[FeatureSpec], sizes: dict[str, int]) -> tuple[str, ...]:
    """Multi-valued features whose vocabulary is too wide for multi-hot columns."""
    return tuple(feature_key(s) for s in specs if s.role == MULTI_CATEGORICAL and sizes[feature_key(s)] > MAX_MULTI_HOT)


def _feature_columns(frame: pl.DataFrame, specs: list[FeatureSpec], sizes: dict[str, int]) -> tuple[pl.DataFrame, list[str]]:
    cols, categorical = [], []
    left_out = _left_out(specs, sizes)
    for spec in specs:
        key = feature_key(spec)
        if spec.role == DENSE:
            cols.append(pl.col(key).cast(pl.Float32))
        elif spec.role == MULTI_CATEGORICAL:
            if key in left_out:
                continue
            cols += [pl.col(key).list.contains(i).cast(pl.Float32).alias(f"{key}={i}") for i in range(sizes[key])]
        else:
            cols.append(pl.col(key).cast(pl.Int32))
            categorical.append(key)
    out = frame.select(cols)
    return out, categorical


def train_lightgbm(
    examples: pl.DataFrame,
    vocabularies: Vocabularies,
    *,
    num_boost_round: int = 300,
    learning_rate: float = 0.1,
    num_leaves: int = 63,
    seed: int = 0,
) -> LightGBMRanker:
    """Binary classifier on the training split, early-stopped on the validation split."""
    import lightgbm as lgb

    specs = vocabularies.customer_specs + vocabularies.product_specs
    sizes = vocabularies.sizes()
    data = {}
    for split in (TRAIN, VALIDATION):
        part = examples.filter(pl.col(SPLIT) == split)
        x, categorical = _feature_columns(part, specs, sizes)
        data[split] = (x, part.get_column(LABEL).to_numpy())
    x_train, y_train = data[TRAIN]
    params = {
        "objective": "binary",
        "learning_rate": learning_rate,
        "num_leaves": num_leaves,
        "min_data_in_leaf": 50,
        "cat_smooth": 10,
        "max_cat_to_onehot": 8,
        "seed": seed,
        "deterministic": True,
        "num_threads": 0,
        "verbose": -1,
    }
    train_set = lgb.Dataset(x_train.to_numpy(), y_train, feature_name=x_train.columns, categorical_feature=categorical, free_raw_data=True)
    valid_set = lgb.Dataset(data[VALIDATION][0].to_numpy(), data[VALIDATION][1], reference=train_set)
    booster = lgb.train(
        params, train_set, num_boost_round=num_boost_round, valid_sets=[valid_set],
        callbacks=[lgb.early_stopping(20, verbose=False)],
    )
    return LightGBMRanker(booster, x_train.columns, categorical, specs, sizes,
                          booster.best_iteration or num_boost_round, num_boost_round, _left_out(specs, sizes))


def lightgbm_ranking(
    ranker: LightGBMRanker,
    encoded_customers: pl.DataFrame,
    encoded_products: pl.DataFrame,
    *,
    top_n: int,
    exclude: pl.DataFrame | None = None,
    customers_per_chunk: int = 256,
) -> pl.DataFrame:
    """Top-N per customer by the booster's score over every product, exclusions applied."""
    c_ids, p_ids = encoded_customers.get_column(CUSTOMER_ID), encoded_products.get_column(PRODUCT_ID)
    ex = exclusions_for(exclude, c_ids, p_ids)
    n_p = encoded_products.height
    k = min(top_n, n_p)
    rows_out, scores_out = [], []
    for start in range(0, encoded_customers.height, customers_per_chunk):
        block = encoded_customers.slice(start, customers_per_chunk)
        grid = block.join(encoded_products, how="cross")
        x, _ = _feature_columns(grid, ranker.specs, ranker.sizes)
        scores = ranker.booster.predict(x.select(ranker.columns).to_numpy(), num_iteration=ranker.best_iteration)
        scores = scores.reshape(block.height, n_p)
        lo, hi = int(ex.offsets[start]), int(ex.offsets[start + block.height])
        if hi > lo:
            lengths = (ex.offsets[start + 1 : start + block.height + 1] - ex.offsets[start : start + block.height]).numpy()
            scores[np.repeat(np.arange(block.height), lengths), ex.values[lo:hi].numpy()] = -np.inf
        top = _top_k_columns(scores, k)
        top_scores = np.take_along_axis(scores, top, axis=1)
        order = np.argsort(-top_scores, axis=1, kind="stable")
        rows_out.append(np.take_along_axis(top, order, axis=1))
        scores_out.append(np.take_along_axis(top_scores, order, axis=1))
    rows = np.concatenate(rows_out) if rows_out else np.zeros((0, k), dtype=np.int64)
    scores = np.concatenate(scores_out) if scores_out else np.zeros((0, k))
    keep = np.isfinite(scores).reshape(-1)
    n_c = rows.shape[0]
    return pl.DataFrame(
        {
            CUSTOMER_ID: c_ids.gather(np.repeat(np.arange(n_c), k)[keep]),
            PRODUCT_ID: p_ids.gather(rows.reshape(-1)[keep]),
            RANK: np.tile(np.arange(1, k + 1, dtype=np.int32), n_c)[keep],
            SCORE: scores.reshape(-1)[keep].astype(np.float32),
        },
        schema=RANKING_SCHEMA,
    )


def _top_k_columns(scores: np.ndarray, k: int) -> np.ndarray:
    """Each row's k best columns in column order, ties at the k-th score going to the first columns.

    argpartition alone picks among tied scores (trees give many) as its partitioning happens to leave them."""
    n = scores.shape[1]
    kth = np.partition(scores, n - k, axis=1)[:, n - k : n - k + 1]
    above, tied = scores > kth, scores == kth
    take = above | (tied & (np.cumsum(tied, axis=1) <= k - above.sum(axis=1, keepdims=True)))
    return np.nonzero(take)[1].reshape(scores.shape[0], k)


def oracle_ranking(
    truth: pl.DataFrame,
    customer_ids: pl.Series,
    *,
    top_n: int,
    exclude: pl.DataFrame | None = None,
    product_ids: pl.Series | None = None,
) -> pl.DataFrame:
    """The data generator's true scores ranked the same way (demo data only): the ceiling.

    `product_ids` is the catalogue the other rankers rank: truth also holds products the loader rejected."""
    t = truth.with_columns(pl.col(CUSTOMER_ID).cast(pl.Utf8), pl.col(PRODUCT_ID).cast(pl.Utf8)).join(
        customer_ids.to_frame(CUSTOMER_ID), on=CUSTOMER_ID, how="semi"
    )
    if product_ids is not None:
        t = t.join(product_ids.cast(pl.Utf8).to_frame(PRODUCT_ID), on=PRODUCT_ID, how="semi")
    if exclude is not None and not exclude.is_empty():
        t = t.join(exclude.select(CUSTOMER_ID, PRODUCT_ID), on=[CUSTOMER_ID, PRODUCT_ID], how="anti")
    return (
        t.sort([CUSTOMER_ID, "score", PRODUCT_ID], descending=[False, True, False])
        .with_columns(pl.int_range(1, pl.len() + 1).over(CUSTOMER_ID).cast(pl.Int32).alias(RANK))
        .filter(pl.col(RANK) <= top_n)
        .select(CUSTOMER_ID, PRODUCT_ID, RANK, pl.col("score").cast(pl.Float32).alias(SCORE))
    )
