"""The `train` flow: N iterations of prepare -> rollout -> reward -> update -> entropy -> evaluate.

Every stage is skipped when the run directory already holds it, complete and up to date with what
it read, so running the flow again on the same run directory resumes at the first unfinished stage.
"""

from __future__ import annotations

import math
import time

from prefect import flow
from prefect.artifacts import create_markdown_artifact, create_table_artifact

from aepo_core.config import Config
from aepo_core.core.algorithms import make_algorithm
from aepo_core.io.engines import release_shared_engine
from aepo_core.pipeline.compare import plot_histories, summarise
from aepo_core.pipeline.processes import use_threads
from aepo_core.pipeline.retention import prune
from aepo_core.pipeline.rundir import BASE_ITERATION, RunDir
from aepo_core.pipeline.stages import base_evaluation_pending, open_run, run_iteration
from aepo_core.pipeline.tracking import Tracker, run_history
from tasks import STAGE_TASKS


def duration(seconds: float) -> str:
    """"42s", "3m 05s", "1h 02m"."""
    seconds = max(0, round(seconds))
    if seconds < 60:
        return f"{seconds}s"
    minutes, secs = divmod(seconds, 60)
    if minutes < 60:
        return f"{minutes}m {secs:02d}s"
    hours, minutes = divmod(minutes, 60)
    return f"{hours}h {minutes:02d}m"


def summary_line(
    run: RunDir, iteration: int, seconds: float, skipped: list[str], total: int | None = None, eta: float | None = None
) -> str:
    """One line per iteration: i/N, reward, accuracy, entropy, T, k, (eval), seconds, (ETA: seconds
    left, from this process's mean iteration time)."""

    def m(stage: str, key: str) -> float:
        man = run.manifest(iteration, stage)
        value = man["metrics"].get(key) if man else None
        return float(value) if isinstance(value, int | float) else math.nan

    t = m("rollout", "regulariser_temperature")
    parts = [
        f"iter {iteration:04d}" + (f"/{total:04d}" if total is not None else ""),
        f"reward {m('reward', 'reward_mean'):.3f}",
        f"acc {m('reward', 'accuracy'):.3f}",
        f"H {m('update', 'entropy/nll'):.3f} (exact {m('update', 'entropy/exact'):.3f})",
        f"T {t:.2f}" if math.isfinite(t) else "T -",
        f"k {m('update', 'aepo/k'):.0f}/{m('update', 'aepo/num_positives'):.0f}",
    ]
    if run.manifest(iteration, "evaluate"):
        parts.append(f"eval {m('evaluate', 'accuracy'):.3f}")
    parts.append(f"{seconds:.1f}s" + (f", ETA {duration(eta)}" if eta is not None else ""))
    if skipped:
        parts.append(f"(done before: {', '.join(skipped)})")
    unreached = reachability_of(run, iteration)
    if unreached:  # every iteration while it lasts, not only when it starts
        parts.append(f"WARNING {unreached}")
    return " | ".join(parts)


def reachability_of(run: RunDir, iteration: int) -> str | None:
    """The entropy stage's unreached-target sentence for `iteration` (None: reached, or no stage)."""
    man = run.manifest(iteration, "entropy")
    return man["params"].get("reachability") if man else None


def note_reachability(run: RunDir, iteration: int) -> None:
    """A Prefect markdown artifact when the target becomes unreachable at `iteration` and when it is
    reached again (keyed per run, so the latest version says how things stand). Only inside a flow
    run: called from a plain script it does nothing."""
    from prefect.context import FlowRunContext

    if FlowRunContext.get() is None:
        return
    now = reachability_of(run, iteration)
    before = reachability_of(run, iteration - 1) if iteration > 0 else None
    if bool(now) == bool(before):
        return
    if now:
        md = f"# Entropy target not reached: `{run.root.name}`\n\nIteration {iteration}: **{now}**.\n"
    else:
        md = f"# Entropy target reached again: `{run.root.name}`\n\nIteration {iteration}: the actuator left its clamp.\n"
    create_markdown_artifact(key=artifact_key(run, "reachability"), markdown=md,
                             description=f"entropy target reachability of {run.root}")


