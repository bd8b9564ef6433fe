import polars as pl
import pytest

from feedpipe.contract import CATEGORICAL, CUSTOMERS, DENSE, MULTI_CATEGORICAL, PRODUCTS
from feedpipe.sources import FeatureSpec
from feedpipe.vocabularies import (
    FIRST_VALUE_INDEX,
    NULL_INDEX,
    OOV_INDEX,
    Vocabularies,
    build_vocabularies,
    encode_column,
    encode_table,
    oov_share,
    scale_dense,
)

REGION = FeatureSpec("region", CUSTOMERS, CATEGORICAL)
TAGS = FeatureSpec("tags", PRODUCTS, MULTI_CATEGORICAL)
AGE = FeatureSpec("age", CUSTOMERS, DENSE)


def _customers(regions):
    return pl.DataFrame({"customer_id": [str(i) for i in range(len(regions))], "region": regions, "age": [float(20 + i) for i in range(len(regions))]})


def test_reserved_indices_then_most_frequent_first():
    vocab = build_vocabularies({CUSTOMERS: _customers(["b", "a", "a", "c", "a", "b", None])}, [REGION])
    table = vocab.for_feature("customers.region").sort("index")
    assert table.get_column("value").to_list() == ["a", "b", "c"]
    assert table.get_column("index").to_list() == [FIRST_VALUE_INDEX, FIRST_VALUE_INDEX + 1, FIRST_VALUE_INDEX + 2]
    assert vocab.size("customers.region") == FIRST_VALUE_INDEX + 3


def test_rare_values_below_min_count_map_to_oov_bucket():
    vocab = build_vocabularies({CUSTOMERS: _customers(["a", "a", "b"])}, [REGION], min_count=2)
    enc = encode_column(pl.Series("region", ["a", "b", None, "zzz"]), vocab.for_feature("customers.region"), CATEGORICAL)
    assert enc.to_list() == [FIRST_VALUE_INDEX, OOV_INDEX, NULL_INDEX, OOV_INDEX]


def test_known_values_keep_their_index_across_nights_and_new_values_are_appended():
    night1 = build_vocabularies({CUSTOMERS: _customers(["a", "b", "b"])}, [REGION])
    night2 = build_vocabularies({CUSTOMERS: _customers(["c", "c", "c", "a", "d"])}, [REGION], previous=night1)
    idx1 = dict(night1.for_feature("customers.region").iter_rows())
    idx2 = dict(night2.for_feature("customers.region").iter_rows())
    assert idx2["a"] == idx1["a"] and idx2["b"] == idx1["b"]  # b vanished today but keeps its row
    assert idx2["c"] == max(idx1.values()) + 1  # most frequent new value first
    assert idx2["d"] == max(idx1.values()) + 2


def test_multi_valued_bags_encode_each_value_and_empty_bags_pool_the_null_row():
    products = pl.DataFrame({"product_id": ["p1", "p2", "p3"], "tags": [["x", "y"], [], ["y", "new"]]})
    vocab = build_vocabularies({PRODUCTS: products}, [TAGS])
    lookup = dict(vocab.for_feature("products.tags").iter_rows())
    enc = encode_column(pl.Series("tags", [["y", "x"], [], None, ["unseen"]]), vocab.for_feature("products.tags"), MULTI_CATEGORICAL)
    assert enc.to_list() == [[lookup["y"], lookup["x"]], [NULL_INDEX], [NULL_INDEX], [OOV_INDEX]]


def test_dense_scaler_standardises_signed_log_and_fills_nulls_with_the_mean():
    vocab = build_vocabularies({CUSTOMERS: _customers(["a"] * 5)}, [AGE])
    scaled = scale_dense(pl.Series("age", [20.0, 24.0, None]), vocab.scalers["customers.age"])
    assert scaled.dtype == pl.Float32
    assert scaled[2] == 0.0
    full = scale_dense(pl.Series("age", [20.0, 21.0, 22.0, 23.0, 24.0]), vocab.scalers["customers.age"])
    assert abs(full.mean()) < 1e-6 and abs(full.std() - 1.0) < 1e-5


def test_vocabularies_survive_save_and_load(tmp_path):
    vocab = build_vocabularies({CUSTOMERS: _customers(["a", "b"])}, [REGION, AGE])
    vocab.save(tmp_path)
    loaded = Vocabularies.load(tmp_path)
    assert loaded.table.equals(vocab.table)
    assert loaded.scalers == vocab.scalers
    assert loaded.customer_specs == [REGION, AGE]


def test_ids_are_ordered_by_activity_and_every_catalogue_id_gets_a_row():
    spec = FeatureSpec("product_id", PRODUCTS, CATEGORICAL)
    products = pl.DataFrame({"product_id": ["p1", "p2", "p3"]})
    counts = {"product_id": pl.DataFrame({"product_id": ["p3", "p1"], "count": [10, 2]})}
    vocab = build_vocabularies({PRODUCTS: products}, [spec], id_counts=counts, min_count=5)
    order = vocab.for_feature("products.product_id").sort("index").get_column("value").to_list()
    assert order == ["p3", "p1", "p2"]


def test_encode_table_prefixes_columns_by_table_so_sides_may_share_names():
    specs = [FeatureSpec("customer_id", CUSTOMERS, CATEGORICAL), REGION]
    df = _customers(["a", "b"])
    vocab = build_vocabularies({CUSTOMERS: df}, specs)
    enc = encode_table(df, "customer_id", specs, vocab)
    assert enc.columns == ["customer_id", "customers.customer_id", "customers.region"]
    assert enc.get_column("customer_id").to_list() == ["0", "1"]


def test_oov_share_counts_unknown_values_only():
    vocab = build_vocabularies({CUSTOMERS: _customers(["a", "b"])}, [REGION])
    share = oov_share(pl.Series("region", ["a", "x", "y", None]), vocab.for_feature("customers.region"), CATEGORICAL)
    assert share == pytest.approx(2 / 3)


def test_values_rarer_than_the_min_count_are_not_drift_on_unchanged_data():
    """A vocabulary built with min_count 2 leaves single values out by design: the same data again is no drift."""
    from feedpipe.contract import MULTI_CATEGORICAL

    regions = ["a", "a", "b", "b", "c", "d"]
    vocab = build_vocabularies({CUSTOMERS: _customers(regions)}, [REGION], min_count=2)
    table = vocab.for_feature("customers.region")
    assert oov_share(pl.Series("region", regions), table, CATEGORICAL, min_count=2) == 0.0
    assert oov_share(pl.Series("region", regions), table, CATEGORICAL) == pytest.approx(2 / 6)  # as before
    # A value frequent enough to have had a row, and none: drift.
    assert oov_share(pl.Series("region", [*regions, "e", "e"]), table, CATEGORICAL, min_count=2) == pytest.approx(2 / 8)
    tags = pl.Series("tags", [["a", "c"], ["e", "e"], None])
    assert oov_share(tags, table, MULTI_CATEGORICAL, min_count=2) == pytest.approx(2 / 4)


@pytest.mark.parametrize("regions, min_count", [(["a", "b", "c"], 2), ([None, None, None], 1)])
def test_a_feature_left_with_no_value_still_has_a_size(regions, min_count):
    """All values rarer than min_count (a zip code), or all null: the model still needs its (reserved-rows) table."""
    vocab = build_vocabularies({CUSTOMERS: _customers(regions)}, [REGION], min_count=min_count)
    assert vocab.sizes()["customers.region"] == FIRST_VALUE_INDEX
