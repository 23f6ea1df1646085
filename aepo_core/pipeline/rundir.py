"""The run directory: the files a run is made of, and the rule that says which stages are done.

    runs/<name>/
      config.yaml              the resolved config, written once
      base.json                the starting policy's folder and digest
      dataset/train.parquet    normalised dataset snapshots (id, prompt, answer, source)
      dataset/eval.parquet
      iter_0003/<stage>/...    one folder per stage, published atomically, `_SUCCESS.json` inside

A stage is complete iff its folder holds `_SUCCESS.json` and the upstream digests recorded there equal
the digests of its upstream artifacts now. The manifest also records the stage's params, metrics,
seconds and a digest of its own outputs (and of each file), which downstream stages record in turn:
change an artifact (say by rerunning a stage) and everything downstream of it is stale.

Outputs are checked against their manifest when they are about to be read (`RunDir.verify`): a
missing, truncated or altered file makes its stage damaged, reported by path and recomputed, never
used. File digests are cached in memory by (path, size, mtime, ctime, inode), so each file is read
once per process (a stage's own outputs are never read back after it publishes them).

One process at a time writes a run directory: `RunDir.writer()` holds an OS lock (flock) on
`<run>/.writer.lock`, which names its holder (pid, host, since when) for the refusal message and is
released by the kernel when the holder dies.
"""

from __future__ import annotations

import errno
import fcntl
import hashlib
import json
import os
import shutil
import socket
import sys
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from aepo_core.atomic import atomic_dir, atomic_write_text
from aepo_core.config import Config, config_version, load_config
from aepo_core.errors import EnvironmentFault, UserError

MANIFEST = "_SUCCESS.json"
PRUNED = "_PRUNED.json"  # what retention deleted from a finished stage (aepo_core.pipeline.retention)


LOCK_FILE = ".writer.lock"

# (absolute path, size, mtime_ns, ctime_ns, inode) -> sha256 of the file: a file is read once per
# process unless it changes (any write changes mtime/ctime; a replaced file changes inode).
_DIGESTS: dict[tuple, str] = {}


def _stat_key(path: Path) -> tuple:
    st = os.stat(path)
    return (str(Path(path).absolute()), st.st_size, st.st_mtime_ns, st.st_ctime_ns, st.st_ino)


def file_digest(path: Path) -> str:
    key = _stat_key(path)
    found = _DIGESTS.get(key)
    if found is not None:
        return found
    h = hashlib.sha256()
    with open(path, "rb") as fh:
        for block in iter(lambda: fh.read(1 << 20), b""):
            h.update(block)
    _DIGESTS[key] = h.hexdigest()
    return _DIGESTS[key]


def file_digests(folder: Path) -> dict[str, str]:
    """{relative name: sha256} of every file under `folder`, the manifest and the pruning record excluded."""
    return {
        str(path.relative_to(folder)): file_digest(path)
        for path in sorted(p for p in folder.rglob("*") if p.is_file() and p.name not in (MANIFEST, PRUNED))
    }


def combine_digests(files: dict[str, str]) -> str:
    h = hashlib.sha256()
    for name in sorted(files):
        h.update(name.encode())
        h.update(files[name].encode())
    return h.hexdigest()


def folder_digest(folder: Path) -> str:
    """Digest of every file under `folder` (relative names and contents), the manifest excluded."""
    return combine_digests(file_digests(folder))


def is_pruned(name: str, pruned: dict[str, Any]) -> bool:
    """Whether the stage file `name` (relative, as in a manifest's "files") is covered by the
    entries of a pruning record (`RunDir.pruned`): a file name, or a folder name ending in "/"."""
    return any(name == p or (p.endswith("/") and name.startswith(p)) for p in pruned)


def _remember(folder: Path, files: dict[str, str]) -> None:
    """Record digests computed on a temporary folder under the names it was renamed to."""
    for name, digest in files.items():
        try:
            _DIGESTS[_stat_key(folder / name)] = digest
        except FileNotFoundError:
            pass


class StageNotReady(RuntimeError):
    """A stage was asked to run but an upstream artifact is missing or incomplete."""


class DamagedStage(StageNotReady, EnvironmentFault):
    """A finished stage's files no longer match the digests its manifest recorded."""


class RunDirBusy(UserError):
    """Another process is writing this run directory."""


# The iteration number of what a run measures of its starting policy (stage_dir: base/<stage>).
BASE_ITERATION = -1

# Run directories this process holds the writer lock of: resolved root -> [file descriptor, depth].
_HELD: dict[Path, list] = {}
_HELD_GUARD = threading.Lock()


