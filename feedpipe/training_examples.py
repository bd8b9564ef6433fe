"""Labelled (customer, product) examples from a window of transactions, split by time.

Positives are the distinct pairs bought in the window; negatives are sampled uniformly from the
catalogue, so the model learns both taste and popularity. The last `validation_days` are held out:
their positives are the pairs first bought then, which is exactly what a feed (which excludes past
purchases) tries to predict. Training negatives avoid only what the customer bought in the training
days: avoiding the holdout's purchases too would let the held-out days shape the training set (a
pair bought in the holdout could never be a training negative), and the evaluation on those days
would flatter the learned rankers against popularity. Validation negatives avoid every purchase in
the window.

The held-out examples are split once more, by customer: half stay `validation` (what training and the
LightGBM baseline early-stop on, and the AUC floor checks), half become `test`, which only the
nightly evaluation reads. A ranker early-stopped on the customers it is then judged on would be tuned
on its own exam, while popularity is not tuned at all. The half is a hash of the customer id, so a
customer keeps its half from night to night.
"""

from __future__ import annotations

import zlib
from dataclasses import dataclass
from datetime import date, datetime, timedelta

import numpy as np
import polars as pl

from feedpipe.contract import CUSTOMER_ID, PRODUCT_ID, TS

TRAIN = "train"
VALIDATION = "validation"
TEST = "test"
LABEL = "label"
SPLIT = "split"


@dataclass(frozen=True)
class ExampleConfig:
    window_days: int = 90
    validation_days: int = 7
    negatives_per_positive: int = 12
    seed: int = 0

    def __post_init__(self):
        problems = []
        if self.validation_days < 1:
            problems.append(f"validation_days must be >= 1, got {self.validation_days}")
        if self.window_days <= self.validation_days:
            problems.append(f"window_days ({self.window_days}) must be more than validation_days "
                            f"({self.validation_days}): the days before the holdout are the training days")
        if self.negatives_per_positive < 1:
            problems.append(f"negatives_per_positive must be >= 1 (the model learns from both labels), "
                            f"got {self.negatives_per_positive}")
        if problems:
            raise ValueError("example config: " + "; ".join(problems))


@dataclass(frozen=True)
class Window:
    """[start, holdout) is training, [holdout, end) is validation; end is the feed date's midnight."""

    start: datetime
    holdout: datetime
    end: datetime

    @classmethod
    def for_feed_date(cls, feed_date: date, config: ExampleConfig) -> "Window":
        end = datetime.combine(feed_date, datetime.min.time())
        return cls(end - timedelta(days=config.window_days), end - timedelta(days=config.validation_days), end)

    @classmethod
    def last_days(cls, feed_date: date, days: int) -> "Window":
        """The `days` days before the feed date, all of them training days (no holdout)."""
        if days < 1:
            raise ValueError(f"a window needs at least one day, got {days}")
        end = datetime.combine(feed_date, datetime.min.time())
        return cls(end - timedelta(days=days), end, end)


def window_transactions(transactions: pl.DataFrame, window: Window) -> pl.DataFrame:
    return transactions.filter((pl.col(TS) >= window.start) & (pl.col(TS) < window.end))


def purchased_pairs(transactions: pl.DataFrame) -> pl.DataFrame:
    return transactions.select(CUSTOMER_ID, PRODUCT_ID).unique()


def holdout_pairs(transactions: pl.DataFrame, window: Window) -> tuple[pl.DataFrame, pl.DataFrame]:
    """(pairs bought in training days, pairs first bought in the holdout days)."""
    tx = window_transactions(transactions, window)
    train = purchased_pairs(tx.filter(pl.col(TS) < window.holdout))
    held = purchased_pairs(tx.filter(pl.col(TS) >= window.holdout)).join(train, on=[CUSTOMER_ID, PRODUCT_ID], how="anti")
    return train, held


def in_test_half(customer_ids: pl.Series) -> pl.Series:
    """Whether each customer's held-out examples are `test` (not `validation`): crc32 of the id, odd.

    A hash stable across processes and library versions (polars' own hash is neither promised to be),
    computed once per distinct id."""
    ids = customer_ids.cast(pl.Utf8)
    distinct = ids.unique()
    odd = pl.Series([zlib.crc32(i.encode()) % 2 == 1 for i in distinct.to_list()], dtype=pl.Boolean)
    return ids.to_frame("id").join(pl.DataFrame({"id": distinct, "odd": odd}), on="id", how="left",
                                    maintain_order="left").get_column("odd")


