"""The `feedpipe` command line.

Every command that touches Dagster first calls `prepare_environment()`, which resolves the database
(embedded server unless FEEDPIPE_DATABASE_URL is set) and sets DAGSTER_HOME and the variables
`dagster.yaml` reads, so the CLI, the UI and the daemon share one instance and one run history.
"""

from __future__ import annotations

import argparse
import math
import os
import shutil
import sys
import time
from datetime import date, timedelta
from pathlib import Path

import psycopg

from feedpipe.contract import utc_today
from feedpipe.database import (
    DATABASE_URL_ENV,
    DatabaseError,
    connect,
    feedpipe_home,
    redact_message,
    redact_url,
    resolve_database_url,
    sqlalchemy_psycopg2_url,
)

from feedpipe.contract import INPUT_CONFIG_FILE

PROJECT_ROOT = Path(__file__).resolve().parent.parent
DAGSTER_STORAGE_URL_ENV = "FEEDPIPE_DAGSTER_STORAGE_URL"
# An input directory may carry its own input config (a CSV export names its multi-valued columns there).
DATA_DIR_CONFIG = INPUT_CONFIG_FILE


def _dagster_yaml_dir() -> Path:
    if os.environ.get("DAGSTER_HOME"):
        return Path(os.environ["DAGSTER_HOME"])
    if (PROJECT_ROOT / "dagster.yaml").exists():
        return PROJECT_ROOT
    raise SystemExit("feedpipe: no dagster.yaml found; set DAGSTER_HOME to a directory holding one (see deploy/)")


def prepare_environment() -> str:
    """Resolve the feed database and point Dagster's instance at it. Returns the libpq URL."""
    home = feedpipe_home()
    os.environ.setdefault("FEEDPIPE_HOME", str(home))
    url = resolve_database_url()
    os.environ.setdefault(DAGSTER_STORAGE_URL_ENV, sqlalchemy_psycopg2_url(url))
    os.environ.setdefault("FEEDPIPE_DAGSTER_ARTIFACTS", str(home / "dagster" / "storage"))
    os.environ.setdefault("FEEDPIPE_DAGSTER_COMPUTE_LOGS", str(home / "dagster" / "logs"))
    os.environ["DAGSTER_HOME"] = str(_dagster_yaml_dir())
    return url


# -- commands ----------------------------------------------------------------------------------


def cmd_demo_data(args) -> int:
    from feedpipe.demo_data import generate_demo_data

    t0 = time.perf_counter()
    s = generate_demo_data(
        args.dir, customers=args.customers, products=args.products, days=args.days, seed=args.seed,
        file_format=args.format,
    )
    print(
        f"wrote {s.customers:,} customers, {s.products:,} products, {s.transactions:,} transactions "
        f"({s.start_date} .. {s.end_date}) to {s.directory} in {time.perf_counter() - t0:.1f}s"
    )
    return 0


def cmd_example_data(args) -> int:
    from feedpipe.example_data import movielens

    summary = movielens(args.dir)
    print(
        f"wrote MovieLens: {summary['transactions']:,} ratings, {summary['customers']:,} users, "
        f"{summary['products']:,} movies to {args.dir}\n"
        f"run it with: feedpipe run --data {args.dir} --date {summary['feed_date']} --run-config {args.dir}/run.yaml"
    )
    return 0


def _demo_directory(feed_date: date) -> Path:
    """Demo data under <home>/demo, (re)generated so that it ends the day before the feed date."""
    from feedpipe.demo_data import generate_demo_data, read_demo_summary

    directory = feedpipe_home() / "demo"
    summary = read_demo_summary(directory) if directory.exists() else None
    if summary is None or summary.end_date != feed_date - timedelta(days=1):
        print(f"generating demo data in {directory} (ending {feed_date - timedelta(days=1)})")
        generate_demo_data(directory, end_date=feed_date - timedelta(days=1))
    return directory


