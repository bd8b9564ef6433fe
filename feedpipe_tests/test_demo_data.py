from __future__ import annotations

from datetime import date, datetime, timedelta
from pathlib import Path

import polars as pl
import pytest
from polars.testing import assert_frame_equal

from feedpipe.contract import (
    CUSTOMER_ID,
    CUSTOMERS,
    DEFAULT_DELIMITER,
    PRODUCT_ID,
    PRODUCTS,
    QUANTITY,
    TRANSACTIONS,
    TRUTH_FILE,
    TS,
)
from feedpipe.demo_data import (
    AGE,
    BRAND,
    CATEGORY,
    PRICE,
    REGION,
    SCORE,
    SEGMENT,
    SUMMARY_FILE,
    TAG_POOL,
    TAGS,
    TENURE_DAYS,
    generate_demo_data,
    holdout_recall_report,
    read_demo_summary,
    read_demo_table,
)

END = date(2024, 3, 31)
TINY = {"customers": 50, "products": 30, "days": 14, "end_date": END}
TABLES = (TRANSACTIONS, CUSTOMERS, PRODUCTS)


def _tables(directory: Path) -> dict[str, pl.DataFrame]:
    tables = {name: read_demo_table(directory, name) for name in TABLES}
    tables["truth"] = pl.read_parquet(directory / TRUTH_FILE)
    return tables


@pytest.fixture(scope="module")
def tiny(tmp_path_factory) -> tuple[Path, dict[str, pl.DataFrame]]:
    directory = tmp_path_factory.mktemp("tiny")
    generate_demo_data(directory, seed=7, **TINY)
    return directory, _tables(directory)


@pytest.fixture(scope="module")
def medium(tmp_path_factory) -> Path:
    directory = tmp_path_factory.mktemp("medium")
    generate_demo_data(directory, customers=800, products=300, days=56, seed=3, end_date=END)
    return directory


def test_same_seed_writes_byte_identical_files(tmp_path, tiny):
    directory, tables = tiny
    generate_demo_data(tmp_path, seed=7, **TINY)
    for name, frame in _tables(tmp_path).items():
        assert_frame_equal(frame, tables[name])
    for name in (*(f"{t}.parquet" for t in TABLES), TRUTH_FILE):
        assert (tmp_path / name).read_bytes() == (directory / name).read_bytes(), name


def test_another_seed_gives_different_data(tmp_path, tiny):
    _, tables = tiny
    generate_demo_data(tmp_path, seed=8, **TINY)
    for name, frame in _tables(tmp_path).items():
        assert not frame.equals(tables[name]), name


def test_tables_have_the_documented_schemas(tiny):
    _, tables = tiny
    assert tables[CUSTOMERS].schema == pl.Schema(
        {CUSTOMER_ID: pl.Int64, AGE: pl.Int64, TENURE_DAYS: pl.Int64, REGION: pl.Utf8, SEGMENT: pl.Utf8}
    )
    assert tables[PRODUCTS].schema == pl.Schema(
        {PRODUCT_ID: pl.Utf8, PRICE: pl.Float64, CATEGORY: pl.Utf8, BRAND: pl.Utf8, TAGS: pl.List(pl.Utf8)}
    )
    assert tables[TRANSACTIONS].schema == pl.Schema(
        {CUSTOMER_ID: pl.Int64, PRODUCT_ID: pl.Utf8, TS: pl.Datetime("us"), QUANTITY: pl.Int64}
    )
    assert tables["truth"].schema == pl.Schema({CUSTOMER_ID: pl.Int64, PRODUCT_ID: pl.Utf8, SCORE: pl.Float32})


def test_attribute_values_stay_in_their_documented_ranges(tiny):
    _, tables = tiny
    customers, products, transactions = tables[CUSTOMERS], tables[PRODUCTS], tables[TRANSACTIONS]
    assert customers.get_column(CUSTOMER_ID).to_list() == list(range(1, TINY["customers"] + 1))
    assert customers.get_column(AGE).is_between(18, 80).all()
    assert (customers.get_column(TENURE_DAYS) >= 0).all()
    assert products.get_column(PRODUCT_ID).to_list() == [f"P{i:05d}" for i in range(1, TINY["products"] + 1)]
    assert products.get_column(PRICE).is_between(1.0, 500.0).all()
    assert transactions.get_column(QUANTITY).is_between(1, 3).all()
    tags = products.get_column(TAGS)
    assert tags.list.len().is_between(1, 4).all()
    assert (tags.list.n_unique() == tags.list.len()).all()
    assert set(tags.explode().to_list()) <= set(TAG_POOL)


def test_every_transaction_id_exists_in_customers_and_products(tiny):
    _, tables = tiny
    transactions = tables[TRANSACTIONS]
    assert transactions.height > 0
    assert transactions.join(tables[CUSTOMERS], on=CUSTOMER_ID, how="anti").is_empty()
    assert transactions.join(tables[PRODUCTS], on=PRODUCT_ID, how="anti").is_empty()


