"""The launcher switch: dlrm_model and pair_scores run under torchrun through Dagster Pipes (2 ranks,
gloo), report their metadata back to the asset, and give what the in-process assets give."""

import importlib.util
import json
import re
from datetime import date

import dagster as dg
import pytest
import torch

from feedpipe.definitions import build_resources, defs
from feedpipe.defs.io_manager import ArtifactIOManager
from feedpipe.defs.launchers import GPU_STEP_TAGS, LauncherResource, k8s_step_tags
from feedpipe.defs.resources import ArtifactsResource, ComputeResource
from feedpipe.demo_data import generate_demo_data
from feedpipe.ranking import model_ranking
from feedpipe.training import TrainConfig
from feedpipe.training_examples import ExampleConfig, Window, purchased_pairs, window_transactions

FEED_DATE = "2026-03-31"
ASSETS = list(defs.assets)
UPSTREAM = ["transactions", "customers", "products", "vocabularies", "training_examples"]


@pytest.fixture(scope="module")
def materialized(tmp_path_factory):
    root = tmp_path_factory.mktemp("launch")
    generate_demo_data(root / "data", customers=300, products=80, days=40, end_date=date(2026, 3, 30), seed=3)
    resources = build_resources(artifacts_root=str(root / "artifacts"), data_dir=str(root / "data"))
    resources["launcher"] = LauncherResource(
        artifacts=resources["artifacts"], mode="torchrun", nproc_per_node=2, threads_per_rank=1
    )
    instance = dg.DagsterInstance.ephemeral()

    def run(selection, ops=None):
        return dg.materialize(ASSETS, selection=selection, partition_key=FEED_DATE, resources=resources,
                              instance=instance, run_config={"ops": ops or {}})

    run(UPSTREAM)
    trained = run(["dlrm_model"], {"dlrm_model": {"config": {"epochs": 3, "min_validation_auc": 0.5}}})
    # pair_scores scores only a model the gate passed; tiny data: the gate must not hang on a lucky draw
    run(["model_evaluation"], {"model_evaluation": {"config": {"lightgbm": False, "min_margin_over_popularity": -1.0}}})
    scored = run(["pair_scores"], {"pair_scores": {"config": {"top_n": 20}}})

    def load(asset):
        return ArtifactIOManager(artifacts=ArtifactsResource(root=str(root / "artifacts"))).load_input(
            dg.build_input_context(asset_key=dg.AssetKey(asset), partition_key=FEED_DATE, resources=resources)
        )

    return trained, scored, load, root, instance


def test_torchrun_training_reports_ranks_auc_and_throughput_to_the_asset(materialized):
    trained, _, load, root, instance = materialized
    meta = trained.asset_materializations_for_node("dlrm_model")[0].metadata
    assert meta["ranks"].value == 2
    assert 0.5 < meta["validation_auc"].value <= 1 and meta["samples_per_s"].value > 0
    model = load("dlrm_model")
    assert model.metrics["ranks"] == 2 and model.metrics["validation_auc"] == meta["validation_auc"].value
    assert not any((root / "artifacts" / "scratch").rglob("*.parquet"))  # scratch removed
    logs = [entry.user_message for entry in instance.all_logs(trained.run_id)]
    assert any(m.startswith("epoch 0: train loss") for m in logs)  # rank 0's log lines come through Pipes


def test_torchrun_scoring_gives_the_in_process_ranking(materialized):
    _, scored, load, _, _ = materialized
    assert scored.asset_materializations_for_node("pair_scores")[0].metadata["ranks"].value == 2
    customers, products, transactions = load("customers"), load("products"), load("transactions")
    window = Window.for_feed_date(date.fromisoformat(FEED_DATE), ExampleConfig())
    exclude = purchased_pairs(window_transactions(transactions, window))
    expected = model_ranking(load("dlrm_model"), customers, products, top_n=20, exclude=exclude)
    assert load("pair_scores").equals(expected)


def test_gpu_tags_ask_kubernetes_for_the_gpus_and_nothing_without_them():
    tags = k8s_step_tags(2)["dagster-k8s/config"]
    assert tags["container_config"]["resources"]["limits"] == {"nvidia.com/gpu": "2"}
    assert k8s_step_tags(0) == {}
    for asset in ("dlrm_model", "pair_scores"):
        tag = defs.resolve_assets_def(asset).op.tags.get("dagster-k8s/config")  # Dagster stores it as JSON
        assert (json.loads(tag) if tag else None) == GPU_STEP_TAGS.get("dagster-k8s/config")


