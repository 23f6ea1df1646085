"""The `aepo` command line. Every command takes `--config FILE` and dotted overrides (`rollout.n=4`)."""

from __future__ import annotations

import json
import logging
import os
import sys
from pathlib import Path
from typing import Annotated, Any

import typer

from aepo_core.config import Config, load_config
from aepo_core.errors import debug_requested, exit_status, is_user_error


class _UserErrorFilter(logging.Filter):
    """Drops Prefect's log record of a user error raised in a flow or task (a traceback of ~150
    lines): the command prints the one line that matters."""

    def filter(self, record: logging.LogRecord) -> bool:
        return not (record.exc_info and record.exc_info[1] is not None and is_user_error(record.exc_info[1]))


class _App(typer.Typer):
    """The typer app, with one handler for the user's mistakes: `error: <message>`, exit status 2,
    no traceback unless asked for (`aepo --debug ...` or AEPO_DEBUG=1)."""

    def __call__(self, *args: Any, **kwargs: Any) -> Any:
        given = args[0] if args else kwargs.pop("args", None)
        args = args[1:]
        argv = list(sys.argv[1:] if given is None else given)
        if "--debug" in argv[1:]:  # accepted after the command too: `aepo run --debug`
            argv = [argv[0]] + [a for a in argv[1:] if a != "--debug"]
            os.environ["AEPO_DEBUG"] = "1"
        if argv and argv[0] == "--debug":
            os.environ["AEPO_DEBUG"] = "1"
        if not debug_requested():
            quiet = _UserErrorFilter()
            for name in ("prefect.flow_runs", "prefect.task_runs"):
                logging.getLogger(name).addFilter(quiet)
        try:
            return super().__call__(*args, args=argv, **kwargs)
        except Exception as exc:
            status = exit_status(exc)
            if status is None or debug_requested():
                raise
            typer.secho(f"error: {exc}", fg=typer.colors.RED, err=True)
            sys.exit(status)


app = _App(
    add_completion=False,
    no_args_is_help=True,
    rich_markup_mode=None,  # click's plain help: the rich one labels every flag (and --help) "<bool>"
    help="AEPO: reinforcement fine-tuning that holds the policy's entropy at a target.",
)


@app.callback()
def _options(
    debug: Annotated[bool, typer.Option("--debug", help="Show the traceback of an error (also AEPO_DEBUG=1).")] = False,
) -> None:
    """AEPO: reinforcement fine-tuning that holds the policy's entropy at a target.

    A mistake in the config, the data or a path is reported as one `error:` line (exit status 2)."""
    if debug:
        os.environ["AEPO_DEBUG"] = "1"

ConfigOpt = Annotated[Path | None, typer.Option("--config", "-c", help="YAML config file.")]
Overrides = Annotated[
    list[str] | None, typer.Argument(help="Dotted overrides, e.g. algorithm.target_entropy=0.3 rollout.n=8.")
]


def _config(config: Path | None, overrides: list[str] | None) -> Config:
    return load_config(config, overrides or [])  # a ConfigError is reported by the app's handler


@app.command("config")
def show_config(config: ConfigOpt = None, overrides: Overrides = None) -> None:
    """Print the resolved configuration (defaults < file < overrides) as YAML."""
    typer.echo(_config(config, overrides).to_yaml(), nl=False)


@app.command("build-base")
def build_base(
    config: ConfigOpt = None,
    overrides: Overrides = None,
    force: Annotated[bool, typer.Option(help="Rebuild even if a cached copy exists.")] = False,
) -> None:
    """Build (or find in the cache) the embedded base policy: tokenizer + tiny Qwen2 after warm-up."""
    from aepo_core.task.base_policy import ensure_base_policy

    cfg = _config(config, overrides)
    folder = ensure_base_policy(cfg.data.synthetic, cfg.model.cache_dir, force=force, log=typer.echo)
    info = json.loads((folder / "aepo_base.json").read_text())
    typer.echo(f"base policy: {folder}")
    typer.echo(f"  parameters {info['parameters']:,}, build {info['build_seconds']} s, final loss {info['final_loss']:.3f}")


