"""Each asset materialized on its own (upstream values loaded from the IO manager), on tiny demo data."""

import re
from datetime import date

import dagster as dg
import polars as pl
import psycopg
import pytest

from feedpipe.definitions import build_resources, defs
from feedpipe.defs.io_manager import ArtifactIOManager
from feedpipe.defs.resources import ArtifactsResource
from feedpipe.demo_data import generate_demo_data

FEED_DATE = "2026-03-31"
ASSETS = list(defs.assets)
FAST_TRAINING = {
    "ops": {
        "training_examples": {"config": {"negatives_per_positive": 4}},
        "dlrm_model": {"config": {"epochs": 3, "min_validation_auc": 0.5}},
        # tiny data: the gate is tested on its own below, here it must not depend on a lucky draw
        "model_evaluation": {"config": {"min_margin_over_popularity": -1.0}},
    }
}


@pytest.fixture(scope="module")
def demo_dir(tmp_path_factory):
    d = tmp_path_factory.mktemp("demo")
    generate_demo_data(d, customers=300, products=80, days=40, end_date=date(2026, 3, 30), seed=3)
    return d


@pytest.fixture
def env(tmp_path, demo_dir, pg_url, monkeypatch):
    monkeypatch.setenv("FEEDPIPE_DATABASE_URL", pg_url)
    resources = build_resources(artifacts_root=str(tmp_path / "artifacts"), data_dir=str(demo_dir))
    stored = ArtifactIOManager(artifacts=ArtifactsResource(root=str(tmp_path / "artifacts")))  # outside a run
    instance = dg.DagsterInstance.ephemeral()

    def run(selection, partition=FEED_DATE, run_config=None, raise_on_error=True):
        run_config = run_config or FAST_TRAINING
        if selection is not None:  # config may only name selected assets
            run_config = {"ops": {k: v for k, v in run_config["ops"].items() if k in selection}}
        return dg.materialize(
            ASSETS,
            selection=selection,
            partition_key=partition,
            resources=resources,
            instance=instance,
            run_config=run_config,
            raise_on_error=raise_on_error,
        )

    def load(asset, partition=FEED_DATE):
        return stored.load_input(
            dg.build_input_context(asset_key=dg.AssetKey(asset), partition_key=partition, resources=resources)
        )

    return run, load, pg_url, instance


def _materialization(result, asset):
    return result.asset_materializations_for_node(asset)[0]


def test_input_assets_give_typed_frames_and_row_count_metadata(env):
    run, load, *_ = env
    result = run(["transactions", "customers", "products"])
    tx = load("transactions")
    assert tx.schema["customer_id"] == pl.Utf8 and tx.schema["ts"] == pl.Datetime("us")
    meta = _materialization(result, "transactions").metadata
    assert meta["dagster/row_count"].value == tx.height > 0
    assert meta["last_ts"].value < FEED_DATE
    assert _materialization(result, "customers").metadata["dagster/row_count"].value == 300


def test_vocabularies_of_a_later_night_extend_the_earlier_one(env):
    run, load, *_ = env
    run(["transactions", "customers", "products", "vocabularies"])
    run(["transactions", "customers", "products", "vocabularies"], partition="2026-04-01")
    first, second = load("vocabularies"), load("vocabularies", "2026-04-01")
    joined = first.table.join(second.table, on=["feature", "value"], suffix="_later")
    assert joined.height == first.table.height
    assert (joined.get_column("index") == joined.get_column("index_later")).all()


def test_training_examples_hold_both_splits_and_encoded_features(env):
    run, load, *_ = env
    run(["transactions", "customers", "products", "vocabularies", "training_examples"])
    ex = load("training_examples")
    assert set(ex.get_column("split").unique()) == {"train", "validation", "test"}
    assert ex.schema["products.tags"] == pl.List(pl.Int64)
    assert ex.filter(pl.col("label") == 0).height >= 3 * ex.filter(pl.col("label") == 1).height


MODEL = ["transactions", "customers", "products", "vocabularies", "training_examples", "dlrm_model"]