def test_an_unknown_launcher_mode_fails_with_the_modes_it_knows(tmp_path):
    launcher = LauncherResource(artifacts=ArtifactsResource(root=str(tmp_path)), mode="slurm")
    with pytest.raises(dg.Failure, match="in_process"):
        launcher.resolved_mode()


def test_the_kubernetes_pod_asks_for_gpus_mounts_the_artifacts_and_gives_ranks_their_cores(tmp_path, monkeypatch):
    # As in deploy/helm/values.yaml: the claim is mounted at FEEDPIPE_HOME, the artifacts root is home/artifacts.
    monkeypatch.setenv("FEEDPIPE_HOME", str(tmp_path))
    monkeypatch.delenv("FEEDPIPE_K8S_ARTIFACTS_MOUNT", raising=False)
    artifacts = ArtifactsResource(root="")
    launcher = LauncherResource(artifacts=artifacts, mode="kubernetes", nproc_per_node=4, gpus_per_pod=4,
                                cpu_request="32", memory_request="200Gi", artifacts_claim="feedpipe-artifacts")
    spec = launcher.pod_spec()
    (container,) = spec["containers"]
    assert container["resources"]["limits"] == {"memory": "200Gi", "nvidia.com/gpu": "4"}
    # Mounted where the step has the claim, so the absolute scratch paths name the same files in the pod.
    assert {"name": "artifacts", "mountPath": str(tmp_path)} in container["volumeMounts"]
    assert {"name": "artifacts", "persistentVolumeClaim": {"claimName": "feedpipe-artifacts"}} in spec["volumes"]
    assert spec["tolerations"][0]["key"] == "nvidia.com/gpu"
    assert launcher.rank_env_for_pod() == {"OMP_NUM_THREADS": "8"}
    command = launcher.torchrun_command(["train"], "cuda", python="python")
    assert command[:5] == ["python", "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=4"]
    assert command[-3:] == ["--device", "cuda", "train"]


def test_the_pod_mounts_the_claim_where_configured_and_refuses_an_artifacts_root_outside_it(tmp_path, monkeypatch):
    monkeypatch.setenv("FEEDPIPE_K8S_ARTIFACTS_MOUNT", str(tmp_path / "shared"))
    inside = ArtifactsResource(root=str(tmp_path / "shared" / "feedpipe"))
    launcher = LauncherResource(artifacts=inside, mode="kubernetes", artifacts_claim="claim")
    (container,) = launcher.pod_spec()["containers"]
    assert {"name": "artifacts", "mountPath": str(tmp_path / "shared")} in container["volumeMounts"]
    outside = ArtifactsResource(root=str(tmp_path / "elsewhere"))
    with pytest.raises(dg.Failure, match="artifacts_claim_mount"):
        LauncherResource(artifacts=outside, mode="kubernetes", artifacts_claim="claim").pod_spec()


def test_a_pod_with_more_ranks_than_gpus_is_refused_before_it_is_started(tmp_path, monkeypatch):
    monkeypatch.delenv("FEEDPIPE_K8S_POD_GPUS", raising=False)
    artifacts = ArtifactsResource(root=str(tmp_path))

    def launcher(ranks, gpus):
        return LauncherResource(artifacts=artifacts, mode="kubernetes", nproc_per_node=ranks, gpus_per_pod=gpus)

    with pytest.raises(dg.Failure, match="set nproc_per_node to 2"):
        launcher(4, 2)._run_pod(None, ["train"], "auto")
    with pytest.raises(dg.Failure, match="needs GPUs in the pod"):
        launcher(2, 0).check_gpus_for_ranks("cuda")
    assert "2 will be idle" in launcher(2, 4).check_gpus_for_ranks("cuda")
    assert launcher(4, 4).check_gpus_for_ranks("auto") is None
    assert launcher(4, 2).check_gpus_for_ranks("cpu") is None  # CPU ranks take no GPU