class UsageError(Exception):
    """A mistake in what the user asked for: printed as one line, exit status 2."""


def _run_config(path: str | None) -> dict:
    """Dagster run config: the file's (asset configs such as ops.dlrm_model.config.epochs), with the
    console logger at INFO unless the file sets it, so a terminal shows progress rather than every event."""
    import yaml

    try:
        config = (yaml.safe_load(Path(path).read_text()) or {}) if path else {}
    except yaml.YAMLError as e:
        raise UsageError(f"--run-config {path} is not valid YAML: {e}") from None
    except UnicodeDecodeError as e:
        raise UsageError(f"--run-config {path} is not UTF-8 text: {e}") from None
    if not isinstance(config, dict):
        raise UsageError(f"--run-config {path} must be a mapping (e.g. ops: {{dlrm_model: {{config: {{epochs: 3}}}}}}), "
                         f"got a {type(config).__name__}")
    config.setdefault("loggers", {"console": {"config": {"log_level": "INFO"}}})
    return config


def _check_asset_configs(run_config: dict, path: str | None) -> None:
    """Every asset's config class (its bounds, such as ranked_feed's retention >= 1) against the run config.

    Dagster checks the run config's types at launch but a pydantic bound only when the step starts: for
    ranked_feed, at the end of a run whose other steps have done all the work.
    """
    import pydantic

    from feedpipe.definitions import defs

    ops = run_config.get("ops") if isinstance(run_config, dict) else None
    if not isinstance(ops, dict):
        return  # Dagster's own check names what is not a mapping
    problems = []
    for node in defs.resolve_job_def("nightly_feed").graph.node_defs:
        config_class, given = _config_class(node), _op_config(ops, node.name)
        if config_class is None or given is None:
            continue  # Dagster's own check names what is missing or not a mapping
        try:
            config_class(**given)
        except pydantic.ValidationError as e:
            # A check across fields (a model validator) has no location: the step's name alone
            problems += [f"  {'.'.join(map(str, (node.name, *err['loc'])))}: {err['msg']}" for err in e.errors()]
    problems += _cross_asset_problems(ops)
    if problems:
        raise UsageError(f"--run-config {path} does not fit the job's config:\n" + "\n".join(problems))


def _op_config(ops: dict, asset: str) -> dict | None:
    """`ops.<asset>.config` of a run config when it is a mapping, else None."""
    op = ops.get(asset)
    config = op.get("config") if isinstance(op, dict) else None
    return config if isinstance(config, dict) else None


def _cross_asset_problems(ops: dict) -> list[str]:
    """Bounds between two assets' configs, which neither class can check alone."""
    from feedpipe.defs.evaluation import EvaluationConfig
    from feedpipe.defs.feed import FeedConfig, ScoringConfig

    def setting(asset, config_class, name):
        return (_op_config(ops, asset) or {}).get(name, config_class.model_fields[name].default)

    k = setting("ranked_feed", FeedConfig, "k")
    top_n = setting("pair_scores", ScoringConfig, "top_n")
    evaluated_k = setting("model_evaluation", EvaluationConfig, "k")
    problems = []
    # A value of the wrong type is the config class's to report
    if isinstance(k, int) and isinstance(top_n, int) and k > top_n:
        problems.append(f"  ranked_feed.k: {k} is more than pair_scores.top_n ({top_n}): the feed would be cut at "
                        f"{top_n}")
    if isinstance(k, int) and isinstance(evaluated_k, int) and k != evaluated_k:
        problems.append(f"  model_evaluation.k: {evaluated_k} is not ranked_feed.k ({k}): the gate would judge a "
                        "feed of another length than the one published; set both")
    for name in ("exclude_purchased", "exclude_window_days"):  # the gate judges the feed's own exclusions
        scored = setting("pair_scores", ScoringConfig, name)
        evaluated = setting("model_evaluation", EvaluationConfig, name)
        if scored != evaluated:
            problems.append(f"  model_evaluation.{name}: {evaluated!r} is not pair_scores.{name} ({scored!r}): the "
                            "gate would judge other exclusions than the feed's; set both")
    return problems