def test_model_metadata_reports_auc_loss_and_throughput(env):
    run, load, *_ = env
    result = run(MODEL)
    meta = _materialization(result, "dlrm_model").metadata
    assert 0.5 < meta["validation_auc"].value <= 1.0
    assert meta["samples_per_s"].value > 0 and meta["parameters"].value > 0 and meta["device"].value == "cpu"
    checks = result.get_asset_check_evaluations()
    assert [c.passed for c in checks if c.check_name == "validation_auc_floor"] == [True]
    assert load("dlrm_model").metrics["validation_auc"] == meta["validation_auc"].value


def test_model_evaluation_compares_every_ranker_and_gates_on_popularity(env):
    run, load, *_ = env
    result = run(MODEL + ["model_evaluation"])
    meta = _materialization(result, "model_evaluation").metadata
    ev = load("model_evaluation")
    assert set(ev.ranking) == {"dlrm", "popularity", "lightgbm", "oracle"}
    for metrics in ev.ranking.values():
        assert all(0.0 <= metrics[m] <= 1.0 for m in ("recall", "ndcg", "map", "hit_rate", "coverage"))
    assert meta["dlrm_recall_at_20"].value == ev.ranking["dlrm"]["recall"]
    assert "data:image/png;base64," in meta["loss_curves"].value
    # ranked as the feed of the first held-out day would be: the 90 days of purchases before it excluded
    assert meta["held_out_from"].value == "2026-03-24"
    tx = load("transactions")
    bought_before = tx.filter(pl.col("ts") < pl.datetime(2026, 3, 24)).select("customer_id", "product_id").unique()
    assert meta["excluded_pairs"].value == bought_before.height
    gate = [c for c in result.get_asset_check_evaluations() if c.check_name == "beats_popularity"]
    margin = ev.ranking["dlrm"]["recall"] - ev.ranking["popularity"]["recall"]
    assert len(gate) == 1 and gate[0].passed  # FAST_TRAINING's margin is -1: any finite recall passes
    assert gate[0].metadata["margin"].value == pytest.approx(margin)
    # Ranked: the test half's customers with history, none of the validation half the model early-stopped on.
    ex = load("training_examples")
    positives = ex.filter(pl.col("label") == 1.0)
    history = set(positives.filter(pl.col("split") == "train").get_column("customer_id"))
    test = set(positives.filter(pl.col("split") == "test").get_column("customer_id")) & history
    assert ev.customers == min(len(test), 3000) > 0
    assert ev.model["auc"] != load("dlrm_model").metrics["validation_auc"]  # the test half's, not validation's


def test_pair_scores_keep_top_n_and_exclude_past_purchases(env):
    """In bf16 re-ranked in fp32: the fast precision, and the one whose ranking pair_scores checks against fp32."""
    run, load, *_ = env
    scoring = {"config": {"top_n": 10, "dtype": "bf16-rerank"}}
    result = run(MODEL + ["model_evaluation", "pair_scores"],
                 run_config={**FAST_TRAINING, "ops": {**FAST_TRAINING["ops"], "pair_scores": scoring}})
    scores, tx = load("pair_scores"), load("transactions")
    assert scores.group_by("customer_id").agg(pl.len()).get_column("len").max() == 10
    assert scores.join(tx.select("customer_id", "product_id").unique(), on=["customer_id", "product_id"], how="semi").is_empty()
    meta = _materialization(result, "pair_scores").metadata
    assert meta["dtype"].value == "bf16-rerank" and meta["device"].value == "cpu"  # compute: auto, no GPU here
    assert meta["top20_overlap_bf16-rerank_vs_fp32"].value >= 0.99
    # The feed's default k (20) is more than the 10 kept: refused instead of a feed silently cut at 10.
    cut = run(["ranked_feed"], raise_on_error=False)
    assert not cut.success and not cut.asset_materializations_for_node("ranked_feed")
    (failure,) = cut.get_step_failure_events()
    assert "pair_scores kept only its top 10" in failure.step_failure_data.error.message
    assert run(["ranked_feed"], run_config={"ops": {"ranked_feed": {"config": {"k": 10}}}}).success