@app.command("evaluate")
def evaluate_cmd(
    config: ConfigOpt = None,
    overrides: Overrides = None,
    model: Annotated[Path | None, typer.Option(help="HF model folder (default: model.path or the base policy).")] = None,
    output: Annotated[Path | None, typer.Option(help="Write eval.parquet and metrics.json into this folder.")] = None,
) -> None:
    """Evaluate a policy on the held-out split: accuracy (avg@n), pass@k, entropy, at stated settings."""
    from aepo_core.errors import UserError
    from aepo_core.pipeline.evaluation import evaluate_model, write_evaluation
    from aepo_core.pipeline.preflight import resolve_base

    cfg = _config(config, overrides)
    if model is not None and not (model / "config.json").is_file():
        raise UserError(f"--model {model} is not an HF model folder (no config.json)")
    path = model or resolve_base(cfg, log=typer.echo)
    metrics = write_evaluation(cfg, path, output) if output else evaluate_model(cfg, path)[1]
    typer.echo(f"model: {path}")
    typer.echo(
        f"held-out accuracy {metrics['accuracy']:.3f} (avg@{int(metrics['n'])}, T={metrics['temperature']}, "
        f"top_p={metrics['top_p']}, {int(metrics['num_prompts'])} prompts, max {int(metrics['max_new_tokens'])} tokens)"
    )
    passes = "  ".join(f"{k} {v:.3f}" for k, v in metrics.items() if k.startswith("pass_at_"))
    typer.echo(f"  {passes}")
    typer.echo(
        f"  entropy (sampled-token NLL) {metrics['entropy_nll']:.3f} nats/token, "
        f"{metrics['response_tokens_mean']:.1f} tokens/response, {metrics['tokens_per_s']:.0f} tokens/s"
    )
    if output:
        typer.echo(f"wrote {output}/eval.parquet and metrics.json")


@app.command("entropy-push")
def entropy_push_cmd(
    config: ConfigOpt = None,
    overrides: Overrides = None,
    run_dir: Annotated[Path | None, typer.Option(help="A run directory: measure the policy --iteration starts from.")] = None,
    iteration: Annotated[int | None, typer.Option(help="With --run-dir: the iteration (0: the run's base policy).")] = None,
    model: Annotated[Path | None, typer.Option(help="HF model folder (default: model.path or the base policy).")] = None,
    prompts: Annotated[int, typer.Option(help="Prompts per part and repeat.")] = 16,
    n: Annotated[int | None, typer.Option(help="Responses per prompt (default: rollout.n).")] = None,
    probe: Annotated[int, typer.Option(help="Probe responses (T = 1) per repeat.")] = 64,
    repeats: Annotated[int, typer.Option(help="Independent repeats (fresh samples and probe each).")] = 4,
    temperatures: Annotated[str, typer.Option(help="Regulariser temperatures, comma-separated.")] = "0.8,1.0,1.2,1.5,2.0",
    seed: Annotated[int, typer.Option(help="Seed of the prompt draws and the sampling.")] = 0,
    micro_batch_size: Annotated[int | None, typer.Option(help="Rows per forward pass (default: trainer.micro_batch_size).")] = None,
    out: Annotated[Path | None, typer.Option(help="Write entropy_push.json and entropy_push.md into this folder.")] = None,
) -> None:
    """First-order entropy change of one step of each part of the update (GRPO, AEPO's REINFORCE at
    several temperatures), with standard errors over repeats."""
    from transformers.utils import logging as hf_logging

    from aepo_core.errors import UserError
    from aepo_core.pipeline.diagnostics import PushSettings, entropy_push, format_report

    hf_logging.disable_progress_bar()  # "Loading weights" bars between the progress lines
    try:
        temps = tuple(float(t) for t in temperatures.split(",") if t.strip())
    except ValueError:
        raise UserError(f"--temperatures {temperatures!r}: give numbers separated by commas, e.g. 0.8,1.2") from None
    settings = PushSettings(prompts=prompts, n=n, probe=probe, repeats=repeats, temperatures=temps, seed=seed,
                            micro_batch_size=micro_batch_size)
    report = entropy_push(config, list(overrides or []), run_dir, iteration, model, settings, out,
                          log=lambda line: typer.echo(line, err=True))
    typer.echo(format_report(report))
    if out:
        typer.echo(f"wrote {out}/entropy_push.json and entropy_push.md")


