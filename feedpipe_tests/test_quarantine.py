"""Row-level quarantine: reasons, exact accounting, the rejected file, the policy, id reconciliation, input health."""

from __future__ import annotations

from datetime import date, datetime, timedelta

import polars as pl
import pyarrow as pa
import pytest

from feedpipe.contract import CUSTOMER_ID, CUSTOMERS, PRODUCT_ID, PRODUCTS, TRANSACTIONS, TS
from feedpipe.input_config import InputError
from feedpipe.input_health import daily_volume, freshness, vocabulary_drift
from feedpipe.input_tables import _as_integer, reject_unknown_references
from feedpipe.quarantine import COLUMN, REASON, ROW, RejectedRowsError, RejectionPolicy, enforce_policy, write_rejected
from feedpipe.sources import FeatureSpec, load_customers, load_products, load_transactions
from feedpipe.table_files import StoredTable, decode_utf8
from feedpipe.vocabularies import build_vocabularies

FEED_DATE = date(2024, 3, 1)
HEADER = "customer_id,product_id,ts,quantity\n"


def stored_csv(tmp_path, table: str, text: str | bytes) -> StoredTable:
    path = tmp_path / f"{table}.csv"
    path.write_bytes(text.encode() if isinstance(text, str) else text)
    return StoredTable(table, path)


def good_rows(n: int) -> str:
    return "".join(f"c{i % 3},p{i % 2},2024-02-{1 + i % 28:02d},1\n" for i in range(n))


def test_each_bad_row_gets_exactly_one_reason_the_first_that_applies(tmp_path):
    stored = stored_csv(tmp_path, TRANSACTIONS, HEADER + ",p1,yesterday,-1\nc1,p1,2024-02-01,1\n")

    load = load_transactions(stored, feed_date=FEED_DATE)

    assert load.rejected.select(ROW, REASON, COLUMN).rows() == [(2, "missing_id", CUSTOMER_ID)]
    assert load.accepted.height == 1 and load.received == 2


def test_rejected_rows_keep_their_stored_values_and_line_numbers(tmp_path):
    stored = stored_csv(tmp_path, TRANSACTIONS, HEADER + "c1,p1,2024-02-01,1\nc1,p1,2024-02-30,2\nc2,p2,2024-02-02,zero\n")

    rejected = load_transactions(stored, feed_date=FEED_DATE).rejected

    assert rejected.columns == [ROW, REASON, COLUMN, CUSTOMER_ID, PRODUCT_ID, TS, "quantity"]
    assert rejected.rows() == [
        (3, "invalid_ts", TS, "c1", "p1", "2024-02-30", "2"),
        (4, "invalid_number", "quantity", "c2", "p2", "2024-02-02", "zero"),
    ]


def test_a_cell_that_is_not_utf8_is_rejected_and_shown_with_escapes(tmp_path):
    stored = stored_csv(tmp_path, CUSTOMERS, b"customer_id,region\nc1,north\nc2,s\xe9ud\n")

    load = load_customers(stored)

    assert load.accepted.get_column(CUSTOMER_ID).to_list() == ["c1"]
    assert load.rejected.select(REASON, COLUMN, "region").rows() == [("invalid_utf8", "region", "s\\xe9ud")]


def test_utf8_check_does_not_let_a_sequence_straddle_two_values():
    values = pa.array([b"ok", b"x\xc3", b"\xa9y", b"caf\xc3\xa9", None], type=pa.binary())

    text, bad = decode_utf8(values)

    assert bad.to_list() == [False, True, True, False, False]
    assert text.to_list() == ["ok", "x\\xc3", "\\xa9y", "café", None]


def test_transactions_from_midnight_of_the_feed_date_on_are_rejected(tmp_path):
    stored = stored_csv(tmp_path, TRANSACTIONS, HEADER + "c,p,2024-02-29T23:59:59,1\nc,p,2024-03-01T00:00:00,1\nc,p,2024-03-05,1\n")

    load = load_transactions(stored, feed_date=FEED_DATE)

    assert load.accepted.get_column(TS).to_list() == [datetime(2024, 2, 29, 23, 59, 59)]
    assert load.counts_by_reason() == {"ts_after_feed_date": 2}


def test_exact_duplicate_keeps_the_first_copy_and_conflicting_ids_keep_none(tmp_path):
    stored = stored_csv(tmp_path, PRODUCTS, "product_id,brand\np1,a\np1,a\np2,b\np2,c\np3,d\n")

    load = load_products(stored)

    assert load.accepted.rows() == [("p1", "a"), ("p3", "d")]
    assert load.rejected.select(ROW, REASON).rows() == [(3, "duplicate_row"), (4, "duplicate_id"), (5, "duplicate_id")]


