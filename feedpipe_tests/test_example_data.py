import polars as pl

from feedpipe import sources
from feedpipe.example_data import movielens


def test_movielens_converts_into_the_input_contract(tmp_path):
    summary = movielens(tmp_path)
    tx = sources.read_transactions(tmp_path)
    products = sources.read_products(tmp_path)
    customers = sources.read_customers(tmp_path)
    assert tx.height == summary["transactions"] == 100_004
    assert customers.height == 671 and products.height == summary["products"]
    assert products.schema["genres"] == pl.List(pl.Utf8) and products.schema["year"] == pl.Float64
    assert "Comedy" in products.get_column("genres").explode().unique().to_list()
    assert tx.get_column("ts").max().date().isoformat() < summary["feed_date"]
    assert (tmp_path / "run.yaml").read_text().startswith("# MovieLens")


def test_the_movielens_run_config_passes_feedpipe_runs_config_checks():
    """Its pair_scores excluded 9000 days while model_evaluation's default judged 90: the run was refused."""
    import yaml

    from feedpipe.cli import _check_asset_configs
    from feedpipe.example_data import MOVIELENS_RUN_CONFIG

    _check_asset_configs(yaml.safe_load(MOVIELENS_RUN_CONFIG), "run.yaml")  # UsageError naming the setting if not