def artifact_key(run: RunDir, what: str) -> str:
    """Prefect artifact keys allow lowercase letters, digits and dashes only."""
    slug = "".join(c if c.isalnum() else "-" for c in run.root.name.lower()).strip("-")
    return f"aepo-{slug}-{what}"[:100]


def _rounded(value: float | None) -> float | None:
    return None if value is None or not math.isfinite(value) else round(value, 4)


def report(run: RunDir, cfg: Config, tracker: Tracker) -> dict[str, list[tuple[int, float]]]:
    """End of a run: plots (run directory + MLflow) and Prefect table and markdown artifacts; returns
    the run's history (`run_history`) it read them from."""
    history = run_history(run, cfg.run.iterations)
    a = cfg.algorithm
    algo = make_algorithm(a)
    target = algo.target()
    entropy_key = algo.entropy_metric()  # the reading the target is stated in (algorithm.entropy_rows)
    plots = plot_histories({run.root.name: history}, run.root / "plots", {run.root.name: target},
                           {run.root.name: entropy_key})
    for path in plots:
        tracker.client.log_artifact(tracker.run_id, str(path), "plots")
    columns = {
        "reward": "reward/reward_mean",
        "entropy_nll": "entropy/nll",
        "entropy_exact": "entropy/exact",
        "temperature": "rollout/regulariser_temperature",
        "k": "aepo/k",
        "positives": "aepo/num_positives",
        "eval_accuracy": "eval/accuracy",
        "seconds": "time/iteration_s",
    }
    by_step = {key: dict(points) for key, points in history.items()}
    rows = [
        {"iteration": i, **{col: _rounded(by_step.get(key, {}).get(i)) for col, key in columns.items()}}
        for i in range(cfg.run.iterations)
    ]
    create_table_artifact(key=artifact_key(run, "metrics"), table=rows, description=f"per-iteration metrics of {run.root}")
    s = summarise(history, a.name, target, entropy_key)
    trace = ", ".join(f"{v:.3f}" for _, v in sorted(history.get("entropy/nll", [])))

    def fmt(v):
        return "-" if v is None else f"{v:.3f}"

    md = "\n".join([
        f"# AEPO run `{run.root.name}`",
        "",
        f"- algorithm **{a.name}**" + (f", target entropy **{a.target_entropy}** ({a.entropy_estimator})" if target is not None else ""),
        f"- iterations {cfg.run.iterations}, {cfg.rollout.prompts_per_batch} prompts x {cfg.rollout.n}, lr {cfg.trainer.lr}",
        f"- final held-out accuracy **{fmt(s['final_accuracy'])}** (best {fmt(s['best_accuracy'])}), "
        f"T={cfg.evaluation.temperature}, n={cfg.evaluation.n}",
        f"- entropy trace (nll): {trace}",
        f"- mean abs(H - H*) over the second half: {fmt(s['mean_abs_dev'])}, mean k: {fmt(s['mean_k'])}",
        f"- run directory: `{run.root.resolve()}`",
        f"- MLflow run `{tracker.run_id}` at `{tracker.uri}`",
        "",
        "```yaml",
        cfg.to_yaml().strip(),
        "```",
    ])
    create_markdown_artifact(key=artifact_key(run, "summary"), markdown=md, description=f"summary of {run.root}")
    return history


@flow(name="train")
def train(
    config: str | None = None,
    run_dir: str | None = None,
    iterations: int | None = None,
    overrides: list[str] | None = None,
    show_progress: bool = False,
) -> dict:
    """Train (or resume) a run; returns its run directory, MLflow run id and tracking URI."""
    run = open_run(config, run_dir, iterations, overrides)  # holds the run directory's writer lock
    try:
        return _train(run, show_progress)
    finally:
        run.release_writer()