def test_length_limits_come_from_the_policy(tmp_path):
    stored = stored_csv(tmp_path, CUSTOMERS, "customer_id,region\nc1,abcdef\nc2,abc\nc333,x\n")

    load = load_customers(stored, policy=RejectionPolicy(max_id_chars=3, max_text_chars=5))

    assert load.rejected.select(ROW, REASON, COLUMN).rows() == [(2, "text_too_long", "region"),
                                                                (4, "text_too_long", CUSTOMER_ID)]


def test_policy_passes_at_the_limit_and_fails_above_it(tmp_path):
    rows = good_rows(99) + "c1,p1,2024-02-01,0\n"
    load = load_transactions(stored_csv(tmp_path, TRANSACTIONS, HEADER + rows), feed_date=FEED_DATE)

    enforce_policy(load, RejectionPolicy(max_rejected_fraction=0.01))  # 1 of 100: allowed
    with pytest.raises(RejectedRowsError):
        enforce_policy(load, RejectionPolicy(max_rejected_fraction=0.0099))


def test_policy_failure_names_source_column_rows_expectation_and_rejected_file(tmp_path):
    rows = good_rows(10) + "".join(f"c1,p1,2024-02-01,{q}\n" for q in (0, -1, -2, -3, -4, -5, -6))
    load = load_transactions(stored_csv(tmp_path, TRANSACTIONS, HEADER + rows), feed_date=FEED_DATE)
    path = write_rejected(load, tmp_path / "rejected.parquet")

    with pytest.raises(RejectedRowsError) as err:
        enforce_policy(load, RejectionPolicy(), path)

    message = str(err.value)
    assert message.startswith(f"{tmp_path / 'transactions.csv'}: 7 of 17 transactions rows rejected (41.2%)")
    assert "allows at most 1.0%" in message and str(path) in message
    assert "column 'quantity': 7 row(s) have a quantity of zero or less [non_positive_quantity]" in message
    assert "expected a quantity above zero" in message
    assert "line 12: '0'" in message and "line 16: '-4'" in message and "'-5'" not in message
    assert "... and 2 more" in message
    assert err.value.load is load


def test_exempt_reasons_are_counted_but_not_held_against_the_fraction(tmp_path):
    # The last two are of later days, one with a quantity of 0 too: a later day's row is no concern of this feed
    # date's (the documented order puts ts_after_feed_date first), so a backfill's exemption covers it.
    rows = good_rows(4) + "c1,p1,2024-04-01,1\nc1,p1,2024-05-01,0\n"
    load = load_transactions(stored_csv(tmp_path, TRANSACTIONS, HEADER + rows), feed_date=FEED_DATE)

    enforce_policy(load, RejectionPolicy(exempt_reasons=("ts_after_feed_date",)))
    assert load.counts_by_reason() == {"ts_after_feed_date": 2}
    with pytest.raises(RejectedRowsError, match="ts_after_feed_date"):
        enforce_policy(load, RejectionPolicy())


@pytest.mark.parametrize("kwargs", [{"max_rejected_fraction": 1.5}, {"max_rejected_fraction": -0.1},
                                    {"exempt_reasons": ("bad_vibes",)}, {"max_id_chars": 0}])
def test_an_invalid_policy_is_refused(kwargs):
    with pytest.raises(InputError):
        RejectionPolicy(**kwargs)


def test_unknown_references_are_rejected_per_side(tmp_path):
    tx = load_transactions(stored_csv(tmp_path, TRANSACTIONS, HEADER + "c1,p1,2024-02-01,1\nc9,p1,2024-02-01,1\nc1,p9,2024-02-01,1\n"))
    customers = pl.DataFrame({CUSTOMER_ID: ["c1"]})
    products = pl.DataFrame({PRODUCT_ID: ["p1"]})

    checked = reject_unknown_references(tx, customers, products, "customers.csv", "products.csv")

    assert checked.rejected.select(ROW, REASON).rows() == [(3, "unknown_customer"), (4, "unknown_product")]
    assert checked.expected[("unknown_customer", CUSTOMER_ID)] == "an id present in customers.csv"


def test_ids_are_compared_as_text_and_numeric_only_matches_are_named(tmp_path):
    tx = load_transactions(stored_csv(tmp_path, TRANSACTIONS, HEADER + "42,1,2024-02-01,1\n042,1,2024-02-01,1\n+42,1,2024-02-01,1\n"))
    customers = pl.DataFrame({CUSTOMER_ID: [42]}).cast(pl.Utf8)  # an integer column, loaded as text
    products = pl.DataFrame({PRODUCT_ID: ["1"]})

    checked = reject_unknown_references(tx, customers, products)

    assert checked.accepted.get_column(CUSTOMER_ID).to_list() == ["42"]
    assert checked.counts_by_reason() == {"id_matches_only_as_number": 2}
    assert "compared as text" in checked.describe_rejections()


def test_integer_spellings_normalise_to_one_form():
    spellings = pl.Series(["007", "+7", " 7 ", "-0", "000", "-007", "7a", "", "0"])

    normal = spellings.to_frame("v").select(_as_integer(pl.col("v"))).to_series()

    assert normal.to_list() == ["7", "7", "7", "0", "0", "-7", None, None, "0"]


