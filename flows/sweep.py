"""The `sweep` flow: train several configurations, one after another, into one runs folder.

Each configuration is its own run (and MLflow run); finished runs are skipped, half-finished ones
resume. Compare the results with `aepo compare`.
"""

from __future__ import annotations

from prefect import flow

from flows.train import train


@flow(name="sweep")
def sweep(
    configs: list[str],
    runs_root: str | None = None,
    iterations: int | None = None,
    overrides: list[str] | None = None,
) -> list[dict]:
    """Train each config file in `configs` with the shared `overrides` (and runs_root)."""
    shared = list(overrides or []) + ([f"run.runs_root={runs_root}"] if runs_root else [])
    return [train(config=path, iterations=iterations, overrides=shared) for path in configs]
