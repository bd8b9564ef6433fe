from __future__ import annotations

from datetime import date, datetime, timedelta, timezone
from pathlib import Path

import polars as pl
import pytest
from polars.testing import assert_frame_equal

from feedpipe.contract import (
    CATEGORICAL,
    CUSTOMER_ID,
    CUSTOMERS,
    DENSE,
    MULTI_CATEGORICAL,
    PRODUCT_ID,
    PRODUCTS,
    QUANTITY,
    TRANSACTIONS,
    TS,
)
from feedpipe.input_config import InputConfig, InputConfigError, TableInputConfig, load_input_config
from feedpipe.sources import (
    FeatureSpec,
    InputError,
    find_table_file,
    infer_features,
    read_customers,
    read_products,
    read_transactions,
)


def write_csv(data_dir: Path, table: str, text: str) -> Path:
    data_dir.mkdir(parents=True, exist_ok=True)
    path = data_dir / f"{table}.csv"
    path.write_text(text, encoding="utf-8")
    return path


def write_parquet(data_dir: Path, table: str, frame: pl.DataFrame) -> Path:
    data_dir.mkdir(parents=True, exist_ok=True)
    path = data_dir / f"{table}.parquet"
    frame.write_parquet(path)
    return path


def write_config(tmp_path: Path, text: str) -> Path:
    path = tmp_path / "input.yaml"
    path.write_text(text, encoding="utf-8")
    return path


# --- ids ---------------------------------------------------------------------------------------------------------


def test_parquet_integer_ids_and_csv_text_ids_load_as_the_same_text(tmp_path):
    write_parquet(tmp_path / "pq", TRANSACTIONS, pl.DataFrame(
        {CUSTOMER_ID: [42, 7], PRODUCT_ID: [1, 2], TS: [date(2024, 1, 1)] * 2}))
    write_csv(tmp_path / "csv", TRANSACTIONS, "customer_id,product_id,ts\n42,1,2024-01-01\n7,2,2024-01-01\n")

    from_parquet = read_transactions(tmp_path / "pq")
    from_csv = read_transactions(tmp_path / "csv")

    assert from_parquet[CUSTOMER_ID].to_list() == ["42", "7"]
    assert from_parquet.schema[CUSTOMER_ID] == pl.Utf8
    assert_frame_equal(from_parquet, from_csv)


def test_csv_ids_keep_leading_zeros(tmp_path):
    write_csv(tmp_path, CUSTOMERS, "customer_id,age\n007,30\n0042,40\n42,50\n")

    customers = read_customers(tmp_path)

    assert customers[CUSTOMER_ID].to_list() == ["007", "0042", "42"]


def test_parquet_text_ids_come_back_unchanged(tmp_path):
    write_parquet(tmp_path, PRODUCTS, pl.DataFrame({PRODUCT_ID: ["007", "sku-1 "], "brand": ["a", "b"]}))

    assert read_products(tmp_path)[PRODUCT_ID].to_list() == ["007", "sku-1 "]


# --- roles -------------------------------------------------------------------------------------------------------


def test_roles_are_inferred_from_parquet_dtypes(tmp_path):
    write_parquet(tmp_path, PRODUCTS, pl.DataFrame({
        PRODUCT_ID: [1, 2],
        "price": [10, 20],
        "brand": ["acme", "zeta"],
        "tags": [["a", "b"], []],
        "on_sale": [True, False],
    }))

    products = read_products(tmp_path)

    assert products.schema == pl.Schema({
        PRODUCT_ID: pl.Utf8, "price": pl.Float64, "brand": pl.Utf8, "tags": pl.List(pl.Utf8), "on_sale": pl.Utf8,
    })
    assert products["on_sale"].to_list() == ["true", "false"]
    assert infer_features(PRODUCTS, products) == [
        FeatureSpec("price", PRODUCTS, DENSE),
        FeatureSpec("brand", PRODUCTS, CATEGORICAL),
        FeatureSpec("tags", PRODUCTS, MULTI_CATEGORICAL),
        FeatureSpec("on_sale", PRODUCTS, CATEGORICAL),
    ]