def _config_class(node):
    """The `dg.Config` class an asset's function takes, or None (no config, or an annotation left a string).

    Read through Dagster's compute-function internals: if an upgrade moves them, the early check is
    skipped (None) and the step still checks its config when it starts."""
    import dagster as dg

    try:
        compute_fn = node.compute_fn
        if not compute_fn.has_config_arg():
            return None
        annotation = compute_fn.get_config_arg().annotation
    except (AttributeError, TypeError):
        return None
    return annotation if isinstance(annotation, type) and issubclass(annotation, dg.Config) else None


def _failed_checks(result) -> list[str]:
    """One line per asset check that failed in the run, with its severity and what it says (its description)."""
    lines = []
    for check in result.get_asset_check_evaluations():
        if check.passed:
            continue
        severity = getattr(getattr(check, "severity", None), "value", "ERROR")
        what = getattr(check, "description", None) or ", ".join(
            f"{k} {getattr(v, 'value', v)}" for k, v in (check.metadata or {}).items())
        lines.append(f"  check {check.asset_key.to_user_string()}.{check.check_name} failed ({severity}): {what}")
    return lines


def _failure_messages(result) -> list[str]:
    out = []
    for event in result.all_events:
        if event.is_step_failure:
            err = event.step_failure_data.error
            # A dg.Failure or an InputError carries the message a user can act on; the chain holds
            # the original exception when Dagster wrapped it.
            cause = err
            while cause.cause is not None and "dagster" in cause.cls_name.lower():
                cause = cause.cause
            message = cause.message.strip()
            # SerializableErrorInfo messages start with the exception's qualified class name.
            message = message.split(": ", 1)[1] if message.startswith(("dagster.", "feedpipe.")) and ": " in message else message
            out.append(f"{event.step_key}: {message}")
    return out


def _resource_settings(run_config: dict, name: str) -> dict:
    """`resources.<name>.config` of a run config, `{env: VAR}` values read as Dagster reads them at launch."""
    section = ((run_config.get("resources") or {}).get(name) or {})
    settings = (section.get("config") or {}) if isinstance(section, dict) else {}
    if not isinstance(settings, dict):
        return {}
    return {k: os.environ.get(v["env"], "") if isinstance(v, dict) and set(v) == {"env"} else v
            for k, v in settings.items()}


def _run_database_url(run_config: dict, path: str | None, default_url: str) -> str:
    """The feed database the run will publish to: the run config's database resource where it sets one (its
    url_env_var), else the default. Checked here, so an unset variable fails now rather than after training."""
    settings = _resource_settings(run_config, "database")
    if not settings:
        return default_url
    import dagster as dg
    import pydantic

    from feedpipe.defs.resources import DatabaseResource

    try:
        return DatabaseResource(**settings).url()
    except dg.Failure as e:
        raise UsageError(f"--run-config {path}: resources.database: {e.description}") from None
    except pydantic.ValidationError as e:
        fields = ", ".join(".".join(map(str, err["loc"])) for err in e.errors())  # names only: values may be secrets
        raise UsageError(f"--run-config {path}: resources.database: invalid setting(s) {fields}") from None