def _quiet_prefect() -> None:
    """Offline-friendly Prefect defaults for interactive use (a user's own settings win)."""
    import os

    os.environ.setdefault("PREFECT_SERVER_ANALYTICS_ENABLED", "false")
    os.environ.setdefault("DO_NOT_TRACK", "1")
    os.environ.setdefault("PREFECT_LOGGING_LEVEL", "WARNING")
    # the temporary server's default 20 s start-up limit was missed on a busy 2-core machine when two
    # runs started at once
    os.environ.setdefault("PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS", "120")
    import logging

    # Prefect's event worker logs "Still processing items" while it drains at exit on a busy machine:
    # progress noise after the run's own last line (an error line included)
    logging.getLogger("EventsWorker").setLevel(logging.ERROR)
    from transformers.utils import logging as hf_logging

    hf_logging.disable_progress_bar()  # per-stage "Loading weights" bars drown the iteration lines
    from aepo_core.pipeline.processes import start_prefect_server

    start_prefect_server()  # Prefect's temporary server, ended by a watchdog if this process is killed


def _refuse_if_busy(run_dir: Path | str) -> None:
    """One line, before Prefect starts, when another process is writing the run directory."""
    from aepo_core.pipeline.rundir import RunDir

    holder = RunDir(run_dir).writer_holder()
    if holder:
        typer.secho(f"{run_dir} is in use by {holder}: wait for it to finish or stop it", fg=typer.colors.RED, err=True)
        raise typer.Exit(2)


@app.command("run")
def run_cmd(
    config: ConfigOpt = None,
    overrides: Overrides = None,
    run_dir: Annotated[Path | None, typer.Option(
        help="Run directory (default: <run.runs_root>/<run.name>, or runs/<algorithm and target>-<config digest>, "
             "e.g. runs/aepo-h0.15-1a2b3c4d).")] = None,
    iterations: Annotated[int | None, typer.Option(help="Number of iterations (run.iterations).")] = None,
    progress: Annotated[bool, typer.Option(help="Progress bars on rollout and update.")] = True,
) -> None:
    """Train with AEPO (or a baseline) as a Prefect flow; resumes an existing run directory."""
    cfg = _config(config, overrides)  # fail fast on a bad config, before Prefect starts
    from aepo_core.pipeline.stages import run_root

    _refuse_if_busy(run_root(cfg, run_dir))
    _quiet_prefect()
    from aepo_core.pipeline.stages import check_start
    from flows.train import train

    extra = list(overrides or [])
    # the user's mistakes (config, data, paths, a run directory of another config) are refused here,
    # before the flow starts and before anything is written
    check_start(config, run_dir, iterations, extra, log=lambda line: typer.echo(line, err=True))
    result = train(
        config=str(config) if config else None,
        run_dir=str(run_dir) if run_dir else None,
        iterations=iterations,
        overrides=extra,
        show_progress=progress,
    )
    uri = result["tracking_uri"]
    from aepo_core.atomic import bytes_under, human_bytes

    typer.echo(f"run directory: {result['run_dir']} ({human_bytes(bytes_under(Path(result['run_dir'])))} on disk)")
    typer.echo(f"MLflow: run {result['mlflow_run_id']} in {uri} (experiment '{result['experiment']}')")
    if uri.startswith("sqlite:///"):
        typer.echo(f"open the MLflow UI:  mlflow ui --backend-store-uri {uri} --host 127.0.0.1 --port 5000")


@app.command("rerun-stage")
def rerun_stage_cmd(
    run_dir: Annotated[Path, typer.Option(help="The run directory.")],
    iteration: Annotated[int, typer.Option(help="Iteration whose stage to recompute.")],
    stage: Annotated[str, typer.Option(help="prepare, rollout, reward, update, entropy or evaluate.")],
    overrides: Overrides = None,
    downstream: Annotated[bool, typer.Option(help="Also recompute the stages this makes stale, now.")] = False,
) -> None:
    """Recompute one stage from the artifacts before it (overrides change the run's config first)."""
    from aepo_core.config import ConfigError
    from aepo_core.pipeline.rundir import RunDirBusy, StageNotReady
    from aepo_core.pipeline.stages import prepare_rerun

    try:  # refuse a bad request here, with a one-line message; errors while it runs keep their traceback
        prepare_rerun(run_dir, iteration, stage, list(overrides or []), apply=False)
    except (StageNotReady, ConfigError, ValueError, RunDirBusy) as exc:
        typer.secho(f"cannot rerun: {exc}", fg=typer.colors.RED, err=True)
        raise typer.Exit(2) from None
    _quiet_prefect()
    from flows.rerun import rerun_stage

    rerun_stage(str(run_dir), iteration, stage, downstream=downstream, overrides=list(overrides or []))


