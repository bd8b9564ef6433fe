"""Products a shop cannot sell today (`products.available` in the input config): read, kept out of features, never
recommended, and still counted: accepted + rejected = received."""

from __future__ import annotations

from datetime import date

import dagster as dg
import polars as pl
import pytest

from feedpipe.contract import AVAILABLE, INPUT_CONFIG_FILE, PRODUCT_ID, PRODUCTS
from feedpipe.definitions import build_resources, defs
from feedpipe.defs.io_manager import ArtifactIOManager
from feedpipe.defs.resources import ArtifactsResource
from feedpipe.demo_data import generate_demo_data
from feedpipe.input_config import InputConfig, InputConfigError, TableInputConfig, load_input_config
from feedpipe.input_tables import open_table
from feedpipe.ranking import unavailable_products
from feedpipe.sources import InputError, infer_features, load_products, read_products
from feedpipe_tests.test_sources import write_config, write_csv, write_parquet

IN_STOCK = InputConfig(products=TableInputConfig(available="in_stock"))


def _load(data_dir, config=IN_STOCK):
    with open_table(PRODUCTS, data_dir, config) as stored:
        return load_products(stored, config)


def test_csv_availability_words_and_numbers_are_read_and_an_empty_one_counts_as_unavailable(tmp_path):
    write_csv(tmp_path, PRODUCTS, "product_id,category,in_stock\n"
              "p1,a,true\np2,b,FALSE\np3,a,\np4,b,Yes\np5,a,1\np6,b,0\np7,a, n \np8,b,1.0\n")

    frame = read_products(tmp_path, IN_STOCK)

    assert frame.columns == [PRODUCT_ID, "category", AVAILABLE]
    assert dict(zip(frame[PRODUCT_ID], frame[AVAILABLE])) == {
        "p1": True, "p2": False, "p3": False, "p4": True, "p5": True, "p6": False, "p7": False, "p8": True}
    # Not a feature: an unavailable product still trains the model on its history, and the model never sees stock.
    assert [s.name for s in infer_features(PRODUCTS, frame, IN_STOCK)] == ["category"]
    assert [s.name for s in infer_features(PRODUCTS, frame)] == ["category"]  # the frame alone says so too
    assert unavailable_products(frame).sort().to_list() == ["p2", "p3", "p6", "p7"]


@pytest.mark.parametrize("values", [[True, False, None], [1, 0, None]])
def test_parquet_booleans_and_integers_are_read(tmp_path, values):
    write_parquet(tmp_path, PRODUCTS, pl.DataFrame({PRODUCT_ID: ["p1", "p2", "p3"], "in_stock": values}))

    assert read_products(tmp_path, IN_STOCK).get_column(AVAILABLE).to_list() == [True, False, False]


def test_a_value_that_is_not_a_boolean_is_rejected_with_its_row_and_nothing_is_lost(tmp_path):
    write_csv(tmp_path, PRODUCTS, "product_id,in_stock\np1,true\np2,maybe\np3,2\np4,false\n")

    load = _load(tmp_path)

    assert load.accepted.get_column(PRODUCT_ID).to_list() == ["p1", "p4"]
    rejected = load.rejected
    assert rejected.select("_row", "_reason", "_column", "in_stock").rows() == [
        (3, "invalid_boolean", "in_stock", "maybe"), (4, "invalid_boolean", "in_stock", "2")]  # values as stored
    assert load.accepted.height + rejected.height == load.received == 4
    with pytest.raises(InputError, match=r"(?s)products\.csv.*column 'in_stock'.*line 3: 'maybe'"):
        read_products(tmp_path, IN_STOCK)  # strict reading: the message names file, column and line


def test_without_the_config_key_the_column_is_an_ordinary_attribute(tmp_path):
    write_csv(tmp_path, PRODUCTS, "product_id,in_stock\np1,true\np2,false\n")

    frame = read_products(tmp_path)

    assert AVAILABLE not in frame.columns and unavailable_products(frame) is None
    assert [s.name for s in infer_features(PRODUCTS, frame)] == ["in_stock"]


def test_an_input_column_named_like_the_availability_is_refused(tmp_path):
    write_csv(tmp_path, PRODUCTS, "product_id,_available\np1,true\n")

    with pytest.raises(InputError, match=r"'_available'.*reserved"):
        read_products(tmp_path)


def test_a_list_availability_column_is_fatal_and_says_what_it_must_hold(tmp_path):
    write_parquet(tmp_path, PRODUCTS, pl.DataFrame({PRODUCT_ID: ["p1"], "in_stock": [[True]]}))

    with pytest.raises(InputError, match=r"column 'in_stock'.*products\.available.*must be true/false"):
        read_products(tmp_path, IN_STOCK)


