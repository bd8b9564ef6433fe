"""Where training and scoring run: in the asset's process, under torchrun beside it, or in a pod.

`LauncherResource.mode` is the switch (empty: $FEEDPIPE_LAUNCHER, else in_process):

- in_process: the asset calls `train_dlrm` / `model_ranking` itself (the default; tests, `make run`).
- torchrun: the asset starts `torchrun --nproc_per_node N -m feedpipe.distributed_jobs ...` on its
  own machine through Dagster Pipes' `PipesSubprocessClient`.
- kubernetes: the same command in a pod of its own through `PipesK8sClient` (needs
  `pip install dagster-k8s==0.29.27`; imported only in this mode), with GPUs, CPU and memory from
  this resource, and the artifacts volume mounted where the asset's process has it.

Either way rank 0 reports through Pipes: its log lines land in the run's event log and its final
summary (loss, AUC, samples/s, ranks, ...) becomes the asset's metadata. Inputs and outputs travel
as files under <artifacts>/scratch/<run id>/ (a shared volume on Kubernetes); the scratch folder
is removed afterwards, whether the job worked or not.
"""

# no `from __future__ import annotations`: Dagster reads the resource fields' annotations as types

import contextlib
import json
import os
import shutil
import sys
from collections.abc import Iterator
from dataclasses import asdict
from pathlib import Path

import dagster as dg
import polars as pl
from pydantic import Field

from feedpipe.database import feedpipe_home
from feedpipe.defs.ingest import sweep_spool
from feedpipe.defs.resources import ArtifactsResource
from feedpipe.training import EpochStats, TrainConfig, TrainedModel, TrainResult
from feedpipe.vocabularies import Vocabularies

IN_PROCESS, TORCHRUN, KUBERNETES = "in_process", "torchrun", "kubernetes"
LAUNCH_MODES = (IN_PROCESS, TORCHRUN, KUBERNETES)
LAUNCHER_ENV = "FEEDPIPE_LAUNCHER"
ENTRY_MODULE = "feedpipe.distributed_jobs"


def k8s_step_tags(gpus: int, image: str = "") -> dict:
    """`dagster-k8s/config` op tags asking for `gpus` GPUs (none: no tags) for a step's own pod,
    run from `image` when given (the CUDA image; the code location itself runs the CPU one).

    They take effect under the k8s_job_executor (feedpipe.definitions_k8s), where each step is a
    pod: the steps that train and score in-process or under local torchrun then land on a GPU
    node. In `kubernetes` mode the GPUs go to the Pipes pod instead (LauncherResource.gpus_per_pod)
    and the step itself needs none: set FEEDPIPE_K8S_STEP_GPUS=0 on the code location.
    """
    if gpus <= 0:
        return {}
    container: dict = {"resources": {"requests": {"nvidia.com/gpu": str(gpus)}, "limits": {"nvidia.com/gpu": str(gpus)}}}
    if image:
        container["image"] = image
    return {
        "dagster-k8s/config": {
            "container_config": container,
            "pod_spec_config": {
                "tolerations": [{"key": "nvidia.com/gpu", "operator": "Exists", "effect": "NoSchedule"}]
            },
        }
    }


SCRATCH_DIR = "scratch"  # under the artifacts root: <run id>/<asset>/, one folder per launched step


def env_int(name: str, default: int, minimum: int) -> int:
    """An integer setting from the environment; unset or empty (a Helm value left blank): `default`."""
    raw = os.environ.get(name, "").strip()
    if not raw:
        return default
    try:
        value = int(raw)
    except ValueError:
        value = None
    if value is None or value < minimum:
        raise dg.Failure(f"${name} must be a whole number of at least {minimum}, got {raw!r}")
    return value


# Read when the code location loads the definitions (the op tags are part of the definition).
GPU_STEP_TAGS = k8s_step_tags(env_int("FEEDPIPE_K8S_STEP_GPUS", 1, 0), os.environ.get("FEEDPIPE_K8S_GPU_IMAGE", ""))