def test_csv_column_is_dense_only_when_every_nonempty_value_is_a_number(tmp_path):
    write_csv(tmp_path, CUSTOMERS, "customer_id,age,score,zip\n1,30,1.5,02139\n2,,2e3,N1 9GU\n")

    customers = read_customers(tmp_path)

    assert customers["age"].to_list() == [30.0, None]
    assert customers["score"].to_list() == [1.5, 2000.0]
    assert customers["zip"].to_list() == ["02139", "N1 9GU"]
    assert [f.role for f in infer_features(CUSTOMERS, customers)] == [DENSE, DENSE, CATEGORICAL]


def test_yaml_categorical_role_keeps_a_numeric_looking_csv_column_as_text(tmp_path):
    write_csv(tmp_path, CUSTOMERS, "customer_id,zip\n1,02139\n2,10001\n")
    config = load_input_config(write_config(tmp_path, "customers:\n  roles: {zip: categorical}\n"))

    customers = read_customers(tmp_path, config)

    assert customers["zip"].to_list() == ["02139", "10001"]
    assert infer_features(CUSTOMERS, customers, config) == [FeatureSpec("zip", CUSTOMERS, CATEGORICAL)]


def test_yaml_dense_role_parses_a_parquet_text_column(tmp_path):
    write_parquet(tmp_path, PRODUCTS, pl.DataFrame({PRODUCT_ID: ["p1", "p2"], "price": [" 9.5", None]}))
    config = load_input_config(write_config(tmp_path, "products:\n  roles: {price: dense}\n"))

    assert read_products(tmp_path, config)["price"].to_list() == [9.5, None]


def test_yaml_categorical_role_turns_parquet_integers_into_text(tmp_path):
    write_parquet(tmp_path, PRODUCTS, pl.DataFrame({PRODUCT_ID: ["p1"], "store": [12]}))
    config = InputConfig(products=TableInputConfig(roles={"store": CATEGORICAL}))

    assert read_products(tmp_path, config)["store"].to_list() == ["12"]


def test_parquet_text_of_digits_stays_categorical(tmp_path):
    write_parquet(tmp_path, CUSTOMERS, pl.DataFrame({CUSTOMER_ID: ["c1"], "zip": ["02139"]}))

    assert read_customers(tmp_path)["zip"].to_list() == ["02139"]


def test_excluded_columns_are_dropped(tmp_path):
    write_csv(tmp_path, CUSTOMERS, "customer_id,email,age\n1,a@example.com,30\n")
    config = load_input_config(write_config(tmp_path, "customers:\n  exclude: [email]\n"))

    customers = read_customers(tmp_path, config)

    assert customers.columns == [CUSTOMER_ID, "age"]
    assert infer_features(CUSTOMERS, customers, config) == [FeatureSpec("age", CUSTOMERS, DENSE)]


def test_infer_features_applies_config_to_a_frame_not_loaded_here(tmp_path):
    frame = pl.DataFrame({PRODUCT_ID: ["p"], "email": ["x"], "tags": ["a|b"], "size": [3]})
    config = InputConfig(products=TableInputConfig(exclude=("email",), multi_valued=("tags",), roles={"size": CATEGORICAL}))

    assert infer_features(PRODUCTS, frame, config) == [
        FeatureSpec("tags", PRODUCTS, MULTI_CATEGORICAL),
        FeatureSpec("size", PRODUCTS, CATEGORICAL),
    ]


def test_csv_multi_valued_column_is_split_and_empty_cell_is_empty_list(tmp_path):
    write_csv(tmp_path, PRODUCTS, 'product_id,tags\np1,red|big\np2,\np3,"solo"\np4,a | b||c\n')
    config = load_input_config(write_config(tmp_path, "products:\n  multi_valued: [tags]\n"))

    products = read_products(tmp_path, config)

    assert products.schema["tags"] == pl.List(pl.Utf8)
    assert products["tags"].to_list() == [["red", "big"], [], ["solo"], ["a", "b", "c"]]


