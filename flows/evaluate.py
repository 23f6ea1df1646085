"""The `evaluate` flow: held-out evaluation of a checkpoint folder or of a run directory's policy."""

from __future__ import annotations

import json
import time
from pathlib import Path

from prefect import flow
from prefect.artifacts import create_markdown_artifact

from aepo_core.config import load_config
from aepo_core.pipeline.evaluation import write_evaluation
from aepo_core.pipeline.processes import use_threads
from aepo_core.pipeline.rundir import RunDir
from aepo_core.pipeline.stages import require_unpruned


def _latest_policy(run: RunDir) -> tuple[Path, int]:
    for i in reversed(run.iterations_present()):
        if run.manifest(i, "update") is not None:
            return run.stage_dir(i, "update") / "policy", i
    raise FileNotFoundError(f"{run.root} holds no finished update stage, so no policy to evaluate")


@flow(name="evaluate")
def evaluate(
    model_path: str | None = None,
    run_dir: str | None = None,
    iteration: int | None = None,
    config: str | None = None,
    overrides: list[str] | None = None,
    output: str | None = None,
) -> dict:
    """Evaluate `model_path`, or the policy of `run_dir` after `iteration` (default: its latest),
    with the run's config (or `config`) and `overrides`. Writes eval.parquet + metrics.json."""
    if run_dir:
        run = RunDir(run_dir)
        cfg = load_config(config or run.config_path, overrides or [])
        if iteration is None:
            path, iteration = _latest_policy(run)
        else:
            path = run.stage_dir(iteration, "update") / "policy"
            require_unpruned(run, iteration, "evaluate")  # retention deleted it: say so, not "no such model"
        default_out = run.root / "evaluations" / f"iter_{iteration:04d}-{time.strftime('%Y%m%d-%H%M%S')}"
    elif model_path:
        cfg = load_config(config, overrides or [])
        path = Path(model_path)
        default_out = Path("evaluations") / f"{path.name}-{time.strftime('%Y%m%d-%H%M%S')}"
    else:
        raise ValueError("give model_path or run_dir")
    use_threads(cfg.run.threads)
    out = Path(output) if output else default_out
    metrics = write_evaluation(cfg, path, out)
    create_markdown_artifact(
        key="aepo-evaluation",
        markdown=f"# Evaluation of `{path}`\n\n```json\n{json.dumps(metrics, indent=2)}\n```\n\nfiles: `{out}`",
    )
    return {"model": str(path), "output": str(out), "metrics": metrics}
