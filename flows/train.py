"""The `train` flow: N iterations of prepare -> rollout -> reward -> update -> entropy -> evaluate.

Every stage is skipped when the run directory already holds it, complete and up to date with what
it read, so running the flow again on the same run directory resumes at the first unfinished stage.
"""

from __future__ import annotations

import math
import time

from prefect import flow

from aepo_core.config import load_config
from aepo_core.rundir import RunDir
from aepo_core.stages import init_run, is_stage_complete, stages_of
from aepo_core.tracking import Tracker
from tasks import STAGE_TASKS


def summary_line(run: RunDir, iteration: int, seconds: float, skipped: list[str]) -> str:
    """One line per iteration: reward, accuracy, entropy, T, k, (eval), seconds."""

    def m(stage: str, key: str) -> float:
        man = run.manifest(iteration, stage)
        value = man["metrics"].get(key) if man else None
        return float(value) if isinstance(value, int | float) else math.nan

    t = m("rollout", "regulariser_temperature")
    parts = [
        f"iter {iteration:04d}",
        f"reward {m('reward', 'reward_mean'):.3f}",
        f"acc {m('reward', 'accuracy'):.3f}",
        f"H {m('update', 'entropy/nll'):.3f} (exact {m('update', 'entropy/exact'):.3f})",
        f"T {t:.2f}" if math.isfinite(t) else "T -",
        f"k {m('update', 'aepo/k'):.0f}/{m('update', 'aepo/num_positives'):.0f}",
    ]
    if run.manifest(iteration, "evaluate"):
        parts.append(f"eval {m('evaluate', 'accuracy'):.3f}")
    parts.append(f"{seconds:.1f}s")
    if skipped:
        parts.append(f"(done before: {', '.join(skipped)})")
    return " | ".join(parts)


@flow(name="train")
def train(
    config: str | None = None,
    run_dir: str | None = None,
    iterations: int | None = None,
    overrides: list[str] | None = None,
    show_progress: bool = False,
) -> dict:
    """Train (or resume) a run; returns its run directory, MLflow run id and tracking URI."""
    extra = list(overrides or []) + ([f"run.iterations={iterations}"] if iterations else [])
    cfg = load_config(config, extra)
    run = init_run(cfg, run_dir)
    cfg = run.config()
    tracker = Tracker(run, cfg)
    tracker.open()
    print(f"run directory {run.root}  (MLflow run {tracker.run_id} at {tracker.uri})")
    try:
        for i in range(cfg.run.iterations):
            started, skipped = time.perf_counter(), []
            for stage in stages_of(cfg, i):
                if is_stage_complete(run, cfg, i, stage):
                    skipped.append(stage)
                    continue
                STAGE_TASKS[stage](str(run.root), i, show_progress=show_progress)
            tracker.sync(i)
            last = i == cfg.run.iterations - 1
            policy = run.stage_dir(i, "update") / "policy"
            upload = (i + 1) % cfg.tracking.save_every == 0 or last
            if len(skipped) < len(stages_of(cfg, i)) or last:
                tracker.log_checkpoint(i, policy, run.digest(i, "update"), upload=upload)
            print(summary_line(run, i, time.perf_counter() - started, skipped), flush=True)
    except BaseException:
        tracker.finish("FAILED")
        raise
    tracker.finish("FINISHED")
    return {"run_dir": str(run.root.resolve()), "mlflow_run_id": tracker.run_id, "tracking_uri": tracker.uri}