def test_the_whole_graph_publishes_k_rows_per_customer(env):
    run, _, pg_url, _ = env
    result = run(None)
    assert result.success
    with psycopg.connect(pg_url) as conn:
        rows, customers, ranks = conn.execute(
            "select count(*), count(distinct customer_id), max(rank) from feedpipe.current_feed"
        ).fetchone()
    assert (rows, customers, ranks) == (300 * 20, 300, 20)
    assert _materialization(result, "ranked_feed").metadata["dagster/row_count"].value == rows
    assert [c.passed for c in result.get_asset_check_evaluations() if c.check_name == "published_rows_match"] == [True]


def test_published_rows_match_counts_the_published_table_in_the_database(env, monkeypatch):
    """The check compared the COPY's own count, which publish_feed refuses to switch in when short, so it could
    never fail; it now counts the version's table after the switch."""
    from feedpipe.defs import feed

    run, *_ = env
    assert run(MODEL + ["model_evaluation", "pair_scores", "ranked_feed"]).success
    real = feed.publish_feed

    def publish_then_lose_a_customer(url, *args, **kwargs):
        result = real(url, *args, **kwargs)
        with psycopg.connect(url, autocommit=True) as conn:
            table = result.table_name  # schema-qualified
            conn.execute(f"DELETE FROM {table} WHERE customer_id = (SELECT min(customer_id) FROM {table})")
        return result

    monkeypatch.setattr(feed, "publish_feed", publish_then_lose_a_customer)
    short = run(["ranked_feed"])
    (check,) = [c for c in short.get_asset_check_evaluations() if c.check_name == "published_rows_match"]
    assert not check.passed
    meta = {k: v.value for k, v in check.metadata.items()}
    assert (meta["rows_sent"], meta["customers_sent"]) == (300 * 20, 300)
    assert (meta["rows_in_table"], meta["customers_in_table"]) == (299 * 20, 299)

    def publish_then_drop_the_table(url, *args, **kwargs):  # as a later publish's retention may
        result = real(url, *args, **kwargs)
        with psycopg.connect(url, autocommit=True) as conn:
            conn.execute(f"DROP VIEW feedpipe.current_feed_version, feedpipe.current_feed; DROP TABLE {result.table_name}")
        return result

    monkeypatch.setattr(feed, "publish_feed", publish_then_drop_the_table)
    gone = run(["ranked_feed"])  # the step succeeds: the feed was published; the check says what it could not do
    (check,) = [c for c in gone.get_asset_check_evaluations() if c.check_name == "published_rows_match"]
    assert not check.passed and "could not be counted: UndefinedTable" in check.description


def test_a_model_below_the_auc_floor_publishes_nothing_and_yesterdays_feed_stays(env):
    run, _, pg_url, _ = env
    assert run(None).success
    with psycopg.connect(pg_url) as conn:
        before = conn.execute("select * from feedpipe.current_feed order by customer_id, rank").fetchall()
    broken = {"ops": {"dlrm_model": {"config": {"epochs": 1, "min_validation_auc": 1.01}}}}
    result = run(None, run_config=broken, raise_on_error=False)
    assert not result.success
    assert [c.passed for c in result.get_asset_check_evaluations() if c.check_name == "validation_auc_floor"] == [False]
    assert not result.asset_materializations_for_node("ranked_feed")
    with psycopg.connect(pg_url) as conn:
        after = conn.execute("select * from feedpipe.current_feed order by customer_id, rank").fetchall()
    assert after == before
    # The failed model is stored (the IO manager writes before the check fails the step): rescoring this
    # date alone must refuse it, and republishing the earlier scores must name the model that made them.
    rescored = run(["pair_scores", "ranked_feed"], raise_on_error=False)
    assert not rescored.success and not rescored.asset_materializations_for_node("ranked_feed")
    run(["ranked_feed"])
    with psycopg.connect(pg_url) as conn:
        served = conn.execute("select distinct model_version from feedpipe.current_feed").fetchall()
    assert served == list({(row[-1],) for row in before})


