import re
from datetime import date, datetime

import polars as pl
import pytest

from feedpipe.training_examples import ExampleConfig, Window, build_training_examples, holdout_pairs, sample_negatives

FEED_DATE = date(2026, 3, 31)


def _tx(rows):
    return pl.DataFrame(
        {"customer_id": [r[0] for r in rows], "product_id": [r[1] for r in rows], "ts": [r[2] for r in rows]},
        schema={"customer_id": pl.Utf8, "product_id": pl.Utf8, "ts": pl.Datetime("us")},
    )


TX = _tx(
    [
        ("c1", "p1", datetime(2026, 3, 1)),
        ("c1", "p1", datetime(2026, 3, 2)),  # repeat: one positive
        ("c1", "p2", datetime(2026, 3, 28)),  # first bought in the holdout: validation positive
        ("c1", "p1", datetime(2026, 3, 29)),  # bought before: not a validation positive
        ("c2", "p3", datetime(2026, 3, 10)),
        ("c2", "p4", datetime(2026, 3, 30, 23, 59)),
        ("c2", "p5", datetime(2026, 3, 31, 0, 0)),  # on the feed date: outside the window
        ("c3", "p1", datetime(2025, 1, 1)),  # before the window
    ]
)
PRODUCTS = pl.Series("product_id", [f"p{i}" for i in range(1, 40)])
# TX's held-out customers c1 and c2 both hash to the test half; c4 brings the validation half a customer.
TX_BOTH_HALVES = TX.vstack(_tx([("c4", "p7", datetime(2026, 3, 5)), ("c4", "p8", datetime(2026, 3, 27))]))


def test_window_ends_at_the_feed_dates_midnight_and_holds_out_the_last_days():
    w = Window.for_feed_date(FEED_DATE, ExampleConfig(window_days=90, validation_days=7))
    assert w.end == datetime(2026, 3, 31) and w.holdout == datetime(2026, 3, 24)


def test_validation_positives_are_pairs_first_bought_in_the_holdout():
    train, held = holdout_pairs(TX, Window.for_feed_date(FEED_DATE, ExampleConfig()))
    assert sorted(train.rows()) == [("c1", "p1"), ("c2", "p3")]
    assert sorted(held.rows()) == [("c1", "p2"), ("c2", "p4")]


def test_negatives_come_at_the_ratio_and_never_name_a_bought_product():
    ex = build_training_examples(TX_BOTH_HALVES, PRODUCTS, FEED_DATE, ExampleConfig(negatives_per_positive=5))
    pos = ex.filter(pl.col("label") == 1.0)
    neg = ex.filter(pl.col("label") == 0.0)
    assert pos.height == 6
    assert neg.height == pytest.approx(30, abs=1)  # a collision left after one redraw may drop
    window = Window.for_feed_date(FEED_DATE, ExampleConfig())
    in_window = TX_BOTH_HALVES.filter((pl.col("ts") >= window.start) & (pl.col("ts") < window.end))
    bought_before_holdout = in_window.filter(pl.col("ts") < window.holdout).select("customer_id", "product_id").unique()
    bought_in_window = in_window.select("customer_id", "product_id").unique()
    train_neg, valid_neg = neg.filter(pl.col("split") == "train"), neg.filter(pl.col("split") != "train")
    assert train_neg.join(bought_before_holdout, on=["customer_id", "product_id"], how="semi").is_empty()
    assert valid_neg.join(bought_in_window, on=["customer_id", "product_id"], how="semi").is_empty()


def test_the_held_out_days_never_shape_the_training_split():
    """Training negatives avoid what was bought in the training days only: a holdout purchase telling the
    sampler which pairs not to draw would let the evaluation's own days shape what the model learns."""
    many = _tx([(f"c{i % 30}", f"p{1 + (7 * i) % 39}", datetime(2026, 3, 1 + i % 22)) for i in range(200)]
               + [(f"c{i % 30}", f"p{1 + (5 * i) % 39}", datetime(2026, 3, 25 + i % 6)) for i in range(150)])
    other_holdout = many.filter(pl.col("ts") < datetime(2026, 3, 24)).vstack(
        _tx([(f"c{i % 30}", f"p{1 + (11 * i) % 39}", datetime(2026, 3, 26)) for i in range(150)]))
    config = ExampleConfig(negatives_per_positive=10)
    a = build_training_examples(many, PRODUCTS, FEED_DATE, config).filter(pl.col("split") == "train")
    b = build_training_examples(other_holdout, PRODUCTS, FEED_DATE, config).filter(pl.col("split") == "train")
    assert a.equals(b)
    holdout_bought = many.filter(pl.col("ts") >= datetime(2026, 3, 24)).select("customer_id", "product_id").unique()
    negatives = a.filter(pl.col("label") == 0.0)
    assert not negatives.join(holdout_bought, on=["customer_id", "product_id"], how="semi").is_empty()  # allowed now


