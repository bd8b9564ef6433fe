"""Stores asset values as files: Parquet for frames, a directory for objects with save()/load().

Path: <artifacts root>/<asset>/<partition>[.parquet]. A `_class` file in each object directory
names the class to load it with, so downstream assets need no knowledge of how it was written.
An asset that wrote its table to Parquet itself, a chunk at a time (transactions), returns a
`SpooledParquet`: the file is moved into place, and downstream assets load a frame as from any other.
"""

# no `from __future__ import annotations`: Dagster reads the resource fields' annotations as types

import contextlib
import glob
import importlib
import os
import shutil
import uuid
from pathlib import Path

import dagster as dg
import polars as pl

from feedpipe.defs.resources import ArtifactsResource
from feedpipe.spooled_load import SpooledParquet


SET_ASIDE_SUFFIX = ".old.tmp"


def _key_path(context: dg.OutputContext | dg.InputContext, root: Path) -> Path:
    asset = "/".join(context.asset_key.path)
    partition = context.asset_partition_key if context.has_asset_partitions else "all"
    return root / asset / partition


class ArtifactIOManager(dg.ConfigurableIOManager):
    artifacts: ArtifactsResource  # configured at launch and shared: definitions.build_resources

    def handle_output(self, context: dg.OutputContext, obj) -> None:
        base = _key_path(context, self.artifacts.path())
        base.parent.mkdir(parents=True, exist_ok=True)
        # Each write's own temporary name: two runs of one partition (the schedule and a manual rerun)
        # writing one shared name corrupted the file that won.
        unique = f"{os.getpid()}-{uuid.uuid4().hex[:12]}"
        if isinstance(obj, (pl.DataFrame, SpooledParquet)):
            tmp = base.with_name(f"{base.name}.parquet.{unique}.tmp")
            if isinstance(obj, SpooledParquet):
                shutil.move(obj.path, tmp)  # a rename when the spool is on the artifacts' filesystem
            else:
                obj.write_parquet(tmp)
            tmp.replace(base.with_suffix(".parquet"))  # atomic: a crash never leaves half a file
            context.add_output_metadata({"path": dg.MetadataValue.path(str(base.with_suffix(".parquet")))})
            return
        if hasattr(obj, "save") and hasattr(type(obj), "load"):
            tmp = base.with_name(f"{base.name}.{unique}.tmp")
            obj.save(tmp)
            (tmp / "_class").write_text(f"{type(obj).__module__}:{type(obj).__qualname__}")
            # Out of the way by a rename, not deleted first: the old directory is never half gone, and a reader
            # (or a process killed between the two renames) finds it set aside (`_set_aside_versions`).
            old = base.with_name(f"{base.name}.{unique}{SET_ASIDE_SUFFIX}")
            with contextlib.suppress(FileNotFoundError):
                base.rename(old)
            tmp.rename(base)
            for superseded in (old, *_set_aside_versions(base)):  # this one's and any a killed write left
                shutil.rmtree(superseded, ignore_errors=True)
            context.add_output_metadata({"path": dg.MetadataValue.path(str(base))})
            return
        raise TypeError(f"ArtifactIOManager cannot store {type(obj).__name__}")

    def load_input(self, context: dg.InputContext):
        base = _key_path(context, self.artifacts.path())
        if base.with_suffix(".parquet").exists():
            return pl.read_parquet(base.with_suffix(".parquet"))
        for directory in (base, *_set_aside_versions(base)):
            if (directory / "_class").exists():
                module, name = (directory / "_class").read_text().split(":")
                return getattr(importlib.import_module(module), name).load(directory)
        raise FileNotFoundError(f"no stored value for {context.asset_key.to_user_string()} at {base}")


def _set_aside_versions(base: Path) -> list[Path]:
    """Earlier versions of the object directory `base` moved aside by writes that have not (or never) put their
    own in place, newest first."""
    found = []
    for path in base.parent.glob(f"{glob.escape(base.name)}.*{SET_ASIDE_SUFFIX}"):
        with contextlib.suppress(FileNotFoundError):  # its write finished and removed it meanwhile
            found.append((path.stat().st_mtime, path))
    return [p for _, p in sorted(found, reverse=True)]


def latest_partition_before(root: Path, asset: str, partition: str) -> Path | None:
    """The newest stored partition of `asset` strictly before `partition` (ISO dates sort as text)."""
    d = root / asset
    if not d.is_dir():
        return None
    earlier = sorted(p for p in d.iterdir() if p.is_dir() and not p.name.endswith(".tmp") and p.name < partition)
    return earlier[-1] if earlier else None
