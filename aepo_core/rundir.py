"""The run directory: the files a run is made of, and the rule that says which stages are done.

    runs/<name>/
      config.yaml              the resolved config, written once
      base.json                the starting policy's folder and digest
      dataset/train.parquet    normalised dataset snapshots (id, prompt, answer, source)
      dataset/eval.parquet
      iter_0003/<stage>/...    one folder per stage, published atomically, `_SUCCESS.json` inside

A stage is complete iff its folder holds `_SUCCESS.json` and the upstream digests recorded there equal
the digests of its upstream artifacts now. The manifest also records the stage's params, metrics,
seconds and a digest of its own outputs, which downstream stages record in turn: change an artifact
(say by rerunning a stage) and everything downstream of it is stale.
"""

from __future__ import annotations

import hashlib
import json
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from aepo_core.atomic import atomic_dir, atomic_write_text
from aepo_core.config import Config, load_config

MANIFEST = "_SUCCESS.json"
STAGES = ("prepare", "rollout", "reward", "update", "entropy", "evaluate")


def file_digest(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as fh:
        for block in iter(lambda: fh.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def folder_digest(folder: Path) -> str:
    """Digest of every file under `folder` (relative names and contents), the manifest excluded."""
    h = hashlib.sha256()
    for path in sorted(p for p in folder.rglob("*") if p.is_file() and p.name != MANIFEST):
        h.update(str(path.relative_to(folder)).encode())
        h.update(file_digest(path).encode())
    return h.hexdigest()


class StageNotReady(RuntimeError):
    """A stage was asked to run but an upstream artifact is missing or incomplete."""


class RunDir:
    def __init__(self, root: str | Path) -> None:
        self.root = Path(root)

    # ----------------------------------------------------------------------------- fixed files
    @property
    def config_path(self) -> Path:
        return self.root / "config.yaml"

    def config(self) -> Config:
        return load_config(self.config_path)

    def dataset_path(self, split: str) -> Path:
        return self.root / "dataset" / f"{split}.parquet"

    def read_json(self, name: str) -> dict[str, Any] | None:
        path = self.root / name
        return json.loads(path.read_text()) if path.is_file() else None

    def write_json(self, name: str, data: dict[str, Any]) -> None:
        atomic_write_text(self.root / name, json.dumps(data, indent=2, sort_keys=True))

    # ----------------------------------------------------------------------------- stages
    def stage_dir(self, iteration: int, stage: str) -> Path:
        if stage not in STAGES:
            raise ValueError(f"unknown stage '{stage}' (stages: {', '.join(STAGES)})")
        return self.root / f"iter_{iteration:04d}" / stage

    def manifest(self, iteration: int, stage: str) -> dict[str, Any] | None:
        path = self.stage_dir(iteration, stage) / MANIFEST
        if not path.is_file():
            return None
        try:
            return json.loads(path.read_text())
        except json.JSONDecodeError:
            return None  # unreadable manifest: treat the stage as not done

    def digest(self, iteration: int, stage: str) -> str:
        """The output digest of a completed stage; raises StageNotReady when it is not there."""
        found = self.manifest(iteration, stage)
        if found is None:
            raise StageNotReady(f"{self.stage_dir(iteration, stage)} has no {MANIFEST}: run that stage first")
        return found["digest"]

    def is_complete(self, iteration: int, stage: str, upstream: dict[str, str]) -> bool:
        found = self.manifest(iteration, stage)
        return found is not None and found.get("upstream") == upstream

    @contextmanager
    def publish(
        self,
        iteration: int,
        stage: str,
        upstream: dict[str, str],
        params: dict[str, Any] | None = None,
        started: float | None = None,
    ) -> Iterator[tuple[Path, dict[str, Any]]]:
        """Yield (temporary folder, metrics dict); fill both. On success the manifest is written last
        and the folder renamed into place; on error nothing under the stage's name changes.
        `started` (a time.perf_counter() value) is when the stage began; its manifest's seconds
        count from then."""
        started = time.perf_counter() if started is None else started
        metrics: dict[str, Any] = {}
        with atomic_dir(self.stage_dir(iteration, stage)) as tmp:
            yield tmp, metrics
            manifest = {
                "stage": stage,
                "iteration": iteration,
                "upstream": upstream,
                "params": params or {},
                "metrics": metrics,
                "seconds": round(time.perf_counter() - started, 4),
                "digest": folder_digest(tmp),
                "finished_at": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
            }
            (tmp / MANIFEST).write_text(json.dumps(manifest, indent=2, sort_keys=True))

    def iterations_present(self) -> list[int]:
        return sorted(int(p.name[5:]) for p in self.root.glob("iter_*") if p.name[5:].isdigit())
