"""Comparing runs: a summary row per run and plots of the key traces on shared axes.

Works on metric histories `{metric name: [(step, value), ...]}`, which come either from MLflow
(`aepo compare`) or straight from a run directory's manifests (the plots a run logs for itself).
"""

from __future__ import annotations

import hashlib
import math
import statistics
import textwrap
from pathlib import Path

from aepo_core.pipeline.rundir import BASE_ITERATION

History = dict[str, list[tuple[int, float]]]

# what is plotted against iteration, one PNG each: file stem -> (metric, y label)
PLOTS = {
    "entropy": ("entropy/nll", "entropy (nats/token; nll unless the run controls exact)"),
    "temperature": ("rollout/regulariser_temperature", "regulariser temperature"),
    "reward": ("reward/reward_mean", "policy-batch reward"),
    "eval_accuracy": ("eval/accuracy", "held-out accuracy"),
    # the embedded task only: entropy among the valid next terms at choice positions (nats)
    "valid_choice_entropy": ("choice/valid_entropy", "entropy among valid choices (nats, synthetic task)"),
}


def _values(history: History, key: str) -> list[float]:
    return [v for _, v in sorted(history.get(key, []))]


def largest_pass_at(history: History) -> int | None:
    """The largest K with an eval/pass_at_K trace (the evaluation's n)."""
    ks = [int(key.rsplit("_", 1)[1]) for key in history if key.startswith("eval/pass_at_") and history[key]]
    return max(ks, default=None)


def temperature_switches(temperatures: list[float]) -> tuple[int, int]:
    """(switches up, switches down) between consecutive iterations' regulariser temperatures."""
    pairs = list(zip(temperatures, temperatures[1:], strict=False))
    return sum(b > a for a, b in pairs), sum(b < a for a, b in pairs)


def entropy_fall(entropy: list[float], window: int = 10) -> float | None:
    """1 - mean of the last `window` iterations' entropy / mean of the first `window` (windows, not
    single iterations: one iteration's entropy is a noisy 16-prompt estimate); None if too short."""
    if len(entropy) < 2 * window:
        return None
    start = statistics.fmean(entropy[:window])
    return 1 - statistics.fmean(entropy[-window:]) / start if start else None


