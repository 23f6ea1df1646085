"""The `sweep` flow: train a grid of runs (arms × seeds) into one runs folder, then compare them.

An arm is a name and a list of overrides on top of one base config, e.g.
`{"grpo": ["algorithm.name=grpo"], "aepo-0.10": ["algorithm.target_entropy=0.1"]}`, or
`{"grpo": {"overrides": [...], "seeds": [0, 1]}}` for its own seeds (see aepo_core/pipeline/sweeps.py); every
arm runs once per seed as run `<arm>-s<seed>`, its own MLflow run in the config's experiment. Runs are
trained one after another; a finished run is skipped and a half-finished one resumes, so rerunning the
sweep continues it. Config files can be swept too (`configs`).
"""

from __future__ import annotations

from pathlib import Path

from prefect import flow

from aepo_core.pipeline.compare import compare_runs, format_table
from aepo_core.pipeline.sweeps import sweep_runs
from flows.train import train


@flow(name="sweep")
def sweep(
    arms: dict | None = None,
    seeds: list[int] | None = None,
    config: str | None = None,
    configs: list[str] | None = None,
    runs_root: str | None = None,
    iterations: int | None = None,
    overrides: list[str] | None = None,
    only: list[str] | None = None,
) -> dict:
    """Returns the runs (run directory, MLflow run id, tracking URI) and the comparison's paths.

    `only` trains just the named arms (e.g. to split one plan over several machines or processes)."""
    shared = list(overrides or []) + ([f"run.runs_root={runs_root}"] if runs_root else [])
    planned = sweep_runs(arms, seeds, shared, only) if arms else []
    results = [train(config=config, iterations=iterations, overrides=list(r.overrides)) for r in planned]
    for path in configs or []:
        results.append(train(config=path, iterations=iterations, overrides=shared))
    if not results:
        raise ValueError("nothing to sweep: give arms or configs")
    out = Path(results[0]["run_dir"]).parent / "comparison"
    rows, plots = compare_runs(results[0]["tracking_uri"], out, run_ids=[r["mlflow_run_id"] for r in results])
    print(format_table(rows))
    return {"runs": results, "comparison": str(out), "plots": [str(p) for p in plots]}