def test_transactions_fall_in_the_requested_days_sorted_by_ts(tiny):
    directory, tables = tiny
    ts = tables[TRANSACTIONS].get_column(TS)
    summary = read_demo_summary(directory)
    assert summary.end_date == END
    assert summary.start_date == END - timedelta(days=TINY["days"] - 1)
    assert ts.min() >= datetime(2024, 3, 18)
    assert ts.max() < datetime(2024, 4, 1)
    assert ts.is_sorted()


def test_end_date_defaults_to_yesterday(tmp_path):
    summary = generate_demo_data(tmp_path, customers=5, products=5, days=3)
    assert summary.end_date == date.today() - timedelta(days=1)
    assert summary.start_date == summary.end_date - timedelta(days=2)


def test_truth_scores_every_customer_product_pair_once(tiny):
    _, tables = tiny
    truth = tables["truth"]
    assert truth.height == TINY["customers"] * TINY["products"]
    pairs = tables[CUSTOMERS].select(CUSTOMER_ID).join(tables[PRODUCTS].select(PRODUCT_ID), how="cross")
    assert_frame_equal(truth.select(CUSTOMER_ID, PRODUCT_ID), pairs, check_row_order=False)
    assert truth.select(CUSTOMER_ID, PRODUCT_ID).is_unique().all()
    assert truth.get_column(SCORE).is_finite().all()


def test_csv_tags_are_delimiter_joined_and_split_back_to_the_same_lists(tmp_path, tiny):
    _, tables = tiny
    generate_demo_data(tmp_path, seed=7, file_format="csv", **TINY)
    raw = pl.read_csv(tmp_path / f"{PRODUCTS}.csv")
    assert raw.schema[TAGS] == pl.Utf8
    assert raw.get_column(TAGS).str.contains(DEFAULT_DELIMITER, literal=True).any()
    for name, frame in _tables(tmp_path).items():
        assert_frame_equal(frame, tables[name])


def test_switching_format_leaves_one_file_per_table(tmp_path):
    generate_demo_data(tmp_path, file_format="csv", **TINY)
    generate_demo_data(tmp_path, file_format="parquet", **TINY)
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted(
        [*(f"{t}.parquet" for t in TABLES), TRUTH_FILE, SUMMARY_FILE]
    )


def test_demo_json_round_trips_the_summary(tmp_path):
    summary = generate_demo_data(tmp_path, seed=11, **TINY)
    assert read_demo_summary(tmp_path) == summary
    assert summary.directory == tmp_path.resolve()
    assert summary.transactions == read_demo_table(tmp_path, TRANSACTIONS).height
    assert (summary.customers, summary.products, summary.seed) == (TINY["customers"], TINY["products"], 11)


def test_missing_demo_json_reads_as_none(tmp_path):
    assert read_demo_summary(tmp_path) is None


@pytest.mark.parametrize("bad", [{"file_format": "xlsx"}, {"customers": 0}, {"days": 0}, {"seed": -1}])
def test_invalid_arguments_are_rejected_before_writing(tmp_path, bad):
    with pytest.raises(ValueError):
        generate_demo_data(tmp_path / "out", **{**TINY, **bad})
    assert not (tmp_path / "out").exists()


def test_transaction_count_tracks_transactions_per_customer(medium):
    assert read_demo_summary(medium).transactions == pytest.approx(800 * 50, rel=0.1)


def test_purchased_pairs_score_well_above_the_average_pair(medium):
    truth = pl.read_parquet(medium / TRUTH_FILE)
    bought = truth.join(read_demo_table(medium, TRANSACTIONS), on=[CUSTOMER_ID, PRODUCT_ID], how="semi")
    # Each pair's percentile within its customer's scores: 0.5 would be purchases blind to the truth.
    percentile = truth.with_columns((pl.col(SCORE).rank().over(CUSTOMER_ID) / 300).alias("pct"))
    bought_pct = percentile.join(bought, on=[CUSTOMER_ID, PRODUCT_ID], how="semi").get_column("pct").mean()
    assert bought_pct > 0.85
    assert bought.get_column(SCORE).mean() > truth.get_column(SCORE).mean() + truth.get_column(SCORE).std()


def test_weekend_days_see_more_purchases_than_weekdays(medium):
    per_weekday = read_demo_table(medium, TRANSACTIONS).group_by(pl.col(TS).dt.weekday()).len()
    weekend = per_weekday.filter(pl.col(TS) >= 6).get_column("len").mean()
    weekday = per_weekday.filter(pl.col(TS) <= 5).get_column("len").mean()
    assert 1.2 < weekend / weekday < 1.6


def test_holdout_recall_ranks_oracle_above_popularity_above_random(medium):
    report = holdout_recall_report(medium, holdout_days=7, k=20)
    assert report["customers_evaluated"] > 100
    assert report["oracle_recall"] > 1.5 * report["popularity_recall"]
    assert report["popularity_recall"] > 2 * report["random_recall"]
    # Repeats exist; their share grows as the catalogue shrinks (about 0.35 at the default 2,000 products).
    assert report["repeat_purchase_share"] > 0.1