def test_config_delimiter_is_used_for_splitting(tmp_path):
    write_csv(tmp_path, PRODUCTS, "product_id,tags\np1,red;big\n")
    config = load_input_config(write_config(tmp_path, 'delimiter: ";"\nproducts:\n  multi_valued: [tags]\n'))

    assert read_products(tmp_path, config)["tags"].to_list() == [["red", "big"]]


def test_parquet_and_csv_of_the_same_data_load_identically(tmp_path):
    pq, csv = tmp_path / "pq", tmp_path / "csv"
    write_parquet(pq, TRANSACTIONS, pl.DataFrame({
        CUSTOMER_ID: [1, 2], PRODUCT_ID: ["007", "x"],
        TS: [datetime(2024, 1, 1, 10, 30), datetime(2024, 1, 2)], QUANTITY: [2, 1], "store": ["s1", "s2"],
    }))
    write_csv(csv, TRANSACTIONS, "customer_id,product_id,ts,quantity,store\n"
                                 "1,007,2024-01-01T10:30:00,2,s1\n2,x,2024-01-02,1,s2\n")
    write_parquet(pq, CUSTOMERS, pl.DataFrame({
        CUSTOMER_ID: [1, 2], "age": [30, None], "region": ["north", None], "vip": [True, False],
    }))
    write_csv(csv, CUSTOMERS, "customer_id,age,region,vip\n1,30,north,true\n2,,,false\n")
    write_parquet(pq, PRODUCTS, pl.DataFrame({PRODUCT_ID: ["007", "x"], "price": [1.5, 2.0], "tags": [["a", "b"], []]}))
    write_csv(csv, PRODUCTS, "product_id,price,tags\n007,1.5,a|b\nx,2.0,\n")
    config = InputConfig(products=TableInputConfig(multi_valued=("tags",)))

    for read in (read_transactions, read_customers, read_products):
        assert_frame_equal(read(pq, config), read(csv, config))


# --- transactions ------------------------------------------------------------------------------------------------


def test_transactions_have_exactly_the_contract_columns_and_dtypes(tmp_path):
    write_csv(tmp_path, TRANSACTIONS, "ts,extra,product_id,customer_id\n2024-01-01,x,p,c\n")

    assert read_transactions(tmp_path).schema == pl.Schema(
        {CUSTOMER_ID: pl.Utf8, PRODUCT_ID: pl.Utf8, TS: pl.Datetime("us"), QUANTITY: pl.Float64})


def test_quantity_defaults_to_one_when_column_or_cell_is_missing(tmp_path):
    write_csv(tmp_path / "no_column", TRANSACTIONS, "customer_id,product_id,ts\nc,p,2024-01-01\n")
    write_csv(tmp_path / "empty_cell", TRANSACTIONS, "customer_id,product_id,ts,quantity\nc,p,2024-01-01,\nc,p,2024-01-01,2.5\n")

    assert read_transactions(tmp_path / "no_column")[QUANTITY].to_list() == [1.0]
    assert read_transactions(tmp_path / "empty_cell")[QUANTITY].to_list() == [1.0, 2.5]


def test_csv_timestamps_in_iso_variants_become_naive_utc(tmp_path):
    write_csv(tmp_path, TRANSACTIONS, "customer_id,product_id,ts\n"
              "c,p,2024-01-02\n"
              "c,p,2024-01-02 03:04:05\n"
              "c,p,2024-01-02T03:04:05.250\n"
              "c,p,2024-01-02T03:04\n"
              "c,p,2024-01-02T03:04:05Z\n"
              "c,p,2024-01-02T03:04:05+02:00\n")

    assert read_transactions(tmp_path)[TS].to_list() == [
        datetime(2024, 1, 2),
        datetime(2024, 1, 2, 3, 4, 5),
        datetime(2024, 1, 2, 3, 4, 5, 250000),
        datetime(2024, 1, 2, 3, 4),
        datetime(2024, 1, 2, 3, 4, 5),
        datetime(2024, 1, 2, 1, 4, 5),
    ]


