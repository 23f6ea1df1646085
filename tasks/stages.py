"""Prefect tasks over the stage functions: paths and small dicts in, metrics out.

Task caching is off on purpose: whether a stage is done is decided by its manifest in the run
directory (digests of what it read), which Prefect's input-hash caching knows nothing about.
"""

from __future__ import annotations

from prefect import task
from prefect.cache_policies import NO_CACHE

from aepo_core.pipeline import stages
from aepo_core.pipeline.rundir import RunDir


def _stage_task(stage: stages.Stage):
    @task(name=stage.name, cache_policy=NO_CACHE, task_run_name=f"{stage.name}-iter-{{iteration:04d}}", retries=0)
    def run_stage(run_dir: str, iteration: int, show_progress: bool = False) -> dict:
        return stage(RunDir(run_dir), iteration, show_progress=show_progress)

    run_stage.__doc__ = stage.run.__doc__
    return run_stage


STAGE_TASKS = {name: _stage_task(stage) for name, stage in stages.PIPELINE.items()}