@app.command("sweep")
def sweep_cmd(
    plan: Annotated[Path, typer.Option(help="YAML plan: `arms`, optional `seeds` and `overrides` (aepo_core/pipeline/sweeps.py).")],
    config: ConfigOpt = None,
    overrides: Overrides = None,
    iterations: Annotated[int | None, typer.Option(help="Iterations per run.")] = None,
    arm: Annotated[list[str] | None, typer.Option("--arm", help="Train only this arm (repeatable).")] = None,
) -> None:
    """Train a grid of runs (arms x seeds) one after another, then compare them (table + plots)."""
    from aepo_core.pipeline.sweeps import PlanError, read_plan, sweep_runs

    try:
        spec = read_plan(plan)
        shared = spec["overrides"] + list(overrides or [])
        runs = sweep_runs(spec["arms"], spec["seeds"], shared, arm, where=str(plan))
    except PlanError as exc:
        typer.secho(str(exc), fg=typer.colors.RED, err=True)
        raise typer.Exit(2) from None
    for run in runs:  # fail fast on a bad arm, before anything trains
        _config(config, list(run.overrides))
    _quiet_prefect()
    from flows.sweep import sweep

    result = sweep(arms=spec["arms"], seeds=spec["seeds"], config=str(config) if config else None,
                   iterations=iterations, overrides=shared, only=arm)
    for path in result["plots"]:
        typer.echo(f"plot: {path}")


@app.command("compare")
def compare_cmd(
    tracking_uri: Annotated[str, typer.Option(help="MLflow tracking URI.")] = "sqlite:///runs/mlflow.db",
    experiment: Annotated[str | None, typer.Option(help="Experiment name (default: aepo).")] = None,
    run_id: Annotated[list[str] | None, typer.Option("--run-id", help="Run ids to compare (repeatable).")] = None,
    filter: Annotated[str | None, typer.Option(help="MLflow filter, e.g. \"tags.algorithm = 'aepo'\".")] = None,
    out: Annotated[Path | None, typer.Option(
        help="Folder for the table and plots (default: comparison/ beside a sqlite store, else ./comparison).")] = None,
) -> None:
    """Compare MLflow runs: a summary table and entropy/temperature/reward/accuracy plots."""
    from aepo_core.pipeline.compare import compare_runs, format_source_table, format_table

    if tracking_uri.startswith("sqlite:///") and not tracking_uri.startswith("sqlite:////"):
        tracking_uri = f"sqlite:///{Path(tracking_uri[len('sqlite:///'):]).resolve()}"
    if out is None:  # beside the runs it compares, not wherever the command happens to be typed
        store = Path(tracking_uri[len("sqlite:///"):]) if tracking_uri.startswith("sqlite:///") else None
        out = store.parent / "comparison" if store is not None else Path("comparison")
    try:
        rows, plots = compare_runs(tracking_uri, out, experiment, run_id, filter)
    except ValueError as exc:
        typer.secho(str(exc), fg=typer.colors.RED, err=True)
        raise typer.Exit(2) from None
    typer.echo(format_table(rows))
    (out / "summary.json").write_text(json.dumps(rows, indent=2))
    by_source = format_source_table(rows)
    (out / "summary.md").write_text(
        format_table(rows, markdown=True) + "\n" + (f"\nFinal avg@n by source:\n\n{by_source}\n" if by_source else "")
    )
    for path in plots:
        typer.echo(f"plot: {path}")
    typer.echo(f"table: {out / 'summary.json'}")


def main() -> None:  # pragma: no cover - console entry point
    app()


if __name__ == "__main__":  # pragma: no cover
    main()
