"""Dagster entry point in a Kubernetes deployment: the same definitions, each step in its own pod.

The Helm chart's user-code deployment loads this module (`dagster api grpc -m
feedpipe.definitions_k8s`, see deploy/helm/values.yaml). With the k8s_job_executor every asset
step is a Kubernetes Job, so the `dagster-k8s/config` op tags on dlrm_model and pair_scores
(feedpipe/defs/launchers.py) put just those two steps on GPU nodes. Needs
`pip install dagster-k8s==0.29.27` (in the images under deploy/); nothing else imports it.
"""

import dagster as dg
from dagster_k8s import k8s_job_executor

from feedpipe.definitions import defs as local_defs

defs = dg.Definitions.merge(local_defs, dg.Definitions(executor=k8s_job_executor))