def test_the_config_key_names_a_column_the_data_must_have(tmp_path):
    write_csv(tmp_path, PRODUCTS, "product_id,category\np1,a\n")
    path = write_config(tmp_path, "products:\n  available: in_stock\n")

    with pytest.raises(InputConfigError, match=r"key 'products\.available' names column 'in_stock'"):
        read_products(tmp_path, load_input_config(path))


@pytest.mark.parametrize(
    ("yaml_text", "message"),
    [
        ("customers:\n  available: active\n", "only products"),
        ("products:\n  available: [in_stock]\n", "expected a column name"),
        ("products:\n  available: in_stock\n  exclude: [in_stock]\n", "not a feature"),
        ("products:\n  available: in_stock\n  roles: {in_stock: categorical}\n", "not a feature"),
        ("products:\n  available: product_id\n", "is the id column"),
    ],
)
def test_config_mistakes_name_the_key(tmp_path, yaml_text, message):
    with pytest.raises(InputConfigError, match=rf"key '(customers|products)\.available'.*{message}"):
        load_input_config(write_config(tmp_path, yaml_text))


FEED_DATE = "2026-03-31"


@pytest.fixture(scope="module")
def stocked_demo(tmp_path_factory):
    """The tiny demo, with an `in_stock` column that marks a fifth of the catalogue (the top sellers among them)
    unavailable, named in the data directory's input config."""
    d = tmp_path_factory.mktemp("stocked")
    generate_demo_data(d, customers=300, products=80, days=40, end_date=date(2026, 3, 30), seed=3)
    (path,) = d.glob(f"{PRODUCTS}.*")
    products = pl.read_parquet(path) if path.suffix == ".parquet" else pl.read_csv(path)
    (tx,) = d.glob("transactions.*")
    sellers = pl.read_parquet(tx) if tx.suffix == ".parquet" else pl.read_csv(tx)
    top = sellers.group_by(PRODUCT_ID).len().sort("len", descending=True).get_column(PRODUCT_ID).cast(pl.Utf8)
    out = set(top.head(8).to_list()) | set(products.get_column(PRODUCT_ID).cast(pl.Utf8).tail(8).to_list())
    products = products.with_columns((~pl.col(PRODUCT_ID).cast(pl.Utf8).is_in(list(out))).alias("in_stock"))
    products.write_parquet(path) if path.suffix == ".parquet" else products.write_csv(path)
    (d / INPUT_CONFIG_FILE).write_text("products:\n  available: in_stock\n", encoding="utf-8")
    return d, out


def test_unavailable_products_are_never_scored_and_the_metadata_counts_them(tmp_path, stocked_demo, pg_url,
                                                                            monkeypatch):
    monkeypatch.setenv("FEEDPIPE_DATABASE_URL", pg_url)
    data_dir, out = stocked_demo
    resources = build_resources(artifacts_root=str(tmp_path / "artifacts"), data_dir=str(data_dir))
    selection = ["transactions", "customers", "products", "vocabularies", "training_examples", "dlrm_model",
                 "model_evaluation", "pair_scores"]
    result = dg.materialize(
        list(defs.assets), selection=selection, partition_key=FEED_DATE, resources=resources,
        instance=dg.DagsterInstance.ephemeral(),
        run_config={"ops": {
            "training_examples": {"config": {"negatives_per_positive": 4}},
            "dlrm_model": {"config": {"epochs": 2, "min_validation_auc": 0.5}},
            "model_evaluation": {"config": {"min_margin_over_popularity": -1.0}},
            "pair_scores": {"config": {"top_n": 30}},
        }},
    )
    stored = ArtifactIOManager(artifacts=ArtifactsResource(root=str(tmp_path / "artifacts")))
    scores = stored.load_input(dg.build_input_context(asset_key=dg.AssetKey("pair_scores"), partition_key=FEED_DATE,
                                                      resources=resources))
    products = result.asset_materializations_for_node("products")[0].metadata
    meta = result.asset_materializations_for_node("pair_scores")[0].metadata

    assert not scores.filter(pl.col(PRODUCT_ID).is_in(list(out))).height  # not one unavailable product
    assert scores.get_column(PRODUCT_ID).n_unique() > 30  # ... while the others are all there to be ranked
    assert products["unavailable"].value == len(out) and products["available"].value == 80 - len(out)
    assert meta["products_unavailable"].value == len(out)
    customers = result.asset_materializations_for_node("customers")[0].metadata["dagster/row_count"].value
    assert meta["pairs_scored"].value == customers * (80 - len(out))