# What a rank reports when another rank died first: an effect, listed after the causes.
_PEER_GONE = ("Connection closed by peer", "Connection reset by peer", "Broken pipe")


def rank_failure(job: str, errors: Path, error: Exception, ranks: int | None = None) -> str:
    """The asset's failure message: what the ranks wrote to `errors` (distributed_jobs --errors), causes
    first (a rank that lost its peer comes after the peer's own error), and the ranks that wrote nothing
    (killed: out of memory, say); else the launcher's own error (a pod that never started, say)."""
    reports = sorted(errors.glob("rank-*.txt"), key=lambda p: int(p.stem.removeprefix("rank-"))) if errors.is_dir() else []
    texts = {int(p.stem.removeprefix("rank-")): p.read_text().strip() for p in reports}
    silent = [r for r in range(ranks or 0) if r not in texts]
    killed = ("killed (out of memory?) or died before Python could report; torchrun's root cause is in the step's "
              "stderr")
    if not texts:
        return f"{job} failed: {error}" + (f"; no rank wrote an error report: a rank was {killed}" if silent else "")
    order = sorted(texts, key=lambda r: (any(s in texts[r] for s in _PEER_GONE), r))
    lines = [f"rank {r}: {texts[r]}" for r in order]
    if silent:
        lines.append(f"rank(s) {', '.join(map(str, silent))} wrote no report: {killed}")
    return f"{job} failed on {len(texts)} rank(s):\n" + "\n".join(lines)