def test_a_model_that_loses_to_popularity_by_the_margin_is_not_published(env):
    run, _, pg_url, _ = env
    gate = {"ops": {**FAST_TRAINING["ops"], "model_evaluation": {"config": {"min_margin_over_popularity": 1.0, "lightgbm": False}}}}
    result = run(None, run_config=gate, raise_on_error=False)
    assert not result.success
    assert [c.passed for c in result.get_asset_check_evaluations() if c.check_name == "beats_popularity"] == [False]
    assert not result.asset_materializations_for_node("pair_scores")
    # The losing model is stored all the same: scoring this date alone must refuse it.
    rescored = run(["pair_scores"], raise_on_error=False)
    assert not rescored.success
    (failure,) = rescored.get_step_failure_events()
    assert "failed beats_popularity" in failure.step_failure_data.error.message
    assert not result.asset_materializations_for_node("ranked_feed")


def test_the_gate_fails_a_tie_at_the_default_margin_and_says_when_no_customer_could_be_judged(env, monkeypatch):
    from feedpipe.defs import evaluation

    run, *_ = env
    run(MODEL)
    real = evaluation.evaluate_rankers

    def evaluated(change):
        def evaluate(*args, **kwargs):
            ev = real(*args, **kwargs)
            change(ev)
            return ev
        return evaluate

    def tie(ev):
        ev.ranking["dlrm"] = dict(ev.ranking["popularity"])

    def nobody(ev):
        ev.customers = 0
        for metrics in ev.ranking.values():
            metrics.update(recall=float("nan"), ndcg=float("nan"))

    default_margin = {"ops": {"model_evaluation": {"config": {"lightgbm": False}}}}
    for change, says in ((tie, r"does not beat popularity .* by 0.0 on \d+ customers"),
                         (nobody, r"no customer of the test half .* validation_days")):
        monkeypatch.setattr(evaluation, "evaluate_rankers", evaluated(change))
        result = run(["model_evaluation"], run_config=default_margin, raise_on_error=False)
        (gate,) = [c for c in result.get_asset_check_evaluations() if c.check_name == "beats_popularity"]
        assert not result.success and not gate.passed
        assert re.search(says, gate.description), gate.description


def test_an_evaluation_in_an_instance_without_the_examples_record_excludes_the_training_days(env, tmp_path, demo_dir):
    """stage_memory.py materializes each asset in a fresh instance: the examples' holdout_start is not there."""
    from feedpipe.definitions import build_resources

    run, load, _, _ = env
    run(MODEL)
    resources = build_resources(artifacts_root=str(tmp_path / "artifacts"), data_dir=str(demo_dir))
    result = dg.materialize(ASSETS, selection=["model_evaluation"], partition_key=FEED_DATE, resources=resources,
                            instance=dg.DagsterInstance.ephemeral(),
                            run_config={"ops": {"model_evaluation": FAST_TRAINING["ops"]["model_evaluation"]}})
    meta = _materialization(result, "model_evaluation").metadata
    assert meta["held_out_from"].value == "not recorded" and "training days" in meta["excluded"].value
    ex = load("training_examples")
    trained = ex.filter((pl.col("label") == 1.0) & (pl.col("split") == "train")).select("customer_id", "product_id")
    assert meta["excluded_pairs"].value == trained.unique().height


def test_pair_scores_refuses_exclusions_other_than_those_the_gate_judged(env):
    """The launchpad does not run `feedpipe run`'s cross-asset checks: the step compares for itself."""
    run, *_ = env
    run(MODEL + ["model_evaluation"])
    other = {"ops": {"pair_scores": {"config": {"exclude_window_days": 30}}}}
    result = run(["pair_scores"], run_config=other, raise_on_error=False)
    (failure,) = result.get_step_failure_events()
    assert ("pair_scores.exclude_window_days is 30 but model_evaluation judged the model with 90"
            in failure.step_failure_data.error.message)
    assert run(["pair_scores"]).success


