"""MLflow tracking from the run directory: one MLflow run per pipeline run, metrics synced from manifests.

The manifests are the source of truth; MLflow is a view of them. `Tracker.sync(i)` logs iteration i's
metrics (step=i) once: a record in `<run>/mlflow.json` remembers what was logged, so a resumed run
keeps logging to the same MLflow run without duplicate points. When the recorded MLflow run is gone
(a deleted or replaced mlflow.db), `open` rebuilds it from the manifests and records the new run id.
A store locked by another process (sqlite: an open write transaction) is waited on, up to
AEPO_MLFLOW_LOCK_WAIT seconds (default 300), then `TrackingStoreLocked` says which store.
"""

from __future__ import annotations

import contextlib
import fcntl
import hashlib
import json
import math
import os
import time
from pathlib import Path
from typing import Any

from aepo_core.config import Config
from aepo_core.core.algorithms import make_algorithm
from aepo_core.errors import EnvironmentFault
from aepo_core.pipeline.rundir import BASE_ITERATION, RunDir
from aepo_core.pipeline.stages import STAGES

_PREFIX = {"prepare": "prepare/", "rollout": "rollout/", "reward": "reward/", "update": "", "entropy": "controller/", "evaluate": "eval/"}


REACHABILITY_TAG = "aepo.reachability"


def latest_reachability(run: RunDir) -> str | None:
    """The unreached-target sentence of the latest iteration whose entropy stage is done (its
    manifest's params; aepo_core.core.algorithms.reachability_message), or None."""
    for i in reversed(run.iterations_present()):
        manifest = run.manifest(i, "entropy")
        if manifest is not None:
            return manifest["params"].get("reachability")
    return None


class TrackingStoreLocked(EnvironmentFault):
    """The MLflow store stayed locked by another process for longer than we wait."""


def _is_locked(exc: BaseException) -> bool:
    while exc is not None:
        text = str(exc).lower()
        if "database is locked" in text or "database is busy" in text or "database table is locked" in text:
            return True
        exc = exc.__cause__ or exc.__context__
    return False


def lock_wait_seconds() -> float:
    return float(os.environ.get("AEPO_MLFLOW_LOCK_WAIT", "300"))


def tracking_uri(cfg: Config, run: RunDir) -> str:
    """cfg.tracking.mlflow_uri, or an explicit sqlite store next to the run directory."""
    if cfg.tracking.mlflow_uri:
        return cfg.tracking.mlflow_uri
    return f"sqlite:///{(run.root.parent / 'mlflow.db').resolve()}"


def iteration_metrics(run: RunDir, iteration: int) -> dict[str, float]:
    """Every finite numeric metric the stages of `iteration` recorded, with MLflow-safe names
    (rollout/…, reward/…, loss/…, actor/…, entropy/…, aepo/…, controller/…, eval/…). Times, one name
    each: time/<stage>_s is the whole stage (loading, computing, saving: its manifest's seconds),
    time/<stage>_<part>_s its compute part (a `<part>_seconds` metric: time/rollout_generate_s,
    time/reward_verify_s, time/update_step_s, time/evaluate_generate_s), time/iteration_s the sum of
    the stages (not wall time)."""
    out: dict[str, float] = {}
    total = 0.0
    for stage in STAGES:
        manifest = run.manifest(iteration, stage)
        if manifest is None:
            continue
        for key, value in manifest["metrics"].items():
            if isinstance(value, bool) or not isinstance(value, int | float) or not math.isfinite(value):
                continue
            if key.endswith("_seconds"):  # the stage's compute part: beside time/<stage>_s, the whole stage
                name = f"time/{stage}_{key.removesuffix('_seconds')}_s"
            else:
                name = (_PREFIX[stage] + key).replace("@", "_at_").replace("(", "_").replace(")", "_")
            out[name] = float(value)
        out[f"time/{stage}_s"] = float(manifest["seconds"])
        total += float(manifest["seconds"])
    if out:
        out["time/iteration_s"] = total
    return out