def test_a_rank_without_a_gpu_of_its_own_says_so(monkeypatch):
    from feedpipe import process_group

    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 1)
    monkeypatch.setenv("LOCAL_RANK", "1")
    monkeypatch.setenv("LOCAL_WORLD_SIZE", "2")
    monkeypatch.setenv("RANK", "1")
    monkeypatch.setenv("WORLD_SIZE", "2")
    with pytest.raises(RuntimeError, match=r"shows 1 CUDA device\(s\): run one rank per GPU"):
        process_group.join_process_group("auto")


@pytest.mark.skipif(importlib.util.find_spec("dagster_k8s") is not None, reason="dagster-k8s is installed here")
def test_kubernetes_mode_without_dagster_k8s_names_the_package_to_install(tmp_path):
    launcher = LauncherResource(artifacts=ArtifactsResource(root=str(tmp_path)), mode="kubernetes")
    with pytest.raises(dg.Failure, match=r"pip install dagster-k8s==0\.29\.27"):
        launcher._run_pod(None, ["train"], "auto")


def test_a_failing_rank_fails_the_asset_with_its_error_and_leaves_no_scratch(materialized, tmp_path):
    _, _, load, root, instance = materialized
    vocabularies = load("vocabularies")
    # Examples without their split column: the asset writes them out, the ranks fail reading them.
    examples = load("training_examples").drop("split")
    artifacts = ArtifactsResource(root=str(tmp_path))
    launcher = LauncherResource(artifacts=artifacts, mode="torchrun", nproc_per_node=2, threads_per_rank=1)

    @dg.asset
    def broken_training(context: dg.AssetExecutionContext, launcher: LauncherResource):
        launcher.train(context, examples, vocabularies, TrainConfig(epochs=1))

    result = dg.materialize([broken_training], resources={"launcher": launcher}, instance=instance,
                            raise_on_error=False)
    assert not result.success
    (failure,) = result.get_step_failure_events()
    message = failure.step_failure_data.error.message
    # Both ranks fail reading; torchrun may stop the second before it has written its error.
    assert re.search(r"train failed on [12] rank\(s\):\nrank [01]: ColumnNotFoundError: .*\"split\"", message)
    assert "External execution process failed" not in message
    assert not any((tmp_path / "scratch").rglob("*.parquet"))  # the examples' copy is gone
    assert not any((tmp_path / "scratch").iterdir())  # and the run's folder with it


def test_scoring_through_the_launcher_runs_on_the_compute_resources_device(materialized, tmp_path):
    _, _, load, root, instance = materialized
    seen = []

    class RecordingLauncher(LauncherResource):
        def rank(self, context, trained, customers, products, **kwargs):
            seen.append(kwargs["device"])
            ranking = model_ranking(trained, customers, products, top_n=kwargs["top_n"], exclude=kwargs["exclude"])
            return ranking, {"ranks": 2, "scoring_seconds": 1.0}

    resources = build_resources(artifacts_root=str(root / "artifacts"), data_dir=str(root / "data"))
    resources["launcher"] = RecordingLauncher(artifacts=resources["artifacts"], mode="torchrun")
    resources["compute"] = ComputeResource(device="cpu")
    result = dg.materialize(ASSETS, selection=["pair_scores"], partition_key=FEED_DATE, resources=resources,
                            instance=instance)
    assert result.success and seen == ["cpu"]


@pytest.mark.parametrize("device, named", [("gpu", "must be 'auto', 'cpu', 'cuda' or 'cuda:N'"), ("mps", "must be")])
def test_a_compute_device_torch_cannot_use_names_the_setting(device, named):
    with pytest.raises(dg.Failure, match=re.escape(named)):
        ComputeResource(device=device).torch_device()
    assert ComputeResource(device="cpu").torch_device().type == "cpu"


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks a host without CUDA")
def test_cuda_asked_for_on_a_host_without_it_says_so():
    with pytest.raises(dg.Failure, match="sees no CUDA device"):
        ComputeResource(device="cuda").torch_device()
    assert ComputeResource(device="auto").torch_device().type == "cpu"


def test_kubernetes_mode_without_the_artifacts_claim_is_refused(tmp_path, monkeypatch):
    monkeypatch.delenv("FEEDPIPE_K8S_ARTIFACTS_CLAIM", raising=False)
    launcher = LauncherResource(artifacts=ArtifactsResource(root=str(tmp_path)), mode="kubernetes")
    with pytest.raises(dg.Failure, match="artifacts_claim"):
        launcher.pod_spec()