def test_examples_are_deterministic_for_a_seed_and_change_with_it():
    a = build_training_examples(TX_BOTH_HALVES, PRODUCTS, FEED_DATE, ExampleConfig(seed=1))
    b = build_training_examples(TX_BOTH_HALVES, PRODUCTS, FEED_DATE, ExampleConfig(seed=1))
    c = build_training_examples(TX_BOTH_HALVES, PRODUCTS, FEED_DATE, ExampleConfig(seed=2))
    assert a.equals(b) and not a.equals(c)


def test_a_window_without_transactions_is_an_error_naming_the_dates():
    with pytest.raises(ValueError, match="no transactions between"):
        build_training_examples(TX, PRODUCTS, date(2030, 1, 1), ExampleConfig())


def test_sample_negatives_redraws_collisions():
    positives = pl.DataFrame({"customer_id": ["c"] * 50, "product_id": ["a"] * 50})
    bought = pl.DataFrame({"customer_id": ["c"], "product_id": ["a"]})
    neg = sample_negatives(positives, bought, pl.Series(["a", "b"]), ratio=2, seed=0)
    assert set(neg.get_column("product_id").to_list()) == {"b"}


@pytest.mark.parametrize(
    "config, named",
    [
        ({"window_days": 7, "validation_days": 7}, "window_days (7) must be more than validation_days (7)"),
        ({"validation_days": 0}, "validation_days must be >= 1"),
        ({"negatives_per_positive": 0}, "negatives_per_positive must be >= 1"),
    ],
)
def test_an_example_config_without_training_days_or_negatives_is_refused(config, named):
    with pytest.raises(ValueError, match=re.escape(named)):
        ExampleConfig(**config)


def test_an_exclusion_window_is_its_days_before_the_feed_date():
    window = Window.last_days(FEED_DATE, 3)
    assert (window.start, window.end) == (datetime(2026, 3, 28), datetime(2026, 3, 31))
    with pytest.raises(ValueError, match="at least one day"):
        Window.last_days(FEED_DATE, 0)


def test_held_out_customers_are_split_into_validation_and_test_halves_that_stay_put():
    """Early stopping reads `validation`, the evaluation reads `test`: never the same customer's examples."""
    many = _tx([(f"c{i % 40}", f"p{1 + (7 * i) % 39}", datetime(2026, 3, 1 + i % 22)) for i in range(300)]
               + [(f"c{i % 40}", f"p{1 + (5 * i) % 39}", datetime(2026, 3, 25 + i % 6)) for i in range(200)])
    ex = build_training_examples(many, PRODUCTS, FEED_DATE, ExampleConfig())
    by_split = {s: set(ex.filter(pl.col("split") == s).get_column("customer_id")) for s in ("validation", "test")}
    assert by_split["validation"] and by_split["test"] and not by_split["validation"] & by_split["test"]
    assert ex.filter(pl.col("split") == "test").get_column("label").n_unique() == 2  # positives and negatives
    # A customer's half is its id's, whatever else is in the data (so it keeps it night after night).
    fewer = build_training_examples(many.filter(pl.col("customer_id") != "c0"), PRODUCTS, FEED_DATE, ExampleConfig())
    assert set(fewer.filter(pl.col("split") == "test").get_column("customer_id")) == by_split["test"] - {"c0"}


def test_a_holdout_whose_customers_all_fall_in_one_half_is_an_error_naming_the_setting():
    from feedpipe.training_examples import in_test_half

    ids = [f"c{i}" for i in range(1, 30)]
    odd = [c for c, t in zip(ids, in_test_half(pl.Series(ids)).to_list()) if t][:2]
    tx = _tx([(c, "p1", datetime(2026, 3, 1)) for c in odd] + [(c, "p2", datetime(2026, 3, 28)) for c in odd])
    with pytest.raises(ValueError, match=r"all fall in one half of the holdout.*'validation'.*validation_days"):
        build_training_examples(tx, PRODUCTS, FEED_DATE, ExampleConfig())