def test_parquet_timezone_aware_timestamps_are_converted_to_utc_and_made_naive(tmp_path):
    berlin = timezone(timedelta(hours=1))
    write_parquet(tmp_path, TRANSACTIONS, pl.DataFrame(
        {CUSTOMER_ID: ["c"], PRODUCT_ID: ["p"], TS: [datetime(2024, 1, 1, 12, tzinfo=berlin)]}))

    ts = read_transactions(tmp_path)[TS]

    assert ts.dtype == pl.Datetime("us")
    assert ts.to_list() == [datetime(2024, 1, 1, 11)]


def test_parquet_date_ts_becomes_midnight(tmp_path):
    write_parquet(tmp_path, TRANSACTIONS, pl.DataFrame({CUSTOMER_ID: ["c"], PRODUCT_ID: ["p"], TS: [date(2024, 5, 6)]}))

    assert read_transactions(tmp_path)[TS].to_list() == [datetime(2024, 5, 6)]


# --- input errors ------------------------------------------------------------------------------------------------


def test_missing_table_file_names_the_expected_files(tmp_path):
    with pytest.raises(InputError, match=r"missing products\.parquet or products\.csv"):
        read_products(tmp_path)


def test_both_csv_and_parquet_present_is_an_error(tmp_path):
    write_csv(tmp_path, CUSTOMERS, "customer_id\n1\n")
    write_parquet(tmp_path, CUSTOMERS, pl.DataFrame({CUSTOMER_ID: [1]}))

    with pytest.raises(InputError, match=r"both customers\.parquet and customers\.csv"):
        find_table_file(tmp_path, CUSTOMERS)


def test_missing_required_column_names_file_and_column(tmp_path):
    write_csv(tmp_path, TRANSACTIONS, "customer_id,product_id,when\nc,p,2024-01-01\n")

    with pytest.raises(InputError, match=r"transactions\.csv: missing required column\(s\) 'ts'"):
        read_transactions(tmp_path)


def test_truncated_parquet_names_the_file(tmp_path):
    path = write_parquet(tmp_path, PRODUCTS, pl.DataFrame({PRODUCT_ID: list(range(100))}))
    path.write_bytes(path.read_bytes()[:50])

    with pytest.raises(InputError, match=r"products\.parquet: cannot read the file"):
        read_products(tmp_path)


def test_csv_cut_off_mid_row_names_the_file_and_line(tmp_path):
    write_csv(tmp_path, TRANSACTIONS, "customer_id,product_id,ts\nc,p,2024-01-01\nc,p")

    with pytest.raises(InputError, match=r"(?s)transactions\.csv: 1 line\(s\) do not have .* 3 fields.*line 3: 2 fields"):
        read_transactions(tmp_path)


@pytest.mark.filterwarnings("ignore::pytest.PytestUnraisableExceptionWarning")  # pyarrow's own, on its first try
@pytest.mark.parametrize("bom", [b"", b"\xef\xbb\xbf"])
def test_a_short_line_with_bytes_that_are_not_utf8_is_named_by_line_too(tmp_path, bom):
    """pyarrow cannot hand such a line to its row handler (it decodes the text first); the message still names it."""
    data = b"customer_id,product_id,ts\nc,p,2024-01-01\nc,p\xe3\nc,p,2024-01-02\n"
    (tmp_path / "transactions.csv").write_bytes(bom + data)

    with pytest.raises(InputError, match=r"transactions\.csv: 1 line\(s\) do not have the header's 3 fields") as err:
        read_transactions(tmp_path)
    assert "line 3: 2 fields: 'c,p\\\\xe3'" in str(err.value)  # the byte shown escaped, not mangled


def test_empty_csv_names_the_file(tmp_path):
    write_csv(tmp_path, CUSTOMERS, "")

    with pytest.raises(InputError, match=r"customers\.csv: empty file"):
        read_customers(tmp_path)