# --- input health ----------------------------------------------------------------------------------------------------


def test_freshness_measures_the_newest_transaction_against_the_feed_date():
    ts = pl.Series([datetime(2024, 2, 20), datetime(2024, 2, 27, 12)])

    fresh = freshness(ts, FEED_DATE, max_age_days=3)
    stale = freshness(ts, FEED_DATE, max_age_days=2)

    assert fresh.latest == datetime(2024, 2, 27, 12) and fresh.age_days == 2.5  # 2024 is a leap year
    assert fresh.passed and not stale.passed
    assert not freshness(pl.Series([], dtype=pl.Datetime("us")), FEED_DATE, 2).passed


def _days(counts: dict[date, int]) -> pl.Series:
    return pl.Series([datetime.combine(d, datetime.min.time()) for d, n in counts.items() for _ in range(n)])


def test_daily_volume_compares_the_last_day_with_the_trailing_median():
    last = FEED_DATE - timedelta(days=1)
    history = {last - timedelta(days=k): 100 for k in range(1, 8)}

    normal = daily_volume(_days({**history, last: 120}), FEED_DATE, trailing_days=7, max_change=0.5)
    collapse = daily_volume(_days({**history, last: 30}), FEED_DATE, trailing_days=7, max_change=0.5)

    assert (normal.count, normal.trailing_median, normal.trailing_days) == (120, 100.0, 7)
    assert not normal.anomalous and normal.change == pytest.approx(0.2)
    assert collapse.anomalous and collapse.change == pytest.approx(-0.7)


def test_daily_volume_counts_quiet_days_as_zero_but_not_days_before_the_export_began():
    last = FEED_DATE - timedelta(days=1)
    only_two_days = _days({last - timedelta(days=2): 50, last: 50})  # the day between them had none

    volume = daily_volume(only_two_days, FEED_DATE, trailing_days=28, max_change=0.5)

    assert (volume.trailing_days, volume.trailing_median) == (2, 25.0)
    no_history = daily_volume(_days({last: 10}), FEED_DATE, trailing_days=28, max_change=0.5)
    assert no_history.trailing_median is None and not no_history.anomalous


def test_vocabulary_drift_is_the_share_of_values_the_earlier_vocabulary_lacks():
    specs = [FeatureSpec(CUSTOMER_ID, CUSTOMERS, "categorical"), FeatureSpec("region", CUSTOMERS, "categorical"),
             FeatureSpec("age", CUSTOMERS, "dense")]
    yesterday = pl.DataFrame({CUSTOMER_ID: ["c1", "c2", "c3", "c4"], "region": ["n", "n", "s", "s"], "age": [1.0] * 4})
    vocab = build_vocabularies({CUSTOMERS: yesterday}, specs, min_count=1)
    today = pl.DataFrame({CUSTOMER_ID: ["c1", "c2", "c3", "c5"], "region": ["n", "east", "west", None], "age": [1.0] * 4})

    drift = {d.feature: d.oov_share for d in vocabulary_drift(today, specs, vocab)}

    assert drift == {"customers.customer_id": 0.25, "customers.region": pytest.approx(2 / 3)}


def test_lists_of_binary_decode_like_binary_columns():
    from feedpipe.table_files import decode_utf8_lists

    values = pa.array([[b"a", b"caf\xc3\xa9"], None, [], [b"x\xe9"], [b"ok"]], type=pa.list_(pa.binary()))
    for array in (values, values.slice(1)):  # an offset into the list's buffers too
        text, bad = decode_utf8_lists(array)
        expected = [["a", "café"], None, [], ["x\\xe9"], ["ok"]][len(values) - len(array):]
        assert text.to_list() == expected
        assert bad.to_list() == [False, False, False, True, False][len(values) - len(array):]
    text, bad = decode_utf8_lists(pa.array([[b"a"], None], type=pa.list_(pa.binary())))
    assert bad is None and text.to_list() == [["a"], None]


def test_a_parquet_list_of_binary_attribute_is_text_and_its_bad_rows_are_quarantined(tmp_path):
    """Some writers store strings without the UTF-8 annotation; a list of them is a multi-valued attribute."""
    import pyarrow.parquet as pq

    path = tmp_path / "products.parquet"
    pq.write_table(pa.table({
        PRODUCT_ID: ["p1", "p2", "p3"],
        "tags": pa.array([[b"red", b"sale"], [b"bl\xe9u"], [b"green"]], type=pa.list_(pa.binary())),
    }), path)

    load = load_products(StoredTable(PRODUCTS, path))

    assert load.received == 3 and load.accepted.height + load.rejected.height == 3
    assert load.accepted.get_column(PRODUCT_ID).to_list() == ["p1", "p3"]
    assert load.accepted.get_column("tags").to_list() == [["red", "sale"], ["green"]]
    assert load.rejected.select(REASON, COLUMN).rows() == [("invalid_utf8", "tags")]