def test_a_model_never_evaluated_is_not_scored(env):
    """Materializing dlrm_model, then pair_scores and ranked_feed without model_evaluation skipped the gate."""
    run, _, pg_url, _ = env
    run(MODEL)
    result = run(["pair_scores", "ranked_feed"], raise_on_error=False)
    assert not result.success and not result.asset_materializations_for_node("ranked_feed")
    (failure,) = result.get_step_failure_events()
    assert "has not been evaluated" in failure.step_failure_data.error.message


def test_an_artifacts_root_set_in_a_runs_config_reaches_the_io_manager_and_the_launcher(tmp_path, demo_dir):
    """The launchpad can set resources.artifacts.config.root: the assets, the IO manager and the
    launcher must then all use it (nested copies of the resource would keep the default root)."""
    from feedpipe.defs.launchers import LauncherResource

    seen = {}

    @dg.asset
    def where(launcher: LauncherResource, artifacts: ArtifactsResource) -> pl.DataFrame:
        seen["launcher"], seen["asset"] = launcher.artifacts.path(), artifacts.path()
        return pl.DataFrame({"x": [1]})

    default, override = tmp_path / "default", tmp_path / "override"
    resources = build_resources(artifacts_root=str(default), data_dir=str(demo_dir))
    dg.materialize([where], resources=resources, instance=dg.DagsterInstance.ephemeral(),
                   run_config={"resources": {"artifacts": {"config": {"root": str(override)}}}})
    assert seen == {"launcher": override, "asset": override}
    assert (override / "where" / "all.parquet").exists() and not default.exists()
    dg.materialize([where], resources=resources, instance=dg.DagsterInstance.ephemeral())  # no override: the default
    assert seen["launcher"] == default and (default / "where" / "all.parquet").exists()


def test_the_oracle_reads_truth_only_beside_file_inputs(tmp_path, monkeypatch):
    """model_evaluation with Postgres inputs has no data directory: no oracle, not a failed run."""
    from feedpipe.defs.resources import DataResource

    monkeypatch.delenv("FEEDPIPE_DATA_DIR", raising=False)
    monkeypatch.delenv("FEEDPIPE_INPUT_CONFIG", raising=False)
    postgres = tmp_path / "input.yaml"
    postgres.write_text("source:\n  postgres:\n    url_env: SALES_URL\n    transactions: {table: orders}\n"
                        "    customers: {table: customers}\n    products: {table: products}\n")
    assert DataResource(data_dir=str(tmp_path), input_config=str(postgres)).truth_path() is None
    assert DataResource().truth_path() is None
    assert DataResource(data_dir=str(tmp_path)).truth_path() == tmp_path / "truth.parquet"
    monkeypatch.setenv("FEEDPIPE_DATA_DIR", str(tmp_path / "demo"))  # the CLI's demo folder, left in the environment
    assert DataResource(input_config=str(postgres)).truth_path() is None


def test_a_data_directory_named_in_the_resource_brings_its_own_input_config(tmp_path, monkeypatch):
    """A launchpad run naming another directory read the config the environment named for the CLI's directory
    (its multi-valued columns, its availability column, even its Postgres source), not that directory's own."""
    from feedpipe.defs.resources import DataResource

    cli_dir, other = tmp_path / "cli", tmp_path / "other"
    for d, column in ((cli_dir, "tags"), (other, "labels")):
        d.mkdir()
        (d / "feedpipe.yaml").write_text(f"products:\n  multi_valued: [{column}]\n")
    monkeypatch.setenv("FEEDPIPE_DATA_DIR", str(cli_dir))
    monkeypatch.setenv("FEEDPIPE_INPUT_CONFIG", str(cli_dir / "feedpipe.yaml"))

    assert DataResource().config().products.multi_valued == ("tags",)  # the CLI's, through the environment
    assert DataResource(data_dir=str(other)).config().products.multi_valued == ("labels",)
    (other / "feedpipe.yaml").unlink()
    assert DataResource(data_dir=str(other)).config().products.multi_valued == ()  # none of its own: defaults
    explicit = tmp_path / "explicit.yaml"
    explicit.write_text("products:\n  multi_valued: [genres]\n")
    assert DataResource(data_dir=str(cli_dir), input_config=str(explicit)).config().products.multi_valued == ("genres",)
    monkeypatch.delenv("FEEDPIPE_INPUT_CONFIG")
    assert DataResource().config().products.multi_valued == ("tags",)  # $FEEDPIPE_DATA_DIR's own