def cmd_run(args) -> int:
    from feedpipe.defs.partitions import feed_date_partitions

    feed_date = args.date or utc_today()
    # Before any work: a date outside the partitions would otherwise (re)build the demo data first.
    if not feed_date_partitions.has_partition_key(feed_date.isoformat()):
        print(f"feedpipe: {feed_date} is outside the feed-date partitions (from {feed_date_partitions.start:%Y-%m-%d} to today)", file=sys.stderr)
        return 2
    run_config = _run_config(args.run_config)
    _check_asset_configs(run_config, args.run_config)
    url = prepare_environment()
    # Fails in a second with the database named; Dagster's own storage would retry for ~25 s, then trace back.
    connect(url).close()
    feed_url = _run_database_url(run_config, args.run_config, url)
    if feed_url != url:
        connect(feed_url).close()
    configured_dir = _resource_settings(run_config, "data").get("data_dir")  # the run config's wins, as in Dagster
    data_dir = (Path(configured_dir).resolve() if configured_dir else Path(args.data).resolve() if args.data
                else _demo_directory(feed_date))
    if not data_dir.is_dir():
        what = "is not a directory" if data_dir.exists() else "does not exist"
        print(f"feedpipe: data directory {data_dir} {what}", file=sys.stderr)
        return 2
    os.environ["FEEDPIPE_DATA_DIR"] = str(data_dir)
    input_config = Path(args.config) if args.config else data_dir / DATA_DIR_CONFIG
    if args.config and not input_config.exists():
        print(f"feedpipe: config file {input_config} does not exist", file=sys.stderr)
        return 2
    if input_config.exists():
        os.environ["FEEDPIPE_INPUT_CONFIG"] = str(input_config.resolve())
        if configured_dir and args.config and not _resource_settings(run_config, "data").get("input_config"):
            # A data resource given its directory reads that directory's own config, not the environment's: --config
            # goes to it directly.
            run_config["resources"]["data"]["config"]["input_config"] = str(input_config.resolve())

    import dagster as dg

    from feedpipe.definitions import defs

    instance = dg.DagsterInstance.get()
    job = defs.resolve_job_def("nightly_feed")
    print(f"feedpipe run: feed date {feed_date}, data {data_dir}, database {redact_url(feed_url)}")
    t0 = time.perf_counter()
    try:
        result = job.execute_in_process(
            instance=instance,
            partition_key=feed_date.isoformat(),
            raise_on_error=False,
            run_config=run_config,
            tags={"feedpipe/source": "cli"},
        )
    except dg.DagsterInvalidConfigError as e:
        problems = "\n".join(f"  {error.message}" for error in e.errors) or f"  {e}"
        raise UsageError(f"--run-config {args.run_config or '(none)'} does not fit the job's config:\n{problems}") from None
    seconds = time.perf_counter() - t0
    stats = instance.get_run_step_stats(result.run_id)
    for s in sorted(stats, key=lambda s: s.start_time or 0):
        took = (s.end_time - s.start_time) if s.end_time and s.start_time else float("nan")
        print(f"  {s.step_key:<20} {s.status.value:<8} {took:7.1f}s")
    for line in _failed_checks(result):  # a blocking one stopped the run; the others let it publish: both said
        print(line, file=sys.stderr)
    if not result.success:
        print(f"feedpipe run FAILED after {seconds:.1f}s (run {result.run_id}); the feed being served is unchanged:", file=sys.stderr)
        for msg in _failure_messages(result) or ["a step failed; see the run in the Dagster UI"]:
            print(f"  {msg}", file=sys.stderr)
        return 1
    print(f"feedpipe run: done in {seconds:.1f}s (run {result.run_id})")
    return 0