class LauncherResource(dg.ConfigurableResource):
    """Where dlrm_model trains and pair_scores scores (see module docstring)."""

    artifacts: ArtifactsResource  # configured at launch and shared: definitions.build_resources
    mode: str = Field(default="", description=f"One of {LAUNCH_MODES}; empty: ${LAUNCHER_ENV}, else in_process.")
    nproc_per_node: int = Field(default=0, ge=0, description="torchrun ranks per machine (torchrun) or pod (kubernetes), one per GPU on GPU nodes; 0: $FEEDPIPE_NPROC_PER_NODE, else 2.")
    threads_per_rank: int = Field(default=0, ge=0, description="OMP_NUM_THREADS per rank; 0: CPU cores / ranks.")
    image: str = Field(default="", description="kubernetes: image of the pod (deploy/Dockerfile.cuda or .cpu); empty: $FEEDPIPE_K8S_GPU_IMAGE.")
    namespace: str = Field(default="", description="kubernetes: namespace of the pod; empty: the current one.")
    gpus_per_pod: int = Field(default=-1, ge=-1, description="kubernetes: nvidia.com/gpu requested by the pod; -1: $FEEDPIPE_K8S_POD_GPUS, else 0.")
    cpu_request: str = Field(default="4", description="kubernetes: CPU request of the pod.")
    memory_request: str = Field(default="16Gi", description="kubernetes: memory request (and limit) of the pod; see deploy/capacity.md.")
    artifacts_claim: str = Field(default="", description="kubernetes: PersistentVolumeClaim holding the artifacts root; empty: $FEEDPIPE_K8S_ARTIFACTS_CLAIM.")
    artifacts_claim_mount: str = Field(default="", description="kubernetes: where this process has that claim mounted; the Pipes pod mounts it at the same path. Empty: $FEEDPIPE_K8S_ARTIFACTS_MOUNT, else the feedpipe home (as in deploy/helm/values.yaml).")

    def resolved_mode(self) -> str:
        mode = self.mode or os.environ.get(LAUNCHER_ENV, "") or IN_PROCESS
        if mode not in LAUNCH_MODES:
            raise dg.Failure(f"launcher mode must be one of {LAUNCH_MODES}, got {mode!r} (resource config or ${LAUNCHER_ENV})")
        return mode

    @property
    def in_process(self) -> bool:
        return self.resolved_mode() == IN_PROCESS

    # Unset fields fall back to the environment, as DataResource's do: a deployment sets them once
    # on the code location (deploy/helm/values.yaml); a resource built in code sets them directly.
    @property
    def ranks(self) -> int:
        return self.nproc_per_node or env_int("FEEDPIPE_NPROC_PER_NODE", 2, 1)

    @property
    def pod_image(self) -> str:
        return self.image or os.environ.get("FEEDPIPE_K8S_GPU_IMAGE", "")

    @property
    def pod_artifacts_claim(self) -> str:
        return self.artifacts_claim or os.environ.get("FEEDPIPE_K8S_ARTIFACTS_CLAIM", "")

    @property
    def pod_artifacts_mount(self) -> Path:
        mount = self.artifacts_claim_mount or os.environ.get("FEEDPIPE_K8S_ARTIFACTS_MOUNT", "")
        return Path(mount).resolve() if mount else feedpipe_home()

    @property
    def pod_gpus(self) -> int:
        return self.gpus_per_pod if self.gpus_per_pod >= 0 else env_int("FEEDPIPE_K8S_POD_GPUS", 0, 0)

    # -- the jobs --------------------------------------------------------------------------------
    def train(
        self,
        context: dg.AssetExecutionContext,
        examples: pl.DataFrame,
        vocabularies: Vocabularies,
        config: TrainConfig,
        device: str = "auto",
    ) -> TrainResult:
        """Run `distributed_jobs train`; the TrainResult is rebuilt from rank 0's checkpoint and summary.

        device: the ComputeResource's setting (auto / cpu / cuda[:i]); each rank takes its own GPU.
        """
        with self._scratch(context) as scratch:
            examples.write_parquet(scratch / "examples.parquet")
            vocabularies.save(scratch / "vocabularies")
            out = scratch / "model"
            cfg = {k: list(v) if isinstance(v, tuple) else v for k, v in asdict(config).items()}
            summary = self._launch(
                context,
                ["train", "--examples", str(scratch / "examples.parquet"), "--vocabularies", str(scratch / "vocabularies"),
                 "--out", str(out), "--config", json.dumps(cfg), "--version", context.run_id[:8]],
                scratch=scratch,
                summary_file=out / "summary.json",
                device=device,
            )
            model = TrainedModel.load(out).model
        return TrainResult(
            model=model,
            history=[EpochStats(**h) for h in summary["history"]],
            best_epoch=summary["best_epoch"],
            seconds=summary["train_seconds"],
            samples_per_s=summary["samples_per_s"],
            device=summary["device"],
            loss_curve=summary["loss_curve"],
            ranks=summary["ranks"],
            over_arch_precision=summary.get("over_arch_precision", "fp32"),
        )

    def rank(
        self,
        context: dg.AssetExecutionContext,
        trained: TrainedModel,
        customers: pl.DataFrame,
        products: pl.DataFrame,
        *,
        top_n: int,
        exclude: pl.DataFrame | None,
        dtype: str,
        unavailable: pl.Series | None = None,
        device: str = "auto",
    ) -> tuple[pl.DataFrame, dict]:
        """Run `distributed_jobs score`: (the merged ranking, rank 0's summary)."""
        with self._scratch(context) as scratch:
            trained.save(scratch / "model")
            customers.write_parquet(scratch / "customers.parquet")
            products.write_parquet(scratch / "products.parquet")
            args = ["score", "--model", str(scratch / "model"), "--customers", str(scratch / "customers.parquet"),
                    "--products", str(scratch / "products.parquet"), "--out", str(scratch / "ranking.parquet"),
                    "--top-n", str(top_n), "--dtype", dtype]
            if exclude is not None:
                exclude.write_parquet(scratch / "exclude.parquet")
                args += ["--exclude", str(scratch / "exclude.parquet")]
            if unavailable is not None:
                unavailable.to_frame().write_parquet(scratch / "unavailable.parquet")
                args += ["--unavailable", str(scratch / "unavailable.parquet")]
            summary = self._launch(
                context, args, scratch=scratch, summary_file=scratch / "ranking.summary.json", device=device
            )
            ranking = pl.read_parquet(scratch / "ranking.parquet")
        return ranking, summary

    # -- launching -------------------------------------------------------------------------------
    def torchrun_command(
        self, job_args: list[str], device: str = "auto", python: str = sys.executable, errors: Path | None = None
    ) -> list[str]:
        rank_device = "cuda" if device.startswith("cuda") else device  # each rank picks cuda:LOCAL_RANK
        report = ["--errors", str(errors)] if errors is not None else []
        return [
            python, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={self.ranks}",
            "-m", ENTRY_MODULE, "--device", rank_device, *report, *job_args,
        ]

    def rank_env(self) -> dict[str, str]:
        threads = self.threads_per_rank or max(1, (os.cpu_count() or 1) // self.ranks)
        return {"OMP_NUM_THREADS": str(threads)}

    @contextlib.contextmanager
    def _scratch(self, context: dg.AssetExecutionContext) -> Iterator[Path]:
        """The job's folder on the shared volume, removed afterwards whether the job worked or not:
        a failed run must not leave a copy of the training examples behind (and one killed before it could
        remove its own is removed by a later launch, once stale as the spool's entries are)."""
        for stale in sweep_spool(self.artifacts.path(SCRATCH_DIR)):  # what steps killed (SIGKILL, OOM) left
            context.log.warning(f"removed {stale}, left in the launchers' scratch by a step that did not finish")
        d = self.artifacts.path(SCRATCH_DIR, context.run_id, context.asset_key.path[-1])
        shutil.rmtree(d, ignore_errors=True)
        d.mkdir(parents=True)
        try:
            yield d
        finally:
            shutil.rmtree(d, ignore_errors=True)
            with contextlib.suppress(OSError):  # the run's folder too, once no other step's is left in it
                d.parent.rmdir()

    def _launch(
        self, context: dg.AssetExecutionContext, job_args: list[str], scratch: Path, summary_file: Path, device: str
    ) -> dict:
        mode = self.resolved_mode()
        context.log.info(f"{job_args[0]}: {mode}, {self.ranks} ranks")
        errors = scratch / "errors"
        try:
            if mode == TORCHRUN:
                invocation = dg.PipesSubprocessClient(env=self.rank_env()).run(
                    context=context, command=self.torchrun_command(job_args, device, errors=errors)
                )
            elif mode == KUBERNETES:
                invocation = self._run_pod(context, job_args, device, errors)
            else:
                raise dg.Failure(f"_launch called in mode {mode!r}")
        except dg.Failure:
            raise
        except Exception as e:
            raise dg.Failure(rank_failure(job_args[0], errors, e, self.ranks)) from e
        messages = [m for m in invocation.get_custom_messages() if isinstance(m, dict) and "job" in m]
        if messages:
            return messages[-1]
        # Pod logs can drop lines; the summary file on the shared volume is the fallback.
        if summary_file.exists():
            return json.loads(summary_file.read_text())
        raise dg.Failure(f"{job_args[0]} finished without a summary from rank 0 (no Pipes message, no {summary_file})")

    def check_gpus_for_ranks(self, device: str) -> str | None:
        """Refuse a pod whose ranks outnumber its GPUs (torchrun gives local rank i GPU i, so the rest
        would fail inside the pod, after the image pull and the wait for a GPU node); say so when GPUs
        would sit idle (returned: a warning for the log)."""
        gpus, ranks = self.pod_gpus, self.ranks
        if device == "cuda" and gpus == 0:
            raise dg.Failure(f"device 'cuda' in kubernetes mode needs GPUs in the pod: set the launcher's gpus_per_pod "
                             f"(or $FEEDPIPE_K8S_POD_GPUS), one per rank ({ranks})")
        if device == "cpu" or gpus == 0:
            return None
        if ranks > gpus:
            raise dg.Failure(f"{ranks} ranks per pod (nproc_per_node) but {gpus} GPU(s) (gpus_per_pod): each rank "
                             f"takes its own GPU, so {ranks - gpus} would have none; set nproc_per_node to {gpus}")
        if ranks < gpus:
            return f"{gpus} GPUs requested for {ranks} rank(s): {gpus - ranks} will be idle (nproc_per_node = gpus_per_pod uses them)"
        return None

    def _run_pod(self, context: dg.AssetExecutionContext, job_args: list[str], device: str, errors: Path | None = None):
        idle = self.check_gpus_for_ranks(device)
        if idle and context is not None:
            context.log.warning(idle)
        try:
            from dagster_k8s import PipesK8sClient
        except ImportError as e:
            raise dg.Failure("launcher mode 'kubernetes' needs dagster-k8s: pip install dagster-k8s==0.29.27") from e
        if not self.pod_image:
            raise dg.Failure(
                "launcher mode 'kubernetes' needs an image: the resource's image or $FEEDPIPE_K8S_GPU_IMAGE "
                "(built from deploy/Dockerfile.cuda or .cpu)"
            )
        return PipesK8sClient().run(
            context=context,
            image=self.pod_image,
            command=self.torchrun_command(job_args, device, python="python", errors=errors),
            namespace=self.namespace or None,
            env=self.rank_env_for_pod(),
            base_pod_spec=self.pod_spec(),
        )

    def rank_env_for_pod(self) -> dict[str, str]:
        cpu = self.cpu_request.strip()
        try:  # a Kubernetes CPU quantity: cores ("4", "0.5") or millicores ("500m")
            cores = float(cpu[:-1]) / 1000 if cpu.endswith("m") else float(cpu)
        except ValueError:
            raise dg.Failure(f"launcher cpu_request must be a Kubernetes CPU quantity such as 4, 0.5 or 500m, "
                             f"got {self.cpu_request!r}") from None
        threads = self.threads_per_rank or max(1, int(cores) // self.ranks)
        return {"OMP_NUM_THREADS": str(threads)}

    def pod_spec(self) -> dict:
        """The Pipes pod: resources, GPU toleration, the artifacts volume, shared memory for NCCL."""
        resources = {
            "requests": {"cpu": self.cpu_request, "memory": self.memory_request},
            "limits": {"memory": self.memory_request},
        }
        if self.pod_gpus:
            resources["requests"]["nvidia.com/gpu"] = str(self.pod_gpus)
            resources["limits"]["nvidia.com/gpu"] = str(self.pod_gpus)
        mounts = [{"name": "dshm", "mountPath": "/dev/shm"}]  # NCCL and torch workers use shared memory
        volumes = [{"name": "dshm", "emptyDir": {"medium": "Memory"}}]
        if not self.pod_artifacts_claim:
            # The job's inputs, outputs and the ranks' error reports live in scratch on the artifacts volume:
            # without it the pod reads nothing and its errors never come back.
            raise dg.Failure(
                "launcher mode 'kubernetes' needs the artifacts volume in the pod: set the launcher's "
                "artifacts_claim (or $FEEDPIPE_K8S_ARTIFACTS_CLAIM) to the PersistentVolumeClaim holding the "
                "artifacts root"
            )
        # The claim goes where the asset's process has it, not at the artifacts root: the scratch
        # paths in the job's arguments are absolute, so both sides must see the same tree.
        mount, root = self.pod_artifacts_mount, self.artifacts.path().resolve()
        if not root.is_relative_to(mount):
            raise dg.Failure(
                f"the artifacts root {root} is not under {mount}, where the claim {self.pod_artifacts_claim} is "
                "mounted: set the launcher's artifacts_claim_mount (or $FEEDPIPE_K8S_ARTIFACTS_MOUNT) to the "
                "claim's mount path in this process"
            )
        mounts.append({"name": "artifacts", "mountPath": str(mount)})
        volumes.append({"name": "artifacts", "persistentVolumeClaim": {"claimName": self.pod_artifacts_claim}})
        spec = {
            "containers": [{"resources": resources, "volumeMounts": mounts}],
            "volumes": volumes,
        }
        if self.pod_gpus:
            spec["tolerations"] = [{"key": "nvidia.com/gpu", "operator": "Exists", "effect": "NoSchedule"}]
        return spec
