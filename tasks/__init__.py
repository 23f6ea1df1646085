"""One thin Prefect task per pipeline stage; the work is in `aepo_core.pipeline.stages`."""

from tasks.stages import STAGE_TASKS

__all__ = ["STAGE_TASKS"]