def _finite_or_null(value):
    """`value` with every NaN or infinite float (at any depth) as None."""
    if isinstance(value, float):
        return value if math.isfinite(value) else None
    if isinstance(value, dict):
        return {k: _finite_or_null(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_finite_or_null(v) for v in value]
    return value


def _served_version(conn) -> dict | None:
    from feedpipe.feed_queries import served_version

    version = served_version(conn)
    if version is None:
        print("no feed published yet: run `feedpipe run`", file=sys.stderr)
    return version


def cmd_feed(args) -> int:
    from feedpipe.publishing import read_feed

    url = resolve_database_url()
    # One transaction, the version view read first: it keeps a publish's switch waiting until the rows are read,
    # so the header and the rows are of one version.
    with connect(url) as conn, conn.transaction():
        version = _served_version(conn)
        if version is None:
            return 1
        customer = args.customer_id
        if customer is None:
            row = conn.execute("select customer_id from feedpipe.current_feed order by customer_id limit 1").fetchone()
            if row is None:
                print(f"feed version {version['version']} holds no rows", file=sys.stderr)
                return 1
            customer = row[0]
        rows = read_feed(conn, customer, limit=args.limit)
    print(f"feed for customer {customer} (version {version['version']}, feed date {version['feed_date']}, model {version['model_version']})")
    if not rows:
        print("  (no feed for this customer)")
        return 1
    print(f"  {'rank':>4}  {'product_id':<16} score")
    for product_id, rank, score in rows:
        print(f"  {rank:>4}  {product_id:<16} {score:.4f}")
    return 0


def cmd_report(args) -> int:
    """The served feed's version and the evaluation of the model that made it."""
    import json

    from feedpipe.model_evaluation import ModelEvaluation

    url = resolve_database_url()
    with connect(url) as conn:
        version = _served_version(conn)
    if version is None:
        if args.json:  # a script reading stdout still gets one object
            print(json.dumps({"feed_version": None, "feed_date": None, "model_version": None, "rows": 0,
                              "customers": 0, "model": None, "ranking": None, "error": "no feed published yet"}))
        return 1
    report = {
        "feed_version": version["version"],
        "feed_date": str(version["feed_date"]),
        "model_version": version["model_version"],
        "rows": version["rows"],
        "customers": version["customers"],
        "published_at": None if version.get("published_at") is None else str(version["published_at"]),
    }
    artifacts = Path(args.artifacts).resolve() if args.artifacts else feedpipe_home() / "artifacts"
    ev_dir = artifacts / "evaluations" / version["model_version"]
    if (ev_dir / "evaluation.json").exists():
        ev = ModelEvaluation.load(ev_dir)
        report["model"] = ev.model
        report["ranking"] = {"k": ev.k, "customers": ev.customers, **{
            name: {m: metrics[m] for m in ("recall", "ndcg", "map", "hit_rate", "coverage") if m in metrics}
            for name, metrics in ev.ranking.items()
        }}
        report["ranking"].setdefault("lightgbm", None)  # turned off in model_evaluation's config: said, not left out
    else:
        report["model"] = None
        report["ranking"] = None
    if args.json:
        print(json.dumps(_finite_or_null(report), allow_nan=False))  # NaN (no AUC for one class) is not JSON
        return 0
    print(f"feed version {report['feed_version']} for {report['feed_date']}: {report['rows']:,} rows, "
          f"{report['customers']:,} customers, model {report['model_version']}")
    if report["ranking"] is None:
        print(f"  no evaluation found for this model under {ev_dir}")
        return 0
    # On the test half: held-out customers the model was not early-stopped on (training_examples.TEST)
    print(f"  held-out AUC {report['model']['auc']:.4f}, log loss {report['model']['logloss']:.4f}; ranked for "
          f"{report['ranking']['customers']:,} held-out customers with history")
    k = report["ranking"]["k"]
    print(f"  {'ranker':<12} {'recall@' + str(k):>10} {'ndcg@' + str(k):>10} {'map@' + str(k):>10} {'hit@' + str(k):>10} {'coverage':>10}")
    for name, m in report["ranking"].items():
        if isinstance(m, dict):  # k and customers are not rankers; a ranker turned off is None
            cells = " ".join(f"{m.get(key, float('nan')):>10.4f}" for key in ("recall", "ndcg", "map", "hit_rate", "coverage"))
            print(f"  {name:<12} {cells}")
    return 0


def cmd_db_url(args) -> int:
    print(resolve_database_url())
    return 0


def cmd_db_init(args) -> int:
    from feedpipe.feed_schema import MIGRATIONS_TABLE, SCHEMA, missing_views
    from feedpipe.publishing import init_schema

    url = resolve_database_url()
    with connect(url) as conn:
        # Only a schema that was set up can have lost a view; a fresh one gets them from the migrations.
        migrated = conn.execute("SELECT to_regclass(%s)", [f"{SCHEMA}.{MIGRATIONS_TABLE}"]).fetchone()[0]
        missing = missing_views(conn.cursor()) if migrated is not None else []
        conn.rollback()
        applied = init_schema(conn)
    done = [f"applied {', '.join(applied)}"] if applied else []
    done += [f"recreated {', '.join(f'{SCHEMA}.{view}' for view in missing)}"] if missing else []
    print(f"schema ready on {redact_url(url)} ({'; '.join(done) or 'nothing to apply'})")
    return 0


def cmd_db_stop(args) -> int:
    from feedpipe.database import stop_embedded_server

    print("embedded server stopped" if stop_embedded_server(feedpipe_home()) else "no embedded server running")
    return 0


def cmd_ui(args) -> int:
    # The schedule and the launchpad's runs read the inputs from FEEDPIPE_DATA_DIR, as `feedpipe run` sets it.
    if args.data or not os.environ.get("FEEDPIPE_DATA_DIR"):
        data_dir = Path(args.data).resolve() if args.data else _demo_directory(utc_today())
        if not data_dir.is_dir():
            raise UsageError(f"data directory {data_dir} {'is not a directory' if data_dir.exists() else 'does not exist'}")
        os.environ["FEEDPIPE_DATA_DIR"] = str(data_dir)
        if (data_dir / DATA_DIR_CONFIG).exists():  # the directory's own, as `feedpipe run` takes it
            os.environ["FEEDPIPE_INPUT_CONFIG"] = str((data_dir / DATA_DIR_CONFIG).resolve())
    print(f"feedpipe ui: inputs from {os.environ['FEEDPIPE_DATA_DIR']}")
    prepare_environment()
    dagster = shutil.which("dagster") or str(Path(sys.executable).parent / "dagster")
    workspace = PROJECT_ROOT / "workspace.yaml"
    argv = [dagster, "dev", "-p", str(args.port), "-h", args.host]
    argv += ["-w", str(workspace)] if workspace.exists() else ["-m", "feedpipe.definitions"]
    os.chdir(PROJECT_ROOT)
    os.execv(argv[0], argv)
    return 0  # unreachable


# Argument types: argparse turns their ArgumentTypeError into a usage line and exit status 2, not a traceback.
def _iso_date(text: str) -> date:
    try:
        return date.fromisoformat(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"not a date YYYY-MM-DD: {text!r}") from None


def _existing_file(text: str) -> str:
    if not Path(text).is_file():
        raise argparse.ArgumentTypeError(f"no such file: {text}")
    return text


def _int_at_least(minimum: int, maximum: int | None = None):
    def parse(text: str) -> int:
        try:
            value = int(text)
        except ValueError:
            value = minimum - 1
        if value < minimum:
            raise argparse.ArgumentTypeError(f"not a whole number of at least {minimum}: {text!r}")
        if maximum is not None and value > maximum:
            raise argparse.ArgumentTypeError(f"not a whole number of at most {maximum}: {text!r}")
        return value

    return parse


_positive_int, _non_negative_int = _int_at_least(1), _int_at_least(0)
# Ranks are a Postgres integer: no feed is longer, and a larger LIMIT is out of bigint's range.
_MAX_RANK = 2**31 - 1


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="feedpipe", description=__doc__.splitlines()[0])
    sub = p.add_subparsers(dest="command", required=True)

    d = sub.add_parser("demo-data", help="write a synthetic retail data set in the input contract")
    d.add_argument("dir")
    d.add_argument("--customers", type=_positive_int, default=10_000)
    d.add_argument("--products", type=_positive_int, default=2_000)
    d.add_argument("--days", type=_positive_int, default=90)
    d.add_argument("--seed", type=_non_negative_int, default=0)
    d.add_argument("--format", choices=["parquet", "csv"], default="parquet")
    d.set_defaults(func=cmd_demo_data)

    e = sub.add_parser("example-data", help="convert a real data set into the input contract (needs the examples extra)")
    e.add_argument("name", choices=["movielens"])
    e.add_argument("dir")
    e.set_defaults(func=cmd_example_data)

    r = sub.add_parser("run", help="materialize the whole graph for one feed date through the Dagster instance")
    r.add_argument("--data", help="input directory (default: demo data under .feedpipe/demo)")
    r.add_argument("--date", type=_iso_date, help="feed date YYYY-MM-DD (default: today in UTC, as the partitions count days)")
    r.add_argument("--config", type=_existing_file, help=f"YAML overriding feature roles, delimiter, excluded columns (default: DIR/{DATA_DIR_CONFIG} if present)")
    r.add_argument("--run-config", type=_existing_file, help="YAML of Dagster run config, e.g. ops: {dlrm_model: {config: {epochs: 3}}}")
    r.set_defaults(func=cmd_run)

    f = sub.add_parser("feed", help="print one customer's current feed")
    f.add_argument("customer_id", nargs="?", help="default: the first customer with a feed")
    f.add_argument("--limit", type=_int_at_least(1, _MAX_RANK), default=None, help="at most this many ranks")
    f.set_defaults(func=cmd_feed)

    rep = sub.add_parser("report", help="the served feed's version and its model's evaluation")
    rep.add_argument("--json", action="store_true", help="one JSON object")
    rep.add_argument("--artifacts", help="the artifacts root the run wrote to, where its ArtifactsResource root was "
                                         "set (default: FEEDPIPE_HOME/artifacts)")
    rep.set_defaults(func=cmd_report)

    u = sub.add_parser("db-url", help="print a URL that psql and psycopg accept")
    u.set_defaults(func=cmd_db_url)

    db = sub.add_parser("db", help="database maintenance")
    dbs = db.add_subparsers(dest="db_command", required=True)
    dbs.add_parser("init", help="apply the feed schema migrations (idempotent)").set_defaults(func=cmd_db_init)
    dbs.add_parser("stop", help="stop the embedded server").set_defaults(func=cmd_db_stop)

    ui = sub.add_parser("ui", help="start the Dagster UI on the same instance")
    ui.add_argument("--port", type=int, default=3000)
    ui.add_argument("--host", default="127.0.0.1")
    ui.add_argument("--data", help="input directory of the UI's runs (default: $FEEDPIPE_DATA_DIR, else the demo "
                                   "data, generated to end yesterday)")
    ui.set_defaults(func=cmd_ui)
    return p


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        return args.func(args)
    except DatabaseError as e:
        print(f"feedpipe: {e}", file=sys.stderr)
        return 1
    except UsageError as e:
        print(f"feedpipe: {e}", file=sys.stderr)
        return 2
    except psycopg.Error as e:  # the server refused (a login without a privilege, say): the user's to fix
        url = os.environ.get(DATABASE_URL_ENV) or ""
        first_line = (str(e).strip().splitlines() or [""])[0]  # the rest quotes our SQL, which the user cannot change
        print(f"feedpipe: the database refused ({type(e).__name__}): {redact_message(first_line, url)}",
              file=sys.stderr)
        return 1
    except UnicodeEncodeError as e:  # an argument that is not UTF-8 (a shell passing Latin-1 bytes), sent on
        print(f"feedpipe: an argument is not valid UTF-8 text: {e}", file=sys.stderr)
        return 2
    except OSError as e:  # a path the user gave: exists already, not a directory, no permission
        print(f"feedpipe: {e}", file=sys.stderr)
        return 1
    except Exception as e:  # input errors name file/column/rows; anything else is a bug and keeps its traceback
        from feedpipe.input_config import InputError

        if isinstance(e, InputError):
            print(f"feedpipe: {e}", file=sys.stderr)
            return 1
        raise


if __name__ == "__main__":
    sys.exit(main())
