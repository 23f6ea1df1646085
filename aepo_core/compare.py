"""Comparing runs: a summary row per run and plots of the key traces on shared axes.

Works on metric histories `{metric name: [(step, value), ...]}`, which come either from MLflow
(`aepo compare`) or straight from a run directory's manifests (the plots a run logs for itself).
"""

from __future__ import annotations

import math
import statistics
from pathlib import Path

History = dict[str, list[tuple[int, float]]]

# what is plotted against iteration, one PNG each: file stem -> (metric, y label)
PLOTS = {
    "entropy": ("entropy/nll", "entropy (nats/token; nll unless the run controls exact)"),
    "temperature": ("rollout/regulariser_temperature", "regulariser temperature"),
    "reward": ("reward/reward_mean", "policy-batch reward"),
    "eval_accuracy": ("eval/accuracy", "held-out accuracy"),
}


def _values(history: History, key: str) -> list[float]:
    return [v for _, v in sorted(history.get(key, []))]


def summarise(
    history: History, algorithm: str, target: float | None, entropy_key: str = "entropy/nll"
) -> dict[str, float | str | None]:
    """Final/best eval accuracy, mean |H - H*| over the second half (H in the estimator the target is
    stated in, `entropy_key`), mean k, wall time."""
    evals = _values(history, "eval/accuracy")
    entropy = _values(history, entropy_key)
    half = entropy[len(entropy) // 2 :]
    ks = _values(history, "aepo/k")
    return {
        "algorithm": algorithm,
        "target": target,
        "iterations": len(entropy),
        "final_accuracy": evals[-1] if evals else None,
        "best_accuracy": max(evals) if evals else None,
        "entropy_first": entropy[0] if entropy else None,
        "entropy_last": entropy[-1] if entropy else None,
        "mean_abs_dev": statistics.fmean(abs(h - target) for h in half) if half and target is not None else None,
        "mean_k": statistics.fmean(ks) if ks else None,
        "wall_s": sum(_values(history, "time/iteration_s")) or None,
    }


def format_table(rows: list[dict]) -> str:
    cols = ["run", "algorithm", "target", "iterations", "final_accuracy", "best_accuracy", "entropy_first",
            "entropy_last", "mean_abs_dev", "mean_k", "wall_s"]
    heads = ["run", "algorithm", "H*", "iters", "final acc", "best acc", "H first", "H last", "mean|H-H*|",
             "mean k", "wall s"]

    def cell(value) -> str:
        if value is None or (isinstance(value, float) and math.isnan(value)):
            return "-"
        if isinstance(value, float):
            return f"{value:.1f}" if abs(value) >= 100 else f"{value:.3f}"
        return str(value)

    table = [heads] + [[cell(r.get(c)) for c in cols] for r in rows]
    widths = [max(len(line[i]) for line in table) for i in range(len(cols))]
    return "\n".join("  ".join(v.ljust(w) for v, w in zip(line, widths, strict=True)) for line in table)


def plot_histories(
    histories: dict[str, History],
    out_dir: str | Path,
    targets: dict[str, float] | None = None,
    entropy_keys: dict[str, str] | None = None,
) -> list[Path]:
    """One PNG per trace in PLOTS, every run on the same axes; entropy targets drawn dashed, each run's
    entropy in the estimator its target is stated in (`entropy_keys`, default nll)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    last = max((s for h in histories.values() for pts in h.values() for s, _ in pts), default=0)
    written = []
    for stem, (key, label) in PLOTS.items():
        fig, ax = plt.subplots(figsize=(7, 4))
        drawn = False
        for i, (name, history) in enumerate(sorted(histories.items())):
            run_key = (entropy_keys or {}).get(name, key) if stem == "entropy" else key
            points = sorted(history.get(run_key, []))
            if not points:
                continue
            color = f"C{i % 10}"
            style = "o-" if key.startswith("eval/") else "-"
            ax.plot([s for s, _ in points], [v for _, v in points], style, color=color, label=name, lw=1.4, ms=3)
            if stem == "entropy" and targets and targets.get(name) is not None:
                ax.axhline(targets[name], color=color, ls="--", lw=0.8)
            drawn = True
        if not drawn:
            plt.close(fig)
            continue
        ax.set_xlim(-0.5, last + 0.5)
        ax.set_xlabel("iteration")
        ax.set_ylabel(label)
        ax.grid(alpha=0.3)
        ax.legend(fontsize=7, loc="best")
        if stem == "entropy" and targets:
            ax.set_title("entropy per iteration (dashed: each run's target)", fontsize=9)
        fig.tight_layout()
        path = out / f"{stem}.png"
        fig.savefig(path, dpi=110)
        plt.close(fig)
        written.append(path)
    return written


def mlflow_histories(client, run_ids: list[str]) -> dict[str, History]:
    keys = {key for key, _ in PLOTS.values()} | {"entropy/exact", "aepo/k", "time/iteration_s"}
    out: dict[str, History] = {}
    for run_id in run_ids:
        out[run_id] = {
            key: [(m.step, m.value) for m in client.get_metric_history(run_id, key)] for key in keys
        }
    return out


def select_runs(client, experiment: str | None, run_ids: list[str] | None, filter_string: str | None):
    """Top-level MLflow runs by ids, or by experiment (+ optional filter such as "tags.algorithm = 'aepo'")."""
    if run_ids:
        return [client.get_run(r) for r in run_ids]
    name = experiment or "aepo"
    exp = client.get_experiment_by_name(name)
    if exp is None:
        raise ValueError(f"no MLflow experiment named {name!r} in this tracking store")
    query = "tags.mlflow.parentRunId IS NULL"
    if filter_string:
        query = f"{query} and {filter_string}"
    return client.search_runs([exp.experiment_id], filter_string=query, order_by=["attributes.start_time ASC"])


def compare_runs(tracking_uri: str, out_dir: str | Path, experiment: str | None = None,
                 run_ids: list[str] | None = None, filter_string: str | None = None) -> tuple[list[dict], list[Path]]:
    """Summary rows and comparison plots for the selected MLflow runs."""
    from mlflow.tracking import MlflowClient

    client = MlflowClient(tracking_uri)
    runs = select_runs(client, experiment, run_ids, filter_string)
    if not runs:
        raise ValueError("no runs matched")
    histories_by_id = mlflow_histories(client, [r.info.run_id for r in runs])
    rows, histories, targets, entropy_keys = [], {}, {}, {}
    for r in runs:
        tags = r.data.tags
        target = float(tags["target_entropy"]) if tags.get("target_entropy", "none") != "none" else None
        label = r.info.run_name or r.info.run_id[:8]
        history = histories_by_id[r.info.run_id]
        entropy_keys[label] = f"entropy/{tags.get('entropy_estimator', 'nll')}"
        row = {"run": label, "run_id": r.info.run_id,
               **summarise(history, tags.get("algorithm", "?"), target, entropy_keys[label])}
        rows.append(row)
        histories[label] = history
        targets[label] = target
    return rows, plot_histories(histories, out_dir, targets, entropy_keys)