def end_of_run_lines(run: RunDir, cfg: Config, history: dict[str, list[tuple[int, float]]], seconds: float) -> list[str]:
    """What a finished run says, from its history (`run_history`): held-out accuracy and pass@n of
    its last evaluation, the entropy the controller reads first -> last (and the target), the final
    checkpoint, the plots, the wall time of this process."""
    lines = [f"finished {cfg.run.iterations} iterations in {duration(seconds)} (this process)"]
    if history.get("eval/accuracy"):
        last, accuracy = history["eval/accuracy"][-1]
        n = int(dict(history.get("eval/n", [])).get(last, cfg.evaluation.n))
        passes = dict(history.get(f"eval/pass_at_{n}", []))
        at_n = f", pass@{n} {passes[last]:.3f}" if last in passes else ""
        lines.append(f"held-out at iteration {last}: accuracy (avg@{n}) {accuracy:.3f}{at_n}")
    algo = make_algorithm(cfg.algorithm)
    key = algo.entropy_metric()
    if history.get(key):
        target = algo.target()
        aim = f" (target {target:g})" if target is not None else ""
        lines.append(f"entropy ({key}): {history[key][0][1]:.3f} at the start -> {history[key][-1][1]:.3f} at the end{aim}")
    lines.append(f"final checkpoint: {run.stage_dir(cfg.run.iterations - 1, 'update') / 'policy'}")
    lines.append(f"plots: {run.root / 'plots'}")
    return lines


def evaluate_base(run: RunDir, tracker: Tracker, show_progress: bool) -> None:
    """The starting policy's held-out evaluation, once per run (base/evaluate, the config of the
    run's start; MLflow step -1), said in one line: where every accuracy curve starts."""
    if base_evaluation_pending(run):
        metrics = STAGE_TASKS["evaluate"](str(run.root), BASE_ITERATION, show_progress=show_progress)
        n = int(metrics["n"])
        at_n = f", pass@{n} {metrics[f'pass_at_{n}']:.3f}" if f"pass_at_{n}" in metrics else ""
        print(f"base policy | held-out accuracy (avg@{n}) {metrics['accuracy']:.3f}{at_n}", flush=True)
    tracker.sync(BASE_ITERATION)


def _train(run: RunDir, show_progress: bool) -> dict:
    cfg = run.config()
    use_threads(cfg.run.threads)
    tracker = Tracker(run, cfg)
    tracker.open()
    print(f"run directory {run.root}  (MLflow run {tracker.run_id} at {tracker.uri})")
    run_started, worked = time.perf_counter(), []  # seconds of the iterations this process computed
    try:
        if cfg.run.evaluate_base:
            evaluate_base(run, tracker, show_progress)
        for i in range(cfg.run.iterations):
            started = time.perf_counter()
            ran, skipped = run_iteration(run, i,
                                         lambda stage, it: STAGE_TASKS[stage](str(run.root), it, show_progress=show_progress))
            if "entropy" not in skipped:  # said when the entropy stage decides, not again on a resume
                note_reachability(run, i)
            tracker.sync(i)
            last = i == cfg.run.iterations - 1
            policy = run.stage_dir(i, "update") / "policy"
            upload = (i + 1) % cfg.tracking.save_every == 0 or last
            tracker.log_checkpoint(i, policy, run.digest(i, "update"), upload=upload)
            prune(run, cfg, i)  # after the checkpoint is recorded: retention keeps what MLflow uploads
            seconds = time.perf_counter() - started
            if ran:
                worked.append(seconds)
            left = cfg.run.iterations - 1 - i
            eta = sum(worked) / len(worked) * left if worked and left else None
            print(summary_line(run, i, seconds, skipped, cfg.run.iterations, eta), flush=True)
        history = report(run, cfg, tracker)
        for line in end_of_run_lines(run, cfg, history, time.perf_counter() - run_started):
            print(line, flush=True)
    except BaseException:
        tracker.finish("FAILED")
        raise
    finally:
        release_shared_engine()  # free the rollout engine's memory (vLLM holds a large share)
    tracker.finish("FINISHED")
    return {
        "run_dir": str(run.root.resolve()),
        "mlflow_run_id": tracker.run_id,
        "tracking_uri": tracker.uri,
        "experiment": cfg.tracking.experiment,
    }
