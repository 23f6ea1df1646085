"""The `rerun-stage` flow: recompute one stage of one iteration from the artifacts before it.

Stages after it that read what changed become stale (their manifests' upstream digests no longer
match); `downstream=True` recomputes exactly those, and the later iterations, right away. Otherwise
the next `aepo run --run-dir …` does.
"""

from __future__ import annotations

from prefect import flow

from aepo_core.pipeline.processes import use_threads
from aepo_core.pipeline.stages import metric_changes, prepare_rerun, stale_stages
from aepo_core.pipeline.tracking import Tracker
from flows.train import train
from tasks import STAGE_TASKS


@flow(name="rerun-stage")
def rerun_stage(
    run_dir: str, iteration: int, stage: str, downstream: bool = False, overrides: list[str] | None = None
) -> dict:
    """Returns whether the stage's output changed and which stages are stale (or were recomputed)."""
    run = prepare_rerun(run_dir, iteration, stage, overrides)  # holds the run directory's writer lock
    try:
        return _rerun(run, iteration, stage, downstream, overrides)
    finally:
        run.release_writer()


def _rerun(run, iteration: int, stage: str, downstream: bool, overrides: list[str] | None) -> dict:
    use_threads(run.config().run.threads)
    before = run.manifest(iteration, stage)
    STAGE_TASKS[stage](str(run.root), iteration)
    changed = before is None or before["digest"] != run.digest(iteration, stage)
    cfg = run.config()
    stale = stale_stages(run)
    print(f"reran {stage} of iteration {iteration}: output {'changed' if changed else 'unchanged'}")
    for line in metric_changes(before["metrics"] if before else None, run.manifest(iteration, stage)["metrics"]):
        print(f"  {line}")
    tracker = Tracker(run, cfg)
    tracker.open()
    if overrides:
        tracker.note_config_history()
    tracker.sync(iteration)  # replaces this iteration's points, no duplicates
    if stale and not downstream:
        print("stale now (the next `aepo run --run-dir` recomputes them):")
        for i, s in stale:
            print(f"  iteration {i:04d} {s}")
    tracker.finish("FINISHED")
    if downstream:
        train(run_dir=str(run.root))
    return {"changed": changed, "stale": [f"{i:04d}/{s}" for i, s in stale], "run_dir": str(run.root)}