def test_rank_failures_list_causes_before_lost_peers_and_name_the_silent_ranks(tmp_path):
    from feedpipe.defs.launchers import rank_failure

    errors = tmp_path / "errors"
    errors.mkdir()
    (errors / "rank-0.txt").write_text("RuntimeError: [gloo] Connection closed by peer [127.0.0.1]:5000")
    (errors / "rank-2.txt").write_text("ColumnNotFoundError: split")
    message = rank_failure("train", errors, RuntimeError("External execution process failed"), ranks=4)
    lines = message.splitlines()
    assert lines[0] == "train failed on 2 rank(s):"
    assert lines[1].startswith("rank 2: ColumnNotFoundError") and lines[2].startswith("rank 0: RuntimeError: [gloo]")
    assert "rank(s) 1, 3 wrote no report: killed (out of memory?)" in lines[3]
    (errors / "rank-0.txt").unlink(), (errors / "rank-2.txt").unlink()
    assert "no rank wrote an error report" in rank_failure("score", errors, RuntimeError("code 1"), ranks=2)


def test_settings_from_the_environment_that_are_not_whole_numbers_name_the_variable(tmp_path, monkeypatch):
    """They raised a bare ValueError (ZeroDivisionError for 0 ranks), at definitions load for the step GPUs."""
    from feedpipe.defs.launchers import env_int

    launcher = LauncherResource(artifacts=ArtifactsResource(root=str(tmp_path)))
    for value in ("0", "two", "-1"):
        monkeypatch.setenv("FEEDPIPE_NPROC_PER_NODE", value)
        with pytest.raises(dg.Failure, match=rf"\$FEEDPIPE_NPROC_PER_NODE must be a whole number of at least 1, got '{value}'"):
            launcher.ranks
    monkeypatch.setenv("FEEDPIPE_NPROC_PER_NODE", "")  # a Helm value left blank: the default
    assert launcher.ranks == 2
    monkeypatch.setenv("FEEDPIPE_NPROC_PER_NODE", " 4 ")
    assert launcher.ranks == 4
    monkeypatch.setenv("FEEDPIPE_K8S_POD_GPUS", "all")
    with pytest.raises(dg.Failure, match=r"\$FEEDPIPE_K8S_POD_GPUS"):
        launcher.pod_gpus
    monkeypatch.setenv("FEEDPIPE_K8S_STEP_GPUS", "one")
    with pytest.raises(dg.Failure, match=r"\$FEEDPIPE_K8S_STEP_GPUS must be a whole number of at least 0"):
        env_int("FEEDPIPE_K8S_STEP_GPUS", 1, 0)
    odd = LauncherResource(artifacts=ArtifactsResource(root=str(tmp_path)), nproc_per_node=2, cpu_request="2Gi")
    with pytest.raises(dg.Failure, match=r"cpu_request must be a Kubernetes CPU quantity.*'2Gi'"):
        odd.rank_env_for_pod()
    assert LauncherResource(artifacts=ArtifactsResource(root=str(tmp_path)), nproc_per_node=2,
                            cpu_request="3500m").rank_env_for_pod() == {"OMP_NUM_THREADS": "1"}


def test_a_launch_removes_the_scratch_a_killed_step_left_and_keeps_a_live_ones(tmp_path):
    """A step killed by SIGKILL or the OOM killer never ran its clean-up: its copy of the examples stayed for good."""
    import os
    import time

    from feedpipe.defs.ingest import STALE_SPOOL_SECONDS

    dead = tmp_path / "scratch" / "dead-run"
    (dead / "dlrm_model").mkdir(parents=True)
    (dead / "dlrm_model" / "examples.parquet").write_bytes(b"x" * 100)
    old = time.time() - STALE_SPOOL_SECONDS - 60
    os.utime(dead, (old, old))
    live = tmp_path / "scratch" / "live-run" / "pair_scores"
    live.mkdir(parents=True)
    launcher = LauncherResource(artifacts=ArtifactsResource(root=str(tmp_path)))
    seen = []

    @dg.asset
    def step(context: dg.AssetExecutionContext, launcher: LauncherResource) -> None:
        with launcher._scratch(context) as d:
            seen.append(d.is_dir())

    assert dg.materialize([step], resources={"launcher": launcher}).success
    assert seen == [True] and not dead.exists() and live.is_dir()
