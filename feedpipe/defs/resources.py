"""Resources: where the input lives, where artifacts go, which database, which device.

Secrets never pass through resource config: the database resource holds the *name* of the
environment variable, so the launchpad and run metadata never show a URL with a password.
"""

from __future__ import annotations

import os
from pathlib import Path

import dagster as dg
from pydantic import Field
import torch

from feedpipe.contract import INPUT_CONFIG_FILE, TRUTH_FILE
from feedpipe.database import DATABASE_URL_ENV, feedpipe_home, redact_url, resolve_database_url
from feedpipe.input_config import InputConfig, is_env_var_name, load_input_config


class DataResource(dg.ConfigurableResource):
    """The input directory in the contract and the optional YAML input config (feature roles, availability, a
    Postgres source)."""

    data_dir: str = Field(default="", description="Directory with transactions, customers and products (.parquet or .csv). Empty: $FEEDPIPE_DATA_DIR.")
    input_config: str = ""

    def _directory_setting(self) -> str:
        return self.data_dir or os.environ.get("FEEDPIPE_DATA_DIR", "")

    def directory(self) -> Path:
        d = self._directory_setting()
        if not d:
            raise dg.Failure("no input directory: set the data resource's data_dir or FEEDPIPE_DATA_DIR (feedpipe run --data DIR)")
        return Path(d)

    def truth_path(self) -> Path | None:
        """Where the demo generator's true scores would lie beside file inputs (`truth.parquet`), or None:
        inputs read from Postgres have no directory, and a directory left over in the environment (the
        CLI's demo folder) would give the oracle another dataset's truth."""
        if self.config().postgres is not None:
            return None
        d = self._directory_setting()
        return Path(d) / TRUTH_FILE if d else None

    def config(self) -> InputConfig:
        """`input_config`; else, for a directory named here, its own `feedpipe.yaml` (not a config the environment
        names for another directory); else $FEEDPIPE_INPUT_CONFIG; else $FEEDPIPE_DATA_DIR's own; else defaults."""
        if self.input_config:
            return load_input_config(self.input_config)
        if not self.data_dir and os.environ.get("FEEDPIPE_INPUT_CONFIG"):
            return load_input_config(os.environ["FEEDPIPE_INPUT_CONFIG"])
        directory = self._directory_setting()
        own = Path(directory) / INPUT_CONFIG_FILE if directory else None
        return load_input_config(own if own is not None and own.is_file() else None)


class ArtifactsResource(dg.ConfigurableResource):
    """Root of the files the assets write (Parquet tables, checkpoints). Empty: <feedpipe home>/artifacts."""

    root: str = ""

    def path(self, *parts: str) -> Path:
        base = Path(self.root) if self.root else feedpipe_home() / "artifacts"
        return base.joinpath(*parts)


class DatabaseResource(dg.ConfigurableResource):
    """The feed database. URL from the environment variable named here; with the default variable unset,
    the embedded server. A variable the deployment named on purpose must be set: falling back to another
    database would publish the feed where nobody reads it and report success."""

    url_env_var: str = DATABASE_URL_ENV

    def url(self) -> str:
        env = dict(os.environ)
        if not is_env_var_name(self.url_env_var):
            # `{env: VAR}` in a run config (or dg.EnvVar in code) hands over the variable's value, the URL with its
            # password: never repeated here, as this message reaches the console and the run's stored events.
            raise dg.Failure("the database resource's url_env_var must be the NAME of an environment variable "
                             "holding the feed database's URL (letters, digits and underscores), not the URL or "
                             "an {env: ...} reference to it; the value given is not shown, as it may be a secret")
        if self.url_env_var != DATABASE_URL_ENV:
            if not env.get(self.url_env_var):
                raise dg.Failure(f"the database resource's url_env_var names {self.url_env_var}, which is not set "
                                 "in this process's environment; set it to the feed database's URL")
            env[DATABASE_URL_ENV] = env[self.url_env_var]
        return resolve_database_url(env)

    def redacted_url(self) -> str:
        return redact_url(self.url())


class ComputeResource(dg.ConfigurableResource):
    """Where torch runs: 'auto' picks cuda when a GPU is visible, else cpu."""

    device: str = "auto"

    def torch_device(self) -> torch.device:
        if self.device == "auto":
            return torch.device("cuda" if torch.cuda.is_available() else "cpu")
        try:
            device = torch.device(self.device)
        except RuntimeError:
            device = None
        if device is None or device.type not in ("cpu", "cuda"):
            raise dg.Failure(f"compute.device must be 'auto', 'cpu', 'cuda' or 'cuda:N', got {self.device!r}")
        if device.type == "cuda" and not torch.cuda.is_available():
            raise dg.Failure(f"compute.device is {self.device!r}, but this process sees no CUDA device "
                             "(use 'auto' to fall back to the CPU)")
        if device.type == "cuda" and (device.index or 0) >= torch.cuda.device_count():
            raise dg.Failure(f"compute.device is {self.device!r}, but this process sees "
                             f"{torch.cuda.device_count()} CUDA device(s)")
        return device