class Tracker:
    def __init__(self, run: RunDir, cfg: Config) -> None:
        self.run = run
        self.cfg = cfg
        self.uri = tracking_uri(cfg, run)
        self.run_id: str | None = None
        self._client = None

    @property
    def client(self):
        if self._client is None:
            from mlflow.tracking import MlflowClient

            self._client = _Patient(self._waiting(MlflowClient, tracking_uri=self.uri), self._waiting)
        return self._client

    def _record(self) -> dict[str, Any]:
        return self.run.read_json("mlflow.json") or {}

    def open(self) -> str:
        """Start the MLflow run of this pipeline run, or reopen the one recorded in the run directory
        (rebuilt from the manifests when the store no longer has it)."""
        with self._store_lock():
            return self._open()

    def _waiting(self, fn, *args, **kwargs):
        """Call `fn`, retrying while another process holds the store's lock, for a bounded time."""
        limit = lock_wait_seconds()
        deadline, delay, told = time.monotonic() + limit, 0.5, False
        while True:
            try:
                return fn(*args, **kwargs)
            except Exception as exc:
                if not _is_locked(exc):
                    raise
                if time.monotonic() >= deadline:
                    raise TrackingStoreLocked(
                        f"MLflow store {self.uri} stayed locked by another process for {limit:.0f} s "
                        "(an open sqlite transaction, e.g. a sqlite shell or a stuck writer): end it and run "
                        "the same command again (the run resumes); AEPO_MLFLOW_LOCK_WAIT sets the wait"
                    ) from None
                if not told:
                    print(f"MLflow store {self.uri} is locked by another process: waiting (up to {limit:.0f} s)", flush=True)
                    told = True
                time.sleep(delay)
                delay = min(delay * 2, 5.0)

    @contextlib.contextmanager
    def _store_lock(self):
        """Serialise first use of a shared sqlite store: two runs creating its tables at once (a sweep
        in parallel) make MLflow's schema migration fail."""
        if not self.uri.startswith("sqlite:///"):
            yield
            return
        lock_path = Path(self.uri[len("sqlite:///"):] + ".lock")
        lock_path.parent.mkdir(parents=True, exist_ok=True)
        with open(lock_path, "w") as fh:
            fcntl.flock(fh, fcntl.LOCK_EX)
            try:
                yield
            finally:
                fcntl.flock(fh, fcntl.LOCK_UN)

    def _open(self) -> str:
        rec = self._record()
        if rec.get("tracking_uri") == self.uri and rec.get("run_id"):
            if self._exists(rec["run_id"]):
                self.run_id = rec["run_id"]
                self.client.update_run(self.run_id, status="RUNNING")
                return self.run_id
            return self._recreate(rec)
        return self._create()

    def _exists(self, run_id: str) -> bool:
        from mlflow.exceptions import MlflowException

        try:
            found = self.client.get_run(run_id)
        except MlflowException as exc:
            if exc.error_code == "RESOURCE_DOES_NOT_EXIST" or "not found" in str(exc).lower():
                return False
            raise
        return found.info.lifecycle_stage != "deleted"

    def _recreate(self, rec: dict[str, Any]) -> str:
        """The recorded MLflow run is gone (deleted, or a new mlflow.db): make a new one from the run
        directory (params, every iteration's metrics, checkpoint records) and record its id."""
        old = rec["run_id"]
        print(f"MLflow run {old} is not in {self.uri}: rebuilding it from {self.run.root}", flush=True)
        # the new MLflow run has none of the old one's points or tags
        gone = ("run_id", "synced", "checkpoints", "reachability_tag")
        self.run.write_json("mlflow.json", {k: v for k, v in rec.items() if k not in gone})
        self._create()
        self.client.set_tag(self.run_id, "replaces_run_id", old)
        self.note_config_history()
        for i in self.run.iterations_present():
            if i < self.cfg.run.iterations:
                self.sync(i)
        for i, ckpt in sorted(rec.get("checkpoints", {}).items()):
            self.log_checkpoint(int(i), Path(ckpt["path"]), ckpt["digest"], upload=bool(ckpt.get("uploaded")))
        return self.run_id

    def _create(self) -> str:
        name = self.cfg.tracking.experiment
        exp = self.client.get_experiment_by_name(name)
        if exp is None:
            # Artifacts next to the database, never in the working directory (./mlruns flips MLflow's
            # default store to the refused file store).
            location = (self.run.root.parent / "mlartifacts").resolve().as_uri() if self.uri.startswith("sqlite") else None
            exp_id = self.client.create_experiment(name, artifact_location=location)
        else:
            exp_id = exp.experiment_id
        a = self.cfg.algorithm
        tags = {
            "algorithm": a.name,
            "target_entropy": str(target) if (target := make_algorithm(a).target()) is not None else "none",
            "entropy_estimator": a.entropy_estimator,
            "model": self.cfg.model.path or "embedded-base",
            "run_dir": str(self.run.root.resolve()),
        }
        created = self.client.create_run(exp_id, run_name=self.run.root.name, tags=tags)
        self.run_id = created.info.run_id
        from mlflow.entities import Param

        params = [Param(k, str(v)[:6000]) for k, v in self.cfg.flat().items() if k != "run.iterations"]
        for start in range(0, len(params), 100):
            self.client.log_batch(self.run_id, params=params[start : start + 100])
        self.run.write_json(
            "mlflow.json", {"tracking_uri": self.uri, "run_id": self.run_id, "experiment_id": exp_id, "synced": {}}
        )
        return self.run_id

    def sync(self, iteration: int) -> int:
        """Log iteration `iteration`'s metrics unless already logged; returns how many were logged."""
        from mlflow.entities import Metric

        rec = self._record()
        metrics = iteration_metrics(self.run, iteration)
        signature = hashlib.sha256(json.dumps(metrics, sort_keys=True).encode()).hexdigest()[:16]
        previous = rec["synced"].get(str(iteration))
        if not metrics or previous == signature:
            return 0
        # Replace whatever this step holds: a rerun's old points, or points logged just before a crash
        # that kept them out of the record. A store that cannot delete points is rebuilt instead.
        if not self._forget_points(iteration) and previous is not None:
            return self._rebuild()
        now = int(time.time() * 1000)
        items = [Metric(k, v, now, iteration) for k, v in sorted(metrics.items())]
        for start in range(0, len(items), 1000):
            self.client.log_batch(self.run_id, metrics=items[start : start + 1000])
        self._tag_reachability(rec)
        rec["synced"][str(iteration)] = signature
        self.run.write_json("mlflow.json", rec)
        return len(items)

    def _tag_reachability(self, rec: dict[str, Any]) -> None:
        """Tag ``aepo.reachability`` with the latest entropy stage's unreached-target sentence while
        it lasts, and remove the tag when the target is reached again. ``rec`` remembers the tagged
        value, so an unchanged sentence costs no MLflow call."""
        message = latest_reachability(self.run)
        if message == rec.get("reachability_tag"):
            return
        if message:
            self.client.set_tag(self.run_id, REACHABILITY_TAG, message)
            rec["reachability_tag"] = message
        else:
            self.client.delete_tag(self.run_id, REACHABILITY_TAG)
            rec.pop("reachability_tag", None)

    def _forget_points(self, iteration: int) -> bool:
        """Delete the points logged at step `iteration` (SQL stores: sqlite, postgres …), so that
        re-logging replaces them. Returns False when the store cannot do that (a tracking server)."""
        from mlflow.store.tracking.sqlalchemy_store import SqlAlchemyStore

        store = self.client._tracking_client.store
        if not isinstance(store, SqlAlchemyStore):
            return False
        self._waiting(self._delete_points, store, iteration)
        return True

    def _delete_points(self, store, iteration: int) -> None:
        from mlflow.store.tracking.dbmodels.models import SqlLatestMetric, SqlMetric

        with store.ManagedSessionMaker(read_only=False) as session:
            session.query(SqlMetric).filter(SqlMetric.run_uuid == self.run_id, SqlMetric.step == iteration).delete()
            # a key whose latest point was this step gets its latest value from the re-logged point
            session.query(SqlLatestMetric).filter(
                SqlLatestMetric.run_uuid == self.run_id, SqlLatestMetric.step == iteration
            ).delete()

    def _rebuild(self) -> int:
        """Recreate the MLflow run from the run directory (stores that cannot delete points): the old
        run is deleted (MLflow keeps it in its trash) and the new one is tagged with its id."""
        old = self.run_id
        self.client.delete_run(old)
        rec = self._record()
        self.run.write_json("mlflow.json", {k: v for k, v in rec.items() if k not in ("run_id", "synced", "reachability_tag")})
        self._open()
        self.client.set_tag(self.run_id, "replaces_run_id", old)
        logged = sum(self.sync(int(i)) for i in sorted(rec.get("synced", {}), key=int))
        for i, ckpt in sorted(rec.get("checkpoints", {}).items()):
            self.log_checkpoint(int(i), Path(ckpt["path"]), ckpt["digest"], upload=False)
        return logged

    def note_config_history(self) -> None:
        """Params are immutable in MLflow: record config changes made by reruns as a tag."""
        history = self.run.root / "config_history.jsonl"
        if history.is_file():
            self.client.set_tag(self.run_id, "config_history", history.read_text()[-4000:])

    def log_checkpoint(self, iteration: int, folder: Path, digest: str, upload: bool) -> None:
        """Record the checkpoint's path and digest (always) and upload its files (when `upload` and
        the folder is still there: retention may have pruned it before an MLflow run is rebuilt)."""
        upload = upload and folder.is_dir()
        rec = self._record()
        known = rec.setdefault("checkpoints", {}).get(f"{iteration:04d}", {})
        if known.get("digest") == digest and (known.get("uploaded") or not upload):
            return  # already recorded (and uploaded, if due): a resumed run does not upload it again
        if upload:
            self.client.log_artifacts(self.run_id, str(folder), f"checkpoints/iter_{iteration:04d}")
        rec["checkpoints"][f"{iteration:04d}"] = {"path": str(folder.resolve()), "digest": digest, "uploaded": upload}
        self.client.log_text(self.run_id, json.dumps(rec["checkpoints"], indent=2), "checkpoints.json")
        self.run.write_json("mlflow.json", rec)

    def finish(self, status: str = "FINISHED") -> None:
        if self.run_id is not None:
            self.client.set_terminated(self.run_id, status=status)


class _Patient:
    """An MlflowClient whose calls wait (bounded) while the store is locked by another process."""

    def __init__(self, client, waiting) -> None:
        self._inner, self._wait = client, waiting

    def __getattr__(self, name: str):
        value = getattr(self._inner, name)
        if not callable(value) or name.startswith("_"):
            return value
        return lambda *args, **kwargs: self._wait(value, *args, **kwargs)


def run_history(run: RunDir, iterations: int) -> dict[str, list[tuple[int, float]]]:
    """{metric: [(iteration, value), ...]} straight from the manifests."""
    history: dict[str, list[tuple[int, float]]] = {}
    for i in [BASE_ITERATION, *range(iterations)]:  # -1: the base policy's evaluation, when measured
        for key, value in iteration_metrics(run, i).items():
            history.setdefault(key, []).append((i, value))
    return history
