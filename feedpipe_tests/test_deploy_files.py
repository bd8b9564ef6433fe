"""The deploy/ files that cannot run here: Helm values checked against the Dagster chart's keys,
Dockerfiles against the pins of scripts/install.sh, the GPU op tags against dagster-k8s's schema."""

import re
from pathlib import Path

import pytest
import yaml

from feedpipe.defs.launchers import k8s_step_tags

ROOT = Path(__file__).resolve().parent.parent
DEPLOY = ROOT / "deploy"

OPEN = None  # a Kubernetes object or free-form map: its keys are not the chart's
# The keys of the official Dagster chart's values, from its pydantic schema in dagster-io/dagster:
# helm/dagster/schema/schema/charts/dagster/values.py (DagsterHelmValues) and subschema/
# {global_, postgresql, webserver, daemon, run_launcher, retention, telemetry}.py, and
# charts/dagster_user_deployments/subschema/user_deployments.py; runMonitoring/runRetries are
# Dict[str, Any] in the schema, so their keys come from templates/configmap-instance.yaml.
# Only the branches these values use are spelled out; a key missing here is a typo or a key the
# chart does not have.
IMAGE = {"repository": OPEN, "tag": OPEN, "pullPolicy": OPEN}
K8S_POD_KEYS = {
    "env": OPEN, "envConfigMaps": OPEN, "envSecrets": OPEN, "annotations": OPEN, "nodeSelector": OPEN,
    "affinity": OPEN, "tolerations": OPEN, "podSecurityContext": OPEN, "securityContext": OPEN,
    "resources": OPEN, "livenessProbe": OPEN, "readinessProbe": OPEN, "startupProbe": OPEN, "labels": OPEN,
    "volumeMounts": OPEN, "volumes": OPEN, "schedulerName": OPEN,
}
CHART_KEYS = {
    "global": {"postgresqlSecretName": OPEN, "dagsterHome": OPEN, "serviceAccountName": OPEN, "celeryConfigSecretName": OPEN},
    "generatePostgresqlPasswordSecret": OPEN,
    "generateCeleryConfigSecret": OPEN,
    "postgresql": {
        "image": OPEN, "enabled": OPEN, "postgresqlHost": OPEN, "postgresqlUsername": OPEN, "postgresqlPassword": OPEN,
        "postgresqlDatabase": OPEN, "postgresqlParams": OPEN, "postgresqlScheme": OPEN, "service": {"port": OPEN},
    },
    "dagsterWebserver": {
        **K8S_POD_KEYS, "replicaCount": OPEN, "image": IMAGE, "nameOverride": OPEN, "pathPrefix": OPEN, "service": OPEN,
        "workspace": OPEN, "deploymentLabels": OPEN, "enableReadOnly": OPEN, "dbStatementTimeout": OPEN,
        "dbPoolRecycle": OPEN, "logLevel": OPEN,
    },
    "dagster-user-deployments": {
        "enabled": OPEN, "enableSubchart": OPEN, "imagePullSecrets": OPEN,
        "deployments": [{
            **K8S_POD_KEYS, "name": OPEN, "image": IMAGE, "dagsterApiGrpcArgs": OPEN, "codeServerArgs": OPEN,
            "includeConfigInLaunchedRuns": {"enabled": OPEN}, "port": OPEN,
        }],
    },
    "runLauncher": {
        "type": OPEN,
        "config": {
            "k8sRunLauncher": {
                "image": IMAGE, "imagePullPolicy": OPEN, "jobNamespace": OPEN, "loadInclusterConfig": OPEN,
                "kubeconfigFile": OPEN, "envConfigMaps": OPEN, "envSecrets": OPEN, "envVars": OPEN,
                "volumeMounts": OPEN, "volumes": OPEN, "labels": OPEN, "failPodOnRunFailure": OPEN,
                "resources": OPEN, "schedulerName": OPEN, "securityContext": OPEN,
                "runK8sConfig": {
                    "containerConfig": OPEN, "podSpecConfig": OPEN, "podTemplateSpecMetadata": OPEN,
                    "jobSpecConfig": OPEN, "jobMetadata": OPEN,
                },
            },
            "celeryK8sRunLauncher": OPEN,
            "customRunLauncher": OPEN,
        },
    },
    "dagsterDaemon": {
        **K8S_POD_KEYS, "enabled": OPEN, "image": IMAGE, "heartbeatTolerance": OPEN, "deploymentLabels": OPEN,
        "runCoordinator": {
            "enabled": OPEN, "type": OPEN,
            "config": {"queuedRunCoordinator": {
                "maxConcurrentRuns": OPEN, "tagConcurrencyLimits": OPEN, "dequeueIntervalSeconds": OPEN,
                "dequeueNumWorkers": OPEN, "dequeueUseThreads": OPEN,
            }, "customRunCoordinator": OPEN},
        },
        "runMonitoring": {
            "enabled": OPEN, "startTimeoutSeconds": OPEN, "cancelTimeoutSeconds": OPEN, "maxResumeRunAttempts": OPEN,
            "pollIntervalSeconds": OPEN, "freeSlotsAfterRunEndSeconds": OPEN,
        },
        "runRetries": {"enabled": OPEN, "maxRetries": OPEN},
        "sensors": OPEN, "schedules": OPEN,
    },
    "retention": {
        "enabled": OPEN,
        "sensor": {"purgeAfterDays": OPEN},
        "schedule": {"purgeAfterDays": OPEN},
        "autoMaterialize": {"purgeAfterDays": OPEN},
    },
    "telemetry": {"enabled": OPEN},
    "computeLogManager": OPEN, "pythonLogs": OPEN, "scheduler": OPEN, "ingress": OPEN, "imagePullSecrets": OPEN,
    "busybox": OPEN, "migrate": OPEN, "serviceAccount": OPEN, "additionalInstanceConfig": OPEN,
    "rabbitmq": OPEN, "redis": OPEN, "flower": OPEN,
}
# dagster_k8s.job.USER_DEFINED_K8S_JOB_CONFIG_SCHEMA: the keys a `dagster-k8s/config` tag may have.
K8S_CONFIG_TAG_KEYS = {
    "container_config", "pod_template_spec_metadata", "pod_spec_config", "job_config", "job_metadata",
    "job_spec_config", "merge_behavior",
}