class RunDir:
    def __init__(self, root: str | Path) -> None:
        self.root = Path(root)
        self._loaded: tuple | None = None  # (file stats, latest config, history, {iteration: config})

    # ----------------------------------------------------------------------------- fixed files
    @property
    def config_path(self) -> Path:
        return self.root / "config.yaml"

    @property
    def history_path(self) -> Path:
        return self.root / "config_history.jsonl"

    def config(self, iteration: int | None = None) -> Config:
        """The config iteration `iteration` is computed with (aepo_core.config.config_version: a
        rerun's overrides apply from its iteration on); None: the latest, what a resume continues with."""
        key = (_stat_key(self.config_path), _stat_key(self.history_path) if self.history_path.is_file() else None)
        if self._loaded is None or self._loaded[0] != key:  # parsed once per version of the two files
            self._loaded = (key, load_config(self.config_path), self.config_history(), {})
        _, latest, records, versions = self._loaded
        if iteration not in versions:
            versions[iteration] = config_version(latest, records, iteration)
        return versions[iteration]

    def config_history(self) -> list[dict[str, Any]]:
        """The records of config_history.jsonl, oldest first ([] when there is none)."""
        if not self.history_path.is_file():
            return []
        lines = self.history_path.read_text().splitlines()
        return [json.loads(line) for line in lines if line.strip()]

    def dataset_path(self, split: str) -> Path:
        return self.root / "dataset" / f"{split}.parquet"

    def read_json(self, name: str) -> dict[str, Any] | None:
        path = self.root / name
        return json.loads(path.read_text()) if path.is_file() else None

    def write_json(self, name: str, data: dict[str, Any]) -> None:
        atomic_write_text(self.root / name, json.dumps(data, indent=2, sort_keys=True))

    # ----------------------------------------------------------------------------- stages
    def stage_dir(self, iteration: int, stage: str) -> Path:
        """iter_NNNN/<stage>; for iteration BASE_ITERATION (-1), base/<stage>: what a run measures of
        its starting policy before the first update (the evaluation of the base policy)."""
        if not stage.isidentifier():  # which stages exist is the pipeline's business (stages.PIPELINE)
            raise ValueError(f"bad stage name {stage!r}")
        if iteration == BASE_ITERATION:
            return self.root / "base" / stage
        if iteration < 0:
            raise ValueError(f"bad iteration {iteration}")
        return self.root / f"iter_{iteration:04d}" / stage

    def manifest(self, iteration: int, stage: str) -> dict[str, Any] | None:
        path = self.stage_dir(iteration, stage) / MANIFEST
        if not path.is_file():
            return None
        try:
            return json.loads(path.read_text())
        except json.JSONDecodeError:
            return None  # unreadable manifest: treat the stage as not done

    def digest(self, iteration: int, stage: str, verify: bool = True) -> str:
        """The output digest of a completed stage, its files checked against it (`verify`); raises
        StageNotReady when it is not there, DamagedStage (naming the file) when it is damaged."""
        found = self.manifest(iteration, stage)
        if found is None:
            raise StageNotReady(f"{self.stage_dir(iteration, stage)} has no {MANIFEST}: run that stage first")
        if verify:
            problem = self.damage(iteration, stage, found)
            if problem:
                raise DamagedStage(
                    f"{problem}; recompute it with `aepo run --run-dir {self.root}` (or delete "
                    f"{self.stage_dir(iteration, stage)})"
                )
        return found["digest"]

    def damage(self, iteration: int, stage: str, manifest: dict[str, Any] | None = None) -> str | None:
        """None when the stage's files match the digests in its manifest, else what is wrong with
        which file (missing, altered, unexpected). Each file is digested once per process."""
        manifest = manifest or self.manifest(iteration, stage)
        folder = self.stage_dir(iteration, stage)
        if manifest is None:
            return f"{folder / MANIFEST} is missing or unreadable"
        try:
            files = file_digests(folder)
        except OSError as exc:  # unreadable file or folder
            return f"{exc.filename or folder}: cannot be read ({exc.strerror or exc})"
        if combine_digests(files) == manifest.get("digest"):
            return None
        recorded = manifest.get("files")
        pruned = self.pruned(iteration, stage)
        if isinstance(recorded, dict):
            for name in sorted(set(recorded) | set(files)):
                if name in recorded and is_pruned(name, pruned):
                    continue  # deleted by retention on purpose (or about to be): not damage
                if name not in files:
                    return f"{folder / name} is missing (damaged stage)"
                if name not in recorded:
                    return f"{folder / name} was not written by this stage (damaged stage)"
                if files[name] != recorded[name]:
                    return f"{folder / name} differs from the digest in its {MANIFEST} (damaged stage)"
            if pruned:
                return None  # every file kept is as recorded; the rest was pruned
        return f"{folder}: its files differ from the digest in its {MANIFEST} (damaged stage)"

    def pruned(self, iteration: int, stage: str) -> dict[str, Any]:
        """What retention deleted from the stage: {name (a folder ends in "/"): {"setting", "at"}}."""
        path = self.stage_dir(iteration, stage) / PRUNED
        return json.loads(path.read_text()) if path.is_file() else {}

    def mark_pruned(self, iteration: int, stage: str, names: list[str], setting: str) -> None:
        """Record in the stage's `_PRUNED.json` that `names` (a file, or a folder as "policy/") are
        deleted on purpose, by the retention `setting`, before deleting them: a crash in between
        leaves a file the record calls pruned (harmless), never a missing file it does not (damage).
        The manifest is not touched: the stage keeps its digest and its readers stay valid."""
        if self.manifest(iteration, stage) is None:
            raise StageNotReady(f"{self.stage_dir(iteration, stage)} has no {MANIFEST}")
        pruned = self.pruned(iteration, stage)
        at = time.strftime("%Y-%m-%dT%H:%M:%S%z")
        for name in names:
            pruned.setdefault(name, {"setting": setting, "at": at})
        atomic_write_text(self.stage_dir(iteration, stage) / PRUNED, json.dumps(pruned, indent=2, sort_keys=True))

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
        expected_bytes: int | None = None,
    ) -> Iterator[tuple[Path, dict[str, Any]]]:
        """Yield (temporary folder, metrics dict); fill both. On success the manifest is written last
        and the folder renamed into place; on error nothing under the stage's name changes.
        `started` (a time.perf_counter() value) is when the stage began; its manifest's seconds
        count from then; `expected_bytes` estimates the size of the outputs (for a disk-full message)."""
        started = time.perf_counter() if started is None else started
        metrics: dict[str, Any] = {}
        final = self.stage_dir(iteration, stage)
        with atomic_dir(final, expected_bytes) as tmp:
            yield tmp, metrics
            files = file_digests(tmp)
            manifest = {
                "stage": stage,
                "iteration": iteration,
                "upstream": upstream,
                "params": params or {},
                "metrics": metrics,
                "seconds": round(time.perf_counter() - started, 4),
                "digest": combine_digests(files),
                "files": files,
                "finished_at": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
            }
            (tmp / MANIFEST).write_text(json.dumps(manifest, indent=2, sort_keys=True))
        _remember(final, files)  # readers in this process need not digest what it just wrote

    # ----------------------------------------------------------------------------- one writer
    def acquire_writer(self) -> None:
        """Become the one process writing this run directory (re-entrant within a process), or raise
        RunDirBusy naming the holder. The kernel drops the lock when its holder dies, however."""
        key = self.root.resolve()
        with _HELD_GUARD:
            if key in _HELD:
                _HELD[key][1] += 1
                return
            self.root.mkdir(parents=True, exist_ok=True)
            path = self.root / LOCK_FILE
            fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except OSError as exc:
                os.close(fd)
                if exc.errno not in (errno.EWOULDBLOCK, errno.EACCES):
                    raise
                raise RunDirBusy(f"{self.root} is in use by {self._holder(path)}: wait for it to finish or stop it") from None
            since = time.strftime("%Y-%m-%dT%H:%M:%S%z")
            info = {"pid": os.getpid(), "host": socket.gethostname(), "since": since, "argv": " ".join(sys.argv)[:300]}
            os.ftruncate(fd, 0)
            os.pwrite(fd, json.dumps(info).encode(), 0)
            _HELD[key] = [fd, 1]

    def release_writer(self) -> None:
        key = self.root.resolve()
        with _HELD_GUARD:
            held = _HELD.get(key)
            if held is None:
                return
            held[1] -= 1
            if held[1] == 0:
                del _HELD[key]
                fcntl.flock(held[0], fcntl.LOCK_UN)
                os.close(held[0])

    @contextmanager
    def writer(self) -> Iterator[None]:
        self.acquire_writer()
        try:
            yield
        finally:
            self.release_writer()

    def writer_holder(self) -> str | None:
        """Who holds this run directory's writer lock, when another process does (creates nothing)."""
        path = self.root / LOCK_FILE
        if self.holds_writer() or not path.is_file():
            return None
        fd = os.open(path, os.O_RDONLY)
        try:
            fcntl.flock(fd, fcntl.LOCK_SH | fcntl.LOCK_NB)
        except OSError:
            return self._holder(path)
        finally:
            os.close(fd)
        return None

    def holds_writer(self) -> bool:
        return self.root.resolve() in _HELD

    @staticmethod
    def _holder(path: Path) -> str:
        try:
            info = json.loads(path.read_text())
            return f"pid {info['pid']} on {info['host']} since {info['since']} ({info.get('argv', '')})"
        except (OSError, ValueError, KeyError, TypeError):
            return "another process (it has not written its name yet)"

    def remove_stale_temporaries(self) -> list[Path]:
        """Remove what interrupted saves left (`.NAME.tmp-*`, `.NAME.old-*`): only the writer may,
        so none of them can belong to a save in progress."""
        if not self.holds_writer():
            raise RuntimeError(f"{self.root}: remove_stale_temporaries needs the writer lock")
        removed = []
        for pattern in (".*.tmp-*", ".*.old-*"):
            for path in [*self.root.glob(pattern), *self.root.glob(f"*/{pattern}")]:
                if path.is_dir() and not path.is_symlink():
                    shutil.rmtree(path, ignore_errors=True)
                else:
                    path.unlink(missing_ok=True)
                removed.append(path)
        return sorted(removed)

    def iterations_present(self) -> list[int]:
        return sorted(int(p.name[5:]) for p in self.root.glob("iter_*") if p.name[5:].isdigit())