def relative_deviation(entropy: list[float], target: float | None) -> float | None:
    """mean |H - H*| / H* over the second half of the iterations (None without a target or a trace)."""
    half = entropy[len(entropy) // 2 :]
    if not half or not target:
        return None
    return statistics.fmean(abs(h - target) for h in half) / target


def summarise(
    history: History, algorithm: str, target: float | None, entropy_key: str = "entropy/nll",
    t_high: float | None = None, t_low: float | None = None,
) -> dict[str, float | str | None]:
    """One run's summary row.

    The base policy's held-out accuracy (avg@n, when the run measured it: step -1), the final/best
    after an update, and final pass@1 / pass@n; entropy first/last (H in the
    estimator the target is stated in, `entropy_key`) and its relative fall (`entropy_fall`); mean |H - H*| and
    mean |H - H*| / H* over the second half of the iterations, also by each estimator of the same rows
    (`mean_rel_dev_nll`, `mean_rel_dev_exact`); for AEPO the fraction of iterations
    sampled at T_high (when T_high != T_low), the temperature switches up and down, mean k and mean
    positives found; the stages' summed seconds (not wall time).
    """
    base = dict(history.get("eval/accuracy", [])).get(BASE_ITERATION)  # the starting policy's, when measured
    evals = [v for step, v in sorted(history.get("eval/accuracy", [])) if step != BASE_ITERATION]
    entropy = _values(history, entropy_key)
    half = entropy[len(entropy) // 2 :]
    ks = _values(history, "aepo/k")
    temps = [t for t in _values(history, "rollout/regulariser_temperature") if math.isfinite(t)]
    positives = _values(history, "aepo/num_positives")
    big_k = largest_pass_at(history)
    pass_big = _values(history, f"eval/pass_at_{big_k}") if big_k else []
    pass_one = _values(history, "eval/pass_at_1")
    up, down = temperature_switches(temps) if temps else (None, None)
    by_source = {
        key[len("eval/"):-len("/accuracy")]: _values(history, key)[-1]
        for key in sorted(history) if key.startswith("eval/") and key.endswith("/accuracy") and history[key]
        and key.count("/") == 2
    }
    dev = statistics.fmean(abs(h - target) for h in half) if half and target is not None else None
    # the same rows read by both estimators, whichever the controller used: nll is the sampled tokens'
    # -log p (the reference), exact the full distribution's entropy at each position (same expectation
    # on rows sampled at T = 1, about half the per-iteration noise on this task)
    rows_suffix = entropy_key.split("/", 1)[1].removeprefix("nll").removeprefix("exact")
    by_estimator = {est: relative_deviation(_values(history, f"entropy/{est}{rows_suffix}"), target) for est in ("nll", "exact")}
    return {
        "algorithm": algorithm,
        "target": target,
        "iterations": len(entropy),
        "base_accuracy": base,
        "final_accuracy": evals[-1] if evals else None,
        "best_accuracy": max(evals) if evals else None,
        "final_pass_at_1": pass_one[-1] if pass_one else None,
        "pass_k": big_k,
        "final_pass_at_k": pass_big[-1] if pass_big else None,
        "entropy_first": entropy[0] if entropy else None,
        "entropy_last": entropy[-1] if entropy else None,
        "entropy_fall": entropy_fall(entropy),
        # the embedded task's own view (None for user data): exploration among correct answers
        "valid_entropy_fall": entropy_fall(_values(history, "choice/valid_entropy")),
        "valid_prob_last": (_values(history, "choice/valid_prob") or [None])[-1],
        "mean_abs_dev": dev,
        "mean_rel_dev": relative_deviation(entropy, target),
        "mean_rel_dev_nll": by_estimator["nll"],
        "mean_rel_dev_exact": by_estimator["exact"],
        "frac_t_high": (
            statistics.fmean(abs(t - t_high) < 1e-6 for t in temps)
            if temps and t_high is not None and t_low is not None and t_high != t_low else None
        ),
        "switches_up": up,
        "switches_down": down,
        "mean_k": statistics.fmean(ks) if ks else None,
        "mean_positives": statistics.fmean(positives) if positives else None,
        # the stages' own seconds summed (time/iteration_s), not wall time: orchestration, tracking
        # and the base build are outside it
        "stage_s": sum(_values(history, "time/iteration_s")) or None,
        "final_accuracy_by_source": by_source or None,
    }


TABLE = {  # summary key -> column head
    "run": "run", "algorithm": "algorithm", "target": "H*", "iterations": "iters",
    "base_accuracy": "base avg@n", "final_accuracy": "avg@n", "final_pass_at_1": "pass@1", "final_pass_at_k": "pass@n",
    "best_accuracy": "best avg@n", "entropy_first": "H first", "entropy_last": "H last",
    "entropy_fall": "H fall", "valid_entropy_fall": "Hvalid fall", "valid_prob_last": "p(valid)", "mean_rel_dev": "|H-H*|/H*", "mean_rel_dev_nll": "dev nll", "mean_rel_dev_exact": "dev exact", "frac_t_high": "at T_high",
    "switches_up": "T up", "switches_down": "T down", "mean_k": "mean k", "mean_positives": "positives",
    "stage_s": "stage s",
}


def format_table(rows: list[dict], markdown: bool = False) -> str:
    """The summary rows as an aligned text table (or a Markdown table); H fall is 1 - mean(H, last 10
    iterations) / mean(H, first 10); |H-H*|/H* is averaged over the second half."""
    cols, heads = list(TABLE), list(TABLE.values())

    def cell(value) -> str:
        if value is None or (isinstance(value, float) and math.isnan(value)):
            return "-"
        if isinstance(value, float):
            return f"{value:.1f}" if abs(value) >= 100 else f"{value:.3f}"
        return str(value)

    table = [heads] + [[cell(r.get(c)) for c in cols] for r in rows]
    if markdown:
        # a "|" inside a cell (the |H-H*|/H* head) would split it: escaped, one cell per column
        lines = ["| " + " | ".join(v.replace("|", "\\|") for v in line) + " |" for line in table]
        return "\n".join([lines[0], "|" + "---|" * len(cols), *lines[1:]])
    widths = [max(len(line[i]) for line in table) for i in range(len(cols))]
    return "\n".join("  ".join(v.ljust(w) for v, w in zip(line, widths, strict=True)) for line in table)


def format_source_table(rows: list[dict]) -> str | None:
    """Final avg@n per evaluation source (columns) and run (rows) as a Markdown table; None when no
    run has a per-source breakdown."""
    sources = sorted({s for r in rows for s in (r.get("final_accuracy_by_source") or {})})
    if not sources:
        return None
    lines = ["| run | " + " | ".join(sources) + " |", "|" + "---|" * (len(sources) + 1)]
    for r in rows:
        values = r.get("final_accuracy_by_source") or {}
        lines.append(f"| {r['run']} | " + " | ".join(
            f"{values[s]:.3f}" if s in values else "-" for s in sources) + " |")
    return "\n".join(lines)


def _pyplot():
    """matplotlib.pyplot on the file-only Agg backend (no display on servers and workers)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def describe_figure(fig) -> dict:
    """What a figure draws, as plain data (for tests and checks): its suptitle, the titles its edge
    cuts, and, per axes (twin axes included, in creation order), the title, axis labels, y limits,
    legend entries, texts and every line with its label (None for unlabelled lines), style and data.
    A horizontal line (axhline) has a constant y and x = [0, 1] (axes coordinates)."""

    def line(ln) -> dict:
        label = ln.get_label()
        return {
            "label": None if label.startswith("_") else label,
            "linestyle": ln.get_linestyle(),
            "marker": ln.get_marker(),
            "drawstyle": ln.get_drawstyle(),
            "x": [float(v) for v in ln.get_xdata()],
            "y": [float(v) for v in ln.get_ydata()],
        }

    fig.canvas.draw()  # lays the texts out, so their extents are the ones the file shows
    width, height = fig.bbox.width, fig.bbox.height
    titles = ([fig._suptitle] if fig._suptitle is not None else []) + [ax.title for ax in fig.axes]
    cut = []
    for text in titles:
        box = text.get_window_extent()
        if text.get_text() and (box.x0 < -0.5 or box.x1 > width + 0.5 or box.y0 < -0.5 or box.y1 > height + 0.5):
            cut.append(text.get_text())
    return {
        "suptitle": fig.get_suptitle() or None,
        "cut_titles": cut,  # titles that reach past the figure's edge (cut off in the file)
        "axes": [
            {
                "title": ax.get_title(),
                "xlabel": ax.get_xlabel(),
                "ylabel": ax.get_ylabel(),
                "ylim": [float(v) for v in ax.get_ylim()],
                "visible": ax.axison,
                "legend": [t.get_text() for t in ax.get_legend().get_texts()] if ax.get_legend() else [],
                "texts": [t.get_text() for t in ax.texts],
                "lines": [line(ln) for ln in ax.get_lines()],
            }
            for ax in fig.axes
        ],
    }


def _save(fig, out_dir: str | Path, stem: str, figures: dict[str, dict] | None = None) -> Path:
    """Lay out, write `<out_dir>/<stem>.png` and close the figure; with `figures`, also record
    `figures[stem] = describe_figure(fig)`."""
    import matplotlib.pyplot as plt

    fig.tight_layout()
    if figures is not None:
        figures[stem] = describe_figure(fig)
    path = Path(out_dir) / f"{stem}.png"
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def running_mean(values: list[float], window: int) -> list[float]:
    """Mean of each value and up to window - 1 values before it (trailing window)."""
    out = []
    for i in range(len(values)):
        part = values[max(0, i - window + 1) : i + 1]
        out.append(sum(part) / len(part))
    return out


def plot_histories(
    histories: dict[str, History],
    out_dir: str | Path,
    targets: dict[str, float] | None = None,
    entropy_keys: dict[str, str] | None = None,
    smooth: int = 5,
    figures: dict[str, dict] | None = None,
) -> list[Path]:
    """One PNG per trace in PLOTS, every run on the same axes; entropy targets drawn dashed, each run's
    entropy in the estimator its target is stated in (`entropy_keys`, default nll). Per-iteration
    traces are drawn faint with their `smooth`-iteration running mean on top (one iteration's value
    is a noisy estimate from one batch); evaluations are drawn as points, the regulariser
    temperature as the steps the controller took. `figures`, when given,
    receives :func:`describe_figure` of each plot written, keyed by its stem."""
    plt = _pyplot()

    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    last = max((s for h in histories.values() for pts in h.values() for s, _ in pts), default=0)
    written = []
    for stem, (key, label) in PLOTS.items():
        fig, ax = plt.subplots(figsize=(8, 4.5))
        drawn = False
        colors = plt.get_cmap("tab20" if len(histories) > 10 else "tab10")
        for i, (name, history) in enumerate(sorted(histories.items())):
            run_key = (entropy_keys or {}).get(name, key) if stem == "entropy" else key
            points = sorted(history.get(run_key, []))
            if not points:
                continue
            color = colors(i % colors.N)
            steps, values = [s for s, _ in points], [v for _, v in points]
            if key.startswith("eval/"):
                ax.plot(steps, values, "o-", color=color, label=name, lw=1.4, ms=3)
            elif stem == "temperature":
                # a decision held for one iteration (bang-bang's is two-level): drawn as the steps it
                # took, never averaged into values it never had
                ax.step(steps, values, where="post", color=color, label=name, lw=1.2)
            else:
                ax.plot(steps, values, "-", color=color, lw=0.6, alpha=0.25)
                ax.plot(steps, running_mean(values, smooth), "-", color=color, label=name, lw=1.4)
            if stem == "entropy" and targets and targets.get(name) is not None:
                ax.axhline(targets[name], color=color, ls="--", lw=0.8)
            drawn = True
        if not drawn:
            plt.close(fig)
            continue
        first = min(s for h in histories.values() for s, _ in h.get(key, [])) if key.startswith("eval/") else 0
        ax.set_xlim(min(first, 0) - 0.5, last + 0.5)
        ax.set_xlabel("iteration (-1: the base policy)" if first == BASE_ITERATION else "iteration")
        ax.set_ylabel(label)
        if key.startswith("eval/"):  # a fraction: the whole scale, so a change of 0.02 looks like one
            ax.set_ylim(0.0, 1.02)
        ax.grid(alpha=0.3)
        ax.legend(fontsize=7, loc="best")
        if stem == "entropy" and targets:
            ax.set_title(f"entropy per iteration ({smooth}-iteration running mean; faint: raw; "
                         "dashed: each run's target)", fontsize=9)
        written.append(_save(fig, out, stem, figures))
    return written


# what may differ between the runs of one AEPO line in the against-target plot
_LINE_FREE = ("algorithm.target_entropy", "rollout.seed", "trainer.seed", "run.name")


def aepo_variant(params: dict[str, str]) -> str:
    """A digest of a run's settings apart from its target, seed and name: AEPO runs with equal
    variants form one line against the target; ablations (fixed temperature, other K, ...) differ."""
    kept = sorted((k, v) for k, v in params.items() if k not in _LINE_FREE)
    return hashlib.sha256(repr(kept).encode()).hexdigest()[:8]


def split_aepo_line(rows: list[dict]) -> tuple[list[dict], list[dict]]:
    """The AEPO rows with a target and a final accuracy, split into the line (the most common
    `variant`) and the ablations (every other variant)."""
    aepo = [r for r in rows if r["algorithm"] == "aepo" and r.get("target") is not None
            and r.get("final_accuracy") is not None]
    if not aepo:
        return [], []
    variants = [r.get("variant") for r in aepo]
    main = max(set(variants), key=variants.count)
    return [r for r in aepo if r.get("variant") == main], [r for r in aepo if r.get("variant") != main]


def plot_against_target(
    rows: list[dict], out_dir: str | Path, figures: dict[str, dict] | None = None
) -> Path | None:
    """Final avg@n and pass@n of the AEPO runs against their target entropy (mean over seeds, each seed
    a dot), the other algorithms as horizontal lines; None when no AEPO run has both.

    Rows may carry `variant` (see `aepo_variant`): the most common variant is the line, AEPO runs of
    other variants (ablations) are single labelled crosses. `figures`: see :func:`plot_histories`."""
    plt = _pyplot()

    aepo, ablations = split_aepo_line(rows)
    if not aepo:
        return None
    fig, axes = plt.subplots(1, 2, figsize=(10, 4))
    for ax, key, label in ((axes[0], "final_accuracy", "final avg@n"), (axes[1], "final_pass_at_k", "final pass@n")):
        by_target: dict[float, list[float]] = {}
        for r in aepo:
            if r.get(key) is not None:
                by_target.setdefault(r["target"], []).append(r[key])
        xs = sorted(by_target)
        ax.plot(xs, [statistics.fmean(by_target[x]) for x in xs], "o-", color="C0", label="aepo (mean of seeds)")
        ax.plot([x for x in xs for _ in by_target[x]], [v for x in xs for v in by_target[x]], ".", color="C0", alpha=0.5)
        for r in ablations:
            if r.get(key) is not None:
                ax.plot([r["target"]], [r[key]], "x", color="0.3")
                ax.annotate(r["run"], (r["target"], r[key]), fontsize=6, xytext=(3, 3), textcoords="offset points")
        others: dict[str, list[float]] = {}
        for r in rows:
            if r["algorithm"] != "aepo" and r.get(key) is not None:
                others.setdefault(r["algorithm"], []).append(r[key])
        for i, (name, values) in enumerate(sorted(others.items())):
            ax.axhline(statistics.fmean(values), color=f"C{i + 1}", ls="--", lw=1, label=f"{name} (mean)")
        ax.set_xlabel("target entropy H* (nats/token)")
        ax.set_ylabel(label)
        ax.grid(alpha=0.3)
        ax.legend(fontsize=7)
    return _save(fig, out_dir, "against_target", figures)


def plot_controller(
    histories: dict[str, History], out_dir: str | Path, targets: dict[str, float | None],
    entropy_keys: dict[str, str] | None = None, figures: dict[str, dict] | None = None,
) -> Path | None:
    """One panel per run with a regulariser temperature trace: its entropy, its target (dashed) and
    the temperature the controller chose (steps, right axis), to see the switches; None if no run
    has a temperature trace. `figures`: see :func:`plot_histories`."""
    plt = _pyplot()

    key = "rollout/regulariser_temperature"
    names = [n for n in sorted(histories) if any(math.isfinite(v) for _, v in histories[n].get(key, []))]
    if not names:
        return None
    cols = min(3, len(names))
    rows = math.ceil(len(names) / cols)
    fig, axes = plt.subplots(rows, cols, figsize=(4.2 * cols, 2.8 * rows), squeeze=False)
    for ax in axes.flat[len(names):]:
        ax.axis("off")
    for ax, name in zip(axes.flat, names, strict=False):
        entropy = sorted(histories[name].get((entropy_keys or {}).get(name, "entropy/nll"), []))
        ax.plot([s for s, _ in entropy], [v for _, v in entropy], color="C0", lw=1.2)
        if targets.get(name) is not None:
            ax.axhline(targets[name], color="C0", ls="--", lw=0.8)
        ax.set_title(name, fontsize=8)
        ax.set_ylabel("entropy", fontsize=7, color="C0")
        ax.tick_params(labelsize=7)
        temps = sorted((s, v) for s, v in histories[name][key] if math.isfinite(v))
        twin = ax.twinx()
        twin.step([s for s, _ in temps], [v for _, v in temps], where="post", color="C3", lw=0.8, alpha=0.7)
        twin.set_ylabel("T", fontsize=7, color="C3")
        twin.tick_params(labelsize=7)
    # wrapped to the figure's width: one panel is narrower than the sentence
    title = "entropy (blue; dashed: target) and the controller's temperature (red)"
    fig.suptitle(textwrap.fill(title, width=int(4.2 * cols * 13)), fontsize=9)
    return _save(fig, out_dir, "controller", figures)


HISTORY_KEYS = {key for key, _ in PLOTS.values()} | {
    "entropy/exact", "aepo/k", "aepo/num_positives", "time/iteration_s", "eval/pass_at_1",
    # what a controller reads with algorithm.entropy_rows = policy (the default), and the embedded
    # task's probability on valid choices (summarise)
    "entropy/nll_policy_rows", "entropy/exact_policy_rows", "choice/valid_prob",
}


def mlflow_histories(client, runs) -> dict[str, History]:
    """{run id: History} of the traces the summary and plots read (every eval/pass_at_K included)."""
    out: dict[str, History] = {}
    for run in runs:
        keys = HISTORY_KEYS | {
            k for k in run.data.metrics
            if k.startswith("eval/pass_at_") or (k.startswith("eval/") and k.endswith("/accuracy"))
        }
        run_id = run.info.run_id
        out[run_id] = {key: [(m.step, m.value) for m in client.get_metric_history(run_id, key)] for key in keys}
    return out


def select_runs(client, experiment: str | None, run_ids: list[str] | None, filter_string: str | None):
    """Top-level MLflow runs by ids, or by experiment (+ optional filter such as "tags.algorithm = 'aepo'")."""
    from mlflow.exceptions import MlflowException

    if run_ids:
        runs = []
        for run_id in run_ids:
            try:
                runs.append(client.get_run(run_id))
            except MlflowException:
                raise ValueError(f"--run-id {run_id}: no such run in this tracking store") from None
        return runs
    name = experiment or "aepo"
    exp = client.get_experiment_by_name(name)
    if exp is None:
        raise ValueError(f"no MLflow experiment named {name!r} in this tracking store")
    query = "tags.mlflow.parentRunId IS NULL"
    if filter_string:
        query = f"{query} and {filter_string}"
    try:
        return client.search_runs([exp.experiment_id], filter_string=query, order_by=["attributes.start_time ASC"])
    except MlflowException as exc:
        # MLflow's parser message names the offending token; its first line is the useful part
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise ValueError(f"--filter {filter_string!r} is not a valid MLflow filter: {first}") from None


def existing_store(tracking_uri: str) -> str:
    """The tracking URI, checked to name a store that exists when it is a local file or folder (a
    read-only command must not create an empty store where the user mistyped a path).

    Raises:
        ValueError: naming the missing sqlite file or file-store folder.
    """
    if tracking_uri.startswith("sqlite:///"):
        path = Path(tracking_uri[len("sqlite:///"):])
        if not path.is_file():
            raise ValueError(f"no MLflow store at {path} (tracking URI {tracking_uri})")
    elif tracking_uri.startswith("file:"):
        path = Path(tracking_uri.removeprefix("file://").removeprefix("file:"))
        if not path.is_dir():
            raise ValueError(f"no MLflow store at {path} (tracking URI {tracking_uri})")
    return tracking_uri


def compare_runs(tracking_uri: str, out_dir: str | Path, experiment: str | None = None,
                 run_ids: list[str] | None = None, filter_string: str | None = None,
                 figures: dict[str, dict] | None = None) -> tuple[list[dict], list[Path]]:
    """Summary rows and comparison plots for the selected MLflow runs (`figures`: see
    :func:`plot_histories`)."""
    from mlflow.tracking import MlflowClient

    client = MlflowClient(existing_store(tracking_uri))
    runs = select_runs(client, experiment, run_ids, filter_string)
    if not runs:
        raise ValueError("no runs matched")
    histories_by_id = mlflow_histories(client, runs)
    rows, histories, targets, entropy_keys = [], {}, {}, {}
    for r in runs:
        tags = r.data.tags
        target = float(tags["target_entropy"]) if tags.get("target_entropy", "none") != "none" else None
        label = r.info.run_name or r.info.run_id[:8]
        history = histories_by_id[r.info.run_id]
        params = r.data.params
        # the entropy the run's controller read: its policy rows (algorithm.entropy_rows "policy"), or
        # every row (runs logged before the key existed read every row)
        rows_suffix = "_policy_rows" if params.get("algorithm.entropy_rows") == "policy" else ""
        entropy_keys[label] = f"entropy/{tags.get('entropy_estimator', 'nll')}{rows_suffix}"
        # "at T_high" is bang-bang's statistic (the adaptive controller's T is continuous)
        bang_bang = params.get("algorithm.controller", "bang_bang") == "bang_bang"
        t_high, t_low = (float(params[k]) if k in params and bang_bang else None for k in ("algorithm.t_high", "algorithm.t_low"))
        row = {"run": label, "run_id": r.info.run_id, "variant": aepo_variant(params),
               **summarise(history, tags.get("algorithm", "?"), target, entropy_keys[label], t_high, t_low)}
        rows.append(row)
        histories[label] = history
        targets[label] = target
    plots = plot_histories(histories, out_dir, targets, entropy_keys, figures=figures)
    extra = [plot_controller(histories, out_dir, targets, entropy_keys, figures),
             plot_against_target(rows, out_dir, figures)]
    return rows, plots + [p for p in extra if p is not None]