def unknown_keys(values, schema, path=""):
    if schema is OPEN:
        return []
    if isinstance(schema, list):
        return [k for i, item in enumerate(values or []) for k in unknown_keys(item, schema[0], f"{path}[{i}]")]
    out = []
    for key, value in (values or {}).items():
        where = f"{path}.{key}" if path else key
        if key not in schema:
            out.append(where)
        else:
            out += unknown_keys(value, schema[key], where)
    return out


@pytest.fixture(scope="module")
def values():
    return yaml.safe_load((DEPLOY / "helm" / "values.yaml").read_text())


def test_helm_values_use_only_keys_of_the_dagster_chart(values):
    assert unknown_keys(values, CHART_KEYS) == []


def test_the_key_check_catches_a_misspelt_key():
    assert unknown_keys({"dagsterDaemon": {"runRetries": {"maxRetry": 1}}}, CHART_KEYS) == ["dagsterDaemon.runRetries.maxRetry"]


def test_helm_values_launch_runs_on_kubernetes_with_external_postgres_retries_and_monitoring(values):
    assert values["runLauncher"]["type"] == "K8sRunLauncher"
    pg = values["postgresql"]
    assert pg["enabled"] is False and pg["postgresqlHost"] and not pg["postgresqlPassword"]
    assert values["generatePostgresqlPasswordSecret"] is False and values["global"]["postgresqlSecretName"]
    daemon = values["dagsterDaemon"]
    assert daemon["runRetries"]["enabled"] and daemon["runRetries"]["maxRetries"] >= 1
    assert daemon["runMonitoring"]["enabled"]
    assert daemon["runCoordinator"]["type"] == "QueuedRunCoordinator"


def test_the_code_location_loads_the_kubernetes_definitions_module(values):
    (deployment,) = values["dagster-user-deployments"]["deployments"]
    args = deployment["dagsterApiGrpcArgs"]
    module = args[args.index("-m") + 1]
    assert module == "feedpipe.definitions_k8s"
    assert (ROOT / (module.replace(".", "/") + ".py")).exists()
    mounts = {m["mountPath"] for m in deployment["volumeMounts"]}
    env = {e["name"]: e["value"] for e in deployment["env"]}
    assert env["FEEDPIPE_HOME"] in mounts  # the artifacts live on the shared volume


def dockerfile_instructions(path: Path) -> list[tuple[str, str]]:
    """(INSTRUCTION, arguments) with line continuations joined and comments dropped."""
    text = re.sub(r"\\\n", " ", "\n".join(
        line for line in path.read_text().splitlines() if not line.lstrip().startswith("#")
    ))
    return [(m.group(1).upper(), m.group(2).strip()) for m in re.finditer(r"^\s*(\w+)\s+(.*)$", text, re.M)]


def install_script_pins() -> dict[str, str]:
    """package -> version pinned by scripts/install.sh (what CI and `make` install)."""
    text = (ROOT / "scripts" / "install.sh").read_text()
    return dict(re.findall(r"([A-Za-z][\w-]*)==([\w.]+)", text))


@pytest.mark.parametrize("name, fbgemm", [("Dockerfile.cpu", "fbgemm-gpu-cpu"), ("Dockerfile.cuda", "fbgemm-gpu")])
def test_dockerfiles_pin_the_stack_of_the_install_script(name, fbgemm):
    instructions = dockerfile_instructions(DEPLOY / name)
    assert instructions[0][0] in ("FROM", "ARG")
    assert any(k == "FROM" and "python:3.11" in a for k, a in instructions)
    runs = " ".join(a for k, a in instructions if k == "RUN")
    pins = install_script_pins()
    for package in ("torch", "torchrec", "torchmetrics"):
        assert f"{package}=={pins[package]}" in runs, package
    assert f"{fbgemm}=={pins['fbgemm-gpu-cpu']}" in runs  # the CPU and CUDA builds share a version
    assert "--no-deps torchrec" in runs  # torchrec's metadata would pull the CUDA fbgemm onto CPU
    pyproject = (ROOT / "pyproject.toml").read_text()
    dagster_libs = re.search(r'"dagster-postgres==([\d.]+)"', pyproject).group(1)
    assert f"dagster-k8s=={dagster_libs}" in runs
    user = [a for k, a in instructions if k == "USER"]
    assert user and user[-1] not in ("0", "root")
    cmd = [a for k, a in instructions if k == "CMD"][-1]
    assert "feedpipe.definitions_k8s" in cmd


def test_gpu_op_tags_use_only_dagster_k8s_config_keys():
    tags = k8s_step_tags(1, image="registry.example.com/feedpipe:cuda-x")["dagster-k8s/config"]
    assert set(tags) <= K8S_CONFIG_TAG_KEYS
    assert tags["container_config"]["image"].endswith(":cuda-x")