def test_unparsable_ts_names_file_column_lines_and_formats(tmp_path):
    write_csv(tmp_path, TRANSACTIONS, "customer_id,product_id,ts\nc,p,2024-01-01\nc,p,yesterday\nc,p,2024-13-01\n")

    with pytest.raises(InputError) as err:
        read_transactions(tmp_path)

    message = str(err.value)
    assert "transactions.csv" in message
    assert "column 'ts': 2 row(s)" in message
    assert "line 3: 'yesterday'" in message and "line 4: '2024-13-01'" in message
    assert "ISO 8601" in message


def test_null_ids_are_reported_with_parquet_row_numbers(tmp_path):
    write_parquet(tmp_path, TRANSACTIONS, pl.DataFrame(
        {CUSTOMER_ID: ["c", None, ""], PRODUCT_ID: ["p"] * 3, TS: [date(2024, 1, 1)] * 3}))

    with pytest.raises(InputError, match=r"(?s)transactions\.parquet.*column 'customer_id': 2 row\(s\) have no id.*row 2: empty.*row 3: empty"):
        read_transactions(tmp_path)


def test_only_the_first_five_bad_rows_are_listed(tmp_path):
    rows = "".join(f"c,p,bad{i}\n" for i in range(8))
    write_csv(tmp_path, TRANSACTIONS, "customer_id,product_id,ts\n" + rows)

    with pytest.raises(InputError) as err:
        read_transactions(tmp_path)

    assert "line 6: 'bad4'" in str(err.value)
    assert "bad5" not in str(err.value)
    assert "... and 3 more" in str(err.value)


def test_conflicting_duplicate_ids_in_an_attribute_table_are_an_error_in_strict_reading(tmp_path):
    write_csv(tmp_path, PRODUCTS, "product_id,brand\np1,a\np2,b\np1,c\n")

    with pytest.raises(InputError, match=r"(?s)products\.csv.*'product_id': 2 row\(s\) share their id.*line 2: 'p1'.*line 4: 'p1'"):
        read_products(tmp_path)


def test_forced_dense_column_that_does_not_parse_names_file_column_and_lines(tmp_path):
    write_csv(tmp_path, PRODUCTS, "product_id,price\np1,9.99\np2,free\np3,\n")
    config = load_input_config(write_config(tmp_path, "products:\n  roles: {price: dense}\n"))

    with pytest.raises(InputError, match=r"(?s)products\.csv.*column 'price': 1 row\(s\) do not parse as a finite number.*line 3: 'free'"):
        read_products(tmp_path, config)


def test_quantity_that_does_not_parse_is_an_error(tmp_path):
    write_csv(tmp_path, TRANSACTIONS, "customer_id,product_id,ts,quantity\nc,p,2024-01-01,two\n")

    with pytest.raises(InputError, match=r"(?s)transactions\.csv.*column 'quantity'.*line 2: 'two'"):
        read_transactions(tmp_path)


def test_unsupported_attribute_dtype_suggests_excluding_it(tmp_path):
    write_parquet(tmp_path, CUSTOMERS, pl.DataFrame({CUSTOMER_ID: ["c"], "signup": [date(2024, 1, 1)]}))

    with pytest.raises(InputError, match=r"customers\.parquet: column 'signup' holds Date.*customers\.exclude"):
        read_customers(tmp_path)


def test_float_ids_are_rejected(tmp_path):
    write_parquet(tmp_path, CUSTOMERS, pl.DataFrame({CUSTOMER_ID: [1.0]}))

    with pytest.raises(InputError, match=r"customers\.parquet: column 'customer_id' holds Float64"):
        read_customers(tmp_path)