def test_scores_that_failed_their_blocking_checks_are_not_published_by_ranked_feed_run_alone(env, monkeypatch):
    from feedpipe.defs import feed

    run, _, pg_url, _ = env
    real = feed.customers_without_scores
    monkeypatch.setattr(feed, "customers_without_scores", lambda *a: (real(*a)[0], 1, 0))  # one customer left out
    result = run(MODEL + ["model_evaluation", "pair_scores", "ranked_feed"], raise_on_error=False)
    assert not result.success and not result.asset_materializations_for_node("ranked_feed")
    assert result.asset_materializations_for_node("pair_scores")  # stored before its check failed the run
    alone = run(["ranked_feed"], raise_on_error=False)
    assert not alone.success
    (failure,) = alone.get_step_failure_events()
    assert "failed its blocking checks" in failure.step_failure_data.error.message


def test_a_write_killed_between_its_two_renames_leaves_the_previous_object_readable(tmp_path, monkeypatch):
    """An object directory is swapped by two renames (the old one aside, the new one in place): a process killed
    between them left no directory at the asset's path, and every later read failed until it was rewritten."""
    from pathlib import Path

    from feedpipe.vocabularies import Vocabularies, build_vocabularies

    manager = ArtifactIOManager(artifacts=ArtifactsResource(root=str(tmp_path)))
    key = dg.AssetKey("vocabularies")

    def vocab(ids):
        from feedpipe.sources import FeatureSpec

        return build_vocabularies({"customers": pl.DataFrame({"customer_id": ids}), "products": pl.DataFrame(
            {"product_id": ["p"]})}, [FeatureSpec("customer_id", "customers", "categorical"),
                                      FeatureSpec("product_id", "products", "categorical")])

    def write(value):
        manager.handle_output(dg.build_output_context(asset_key=key, partition_key=FEED_DATE), value)

    def read():
        return manager.load_input(dg.build_input_context(asset_key=key, partition_key=FEED_DATE))

    write(vocab(["a", "b"]))
    real_rename = Path.rename

    def killed_after_setting_aside(self, target):
        real_rename(self, target)
        if str(target).endswith(".old.tmp"):
            raise KeyboardInterrupt("killed")

    monkeypatch.setattr(Path, "rename", killed_after_setting_aside)
    with pytest.raises(KeyboardInterrupt):
        write(vocab(["a", "b", "c"]))
    monkeypatch.setattr(Path, "rename", real_rename)
    assert not (tmp_path / "vocabularies" / FEED_DATE).exists()  # the window: nothing at the path itself
    survivor = read()
    assert isinstance(survivor, Vocabularies) and survivor.table.equals(vocab(["a", "b"]).table)
    write(vocab(["a", "b", "c", "d"]))  # the next write puts its own in place and clears what was set aside
    assert read().table.equals(vocab(["a", "b", "c", "d"]).table)
    assert sorted(p.name for p in (tmp_path / "vocabularies").iterdir() if not p.name.endswith(".tmp")) == [FEED_DATE]
    assert not list((tmp_path / "vocabularies").glob("*.old.tmp"))


def test_an_unknown_console_log_level_is_refused_when_the_run_is_launched():
    """It failed the logger's start with a traceback, leaving the run NOT_STARTED in the run history for good."""
    job = defs.resolve_job_def("nightly_feed")

    def levels_ok(level):
        try:
            dg.validate_run_config(job, {"loggers": {"console": {"config": {"log_level": level}}}})
        except dg.DagsterInvalidConfigError as e:
            assert "log_level" in str(e)
            return False
        return True

    assert [levels_ok(v) for v in ("verbose", "info", "WARNING", "debug")] == [False, True, True, True]