def sample_negatives(
    positives: pl.DataFrame, bought: pl.DataFrame, product_ids: pl.Series, ratio: int, seed: int
) -> pl.DataFrame:
    """`ratio` uniform negatives per positive row, none of them bought by that customer.

    Drawn with replacement and then filtered: collisions (the customer bought it) are redrawn once
    and any left after that are dropped; at a few percent of the catalogue bought per customer,
    that loses well under 0.1% of negatives.
    """
    if ratio <= 0 or positives.is_empty():
        return pl.DataFrame(schema={CUSTOMER_ID: pl.Utf8, PRODUCT_ID: pl.Utf8})
    rng = np.random.default_rng(seed)
    customers = positives.get_column(CUSTOMER_ID).to_numpy()
    catalogue = product_ids.to_numpy()
    n = len(customers) * ratio
    draws = pl.DataFrame({CUSTOMER_ID: np.repeat(customers, ratio), PRODUCT_ID: catalogue[rng.integers(0, len(catalogue), n)]})
    keep = draws.join(bought, on=[CUSTOMER_ID, PRODUCT_ID], how="anti", maintain_order="left")
    redraw_n = draws.height - keep.height
    if redraw_n:
        again = draws.join(bought, on=[CUSTOMER_ID, PRODUCT_ID], how="semi", maintain_order="left").with_columns(
            pl.Series(PRODUCT_ID, catalogue[rng.integers(0, len(catalogue), redraw_n)])
        )
        keep = pl.concat([keep, again.join(bought, on=[CUSTOMER_ID, PRODUCT_ID], how="anti", maintain_order="left")])
    return keep.cast({CUSTOMER_ID: pl.Utf8, PRODUCT_ID: pl.Utf8})


def build_training_examples(
    transactions: pl.DataFrame, product_ids: pl.Series, feed_date: date, config: ExampleConfig = ExampleConfig()
) -> pl.DataFrame:
    """Columns: customer_id, product_id, label (Float32, 1 bought / 0 sampled), split (train|validation).

    Raises ValueError when the window holds no training or no validation positives: a model
    trained or judged on nothing must not be published.
    """
    window = Window.for_feed_date(feed_date, config)
    train_pos, valid_pos = holdout_pairs(transactions, window)
    if train_pos.is_empty():
        raise ValueError(
            f"no transactions between {window.start:%Y-%m-%d} and {window.holdout:%Y-%m-%d} "
            f"(training window for feed date {feed_date}); check the data's dates or --date"
        )
    if valid_pos.is_empty():
        raise ValueError(
            f"no new purchases in the {config.validation_days} validation days before {feed_date}; "
            "the model cannot be validated"
        )
    bought_in_window = pl.concat([train_pos, valid_pos])
    parts = []
    for split, pos, bought, seed_offset in ((TRAIN, train_pos, train_pos, 0), (VALIDATION, valid_pos, bought_in_window, 1)):
        pos = pos.sort([CUSTOMER_ID, PRODUCT_ID])
        neg = sample_negatives(pos, bought, product_ids, config.negatives_per_positive, config.seed * 2 + seed_offset)
        parts.append(pos.with_columns(pl.lit(1.0, pl.Float32).alias(LABEL), pl.lit(split).alias(SPLIT)))
        parts.append(neg.with_columns(pl.lit(0.0, pl.Float32).alias(LABEL), pl.lit(split).alias(SPLIT)))
    examples = pl.concat(parts)
    held = examples.get_column(SPLIT) == VALIDATION
    test = held & in_test_half(examples.get_column(CUSTOMER_ID))
    examples = examples.with_columns(pl.when(test).then(pl.lit(TEST)).otherwise(pl.col(SPLIT)).alias(SPLIT))
    positives = examples.filter(pl.col(LABEL) == 1.0)
    for half, use in ((VALIDATION, "early stopping and the AUC floor"), (TEST, "the evaluation")):
        if positives.filter(pl.col(SPLIT) == half).is_empty():
            customers = valid_pos.get_column(CUSTOMER_ID).n_unique()
            raise ValueError(
                f"the {customers} customer(s) with new purchases in the {config.validation_days} validation days "
                f"before {feed_date} all fall in one half of the holdout, and {use} needs the '{half}' half too "
                "(customers are split by a hash of their id); lengthen validation_days"
            )
    return examples


def attach_features(examples: pl.DataFrame, encoded_customers: pl.DataFrame, encoded_products: pl.DataFrame) -> pl.DataFrame:
    """Examples with both sides' encoded feature columns joined on (the training set as stored)."""
    out = examples.join(encoded_customers, on=CUSTOMER_ID, how="inner", maintain_order="left")
    return out.join(encoded_products, on=PRODUCT_ID, how="inner", maintain_order="left")