# --- config errors -----------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("yaml_text", "key"),
    [
        ("delimeter: ','\n", "delimeter"),
        ("transactions:\n  exclude: [x]\n", "transactions"),
        ("orders:\n  exclude: [x]\n", "orders"),
        ("customers:\n  drop: [x]\n", "customers.drop"),
        ("customers:\n  roles: {age: numeric}\n", "customers.roles.age"),
        ("customers:\n  exclude: email\n", "customers.exclude"),
        ("products:\n  exclude: [product_id]\n", "products.exclude"),
        ("products:\n  multi_valued: [tags]\n  roles: {tags: dense}\n", "products.roles.tags"),
        ("delimiter: ''\n", "delimiter"),
    ],
)
def test_config_errors_name_the_file_and_key(tmp_path, yaml_text, key):
    path = write_config(tmp_path, yaml_text)

    with pytest.raises(InputConfigError) as err:
        load_input_config(path)

    assert str(path) in str(err.value)
    assert f"key '{key}'" in str(err.value)


def test_config_role_for_a_column_the_data_lacks_names_config_key_and_data_file(tmp_path):
    write_csv(tmp_path, PRODUCTS, "product_id,price\np1,1\n")
    path = write_config(tmp_path, "products:\n  roles: {cost: dense}\n")

    with pytest.raises(InputConfigError, match=r"input\.yaml: key 'products\.roles\.cost' names column 'cost'.*products\.csv"):
        read_products(tmp_path, load_input_config(path))


def test_config_error_is_an_input_error(tmp_path):
    assert issubclass(InputConfigError, InputError)


def test_invalid_yaml_names_the_file(tmp_path):
    path = write_config(tmp_path, "customers: [unclosed\n")

    with pytest.raises(InputConfigError, match=r"input\.yaml: not valid YAML"):
        load_input_config(path)


def test_no_config_file_and_empty_file_mean_defaults(tmp_path):
    assert load_input_config(None) == InputConfig.default()
    assert load_input_config(write_config(tmp_path, "")).customers == TableInputConfig()


def test_list_column_with_a_scalar_role_is_a_config_error(tmp_path):
    write_parquet(tmp_path, PRODUCTS, pl.DataFrame({PRODUCT_ID: ["p"], "tags": [["a"]]}))
    path = write_config(tmp_path, "products:\n  roles: {tags: categorical}\n")

    with pytest.raises(InputConfigError, match=r"key 'products\.roles\.tags'.*holds lists"):
        read_products(tmp_path, load_input_config(path))


def test_a_header_with_an_unnamed_column_still_loads(tmp_path):
    # A trailing comma in the header ("a,b,") gives a column named ""; found by the property test.
    write_csv(tmp_path, CUSTOMERS, "customer_id,age,\nc1,30,\nc2,41,\n")

    customers = read_customers(tmp_path)

    assert customers.columns == [CUSTOMER_ID, "age", ""]
    assert customers.get_column(CUSTOMER_ID).to_list() == ["c1", "c2"]


def test_a_data_line_that_is_not_utf8_does_not_make_the_header_unreadable(tmp_path):
    path = tmp_path / "products.csv"
    path.write_bytes(b"product_id,brand\np1,acme\np2,caf\xe9\n")

    with pytest.raises(InputError, match=r"(?s)column 'brand': 1 row\(s\) are not valid UTF-8.*line 3: 'caf\\\\xe9'"):
        read_products(tmp_path)


def test_finding_an_unclosed_quote_takes_memory_that_does_not_grow_with_the_quoted_value(tmp_path):
    """One quoted value of 20 MB, never closed: the scan's regex held per-character state (2.4 GB) before."""
    import subprocess
    import sys

    path = tmp_path / "t.csv"
    path.write_bytes(b'a,b\n1,"' + b"x" * 20_000_000 + b"\n2,3")
    child = ("import resource, sys; from pathlib import Path; from feedpipe.table_files import _ends_inside_quotes; "
             "before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss; "
             f"assert _ends_inside_quotes(Path({str(path)!r})); "
             "print(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - before)")
    grown_kb = int(subprocess.run([sys.executable, "-c", child], check=True, capture_output=True, text=True).stdout)
    assert grown_kb < 200_000, grown_kb  # the file is mapped, not copied: well under 10x its size
