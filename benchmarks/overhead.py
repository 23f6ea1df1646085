"""Orchestration overhead of the `train` flow: how much of an iteration's wall time is not stage compute.

Each mode trains a fresh run of the embedded default (AEPO, --prompts x rollout.n responses) in a
temporary folder, in its own process, for --iterations iterations:

    server      the real `aepo run` (flows/train.py) against a `prefect server start` on 127.0.0.1
                (started first, with a temporary PREFECT_HOME; its start-up is reported apart)
    ephemeral   the real `aepo run` with no PREFECT_API_URL: Prefect starts a temporary server
                (fresh temporary PREFECT_HOME)
    reference   the floor: the same stage functions (aepo_core/pipeline/stages.py) called in a plain loop,
                no Prefect, no MLflow, no skip checks

Every iteration's wall time is split into three layers, each reported as a share of it:

    compute        time inside the stages doing the work, from what the stages record in their
                   manifests: rollout's generate_seconds (sampling), update's step_seconds (the
                   update step), reward's verify_seconds (the verifier) and evaluate's
                   generate_seconds (when evaluation is included). prepare and entropy count as no
                   compute.
    stage I/O      sum of the stages' manifest "seconds" - compute: config and Parquet reads, model and
                   optimiser load/save, engine weight reload, digests, manifests.
    orchestration  iteration wall time - sum of the manifest seconds: Prefect task runs, the flow's
                   skip checks (manifest reads, dataset digest), MLflow metric sync, checkpoint
                   logging (and its upload every tracking.save_every iterations), the summary line.

Iteration wall time is the period between the flow's consecutive per-iteration summary lines, as the
lines arrive on the child's stdout (ms resolution; the flow's own printed "N.Ns" is kept in the JSON
as a cross-check). Iteration 0 (base-model load, warm-up) is left out of the statistics. The shares
are sums over the measured iterations (so periodic costs such as the checkpoint upload are averaged
in); the table also gives the median iteration wall time and its ratio to the reference mode.
Start-up (process start to the first iteration's start: imports, Prefect flow run and temporary server,
run directory, MLflow run) and teardown (after the last iteration: plots, Prefect artifacts, MLflow
finish, shutdown) are reported apart and are not in the shares.

Evaluation is excluded by default: evaluation.every is set above the iterations, and the evaluation
that the flow always runs at the last iteration (made cheap: evaluation.num_prompts=1, evaluation.n=1)
has its manifest seconds taken out of that iteration's wall time (its Prefect task run and skip check
stay in, a few tens of ms; "printed_s" in the JSON is the flow's own number, evaluation included). --include-eval keeps the
configured schedule and counts evaluation like any stage. With --repeats the modes alternate (their
order rotates each repeat) and the statistics pool all repeats.

    python benchmarks/overhead.py [--prompts 32] [--iterations 6] [--repeats 1] [--threads N]
        [--modes server,ephemeral,reference] [--include-eval] [--out FILE] [overrides ...]

e.g. a tiny smoke test: python benchmarks/overhead.py --prompts 4 --iterations 3 --threads 1
    rollout.n=2 rollout.max_new_tokens=16 --out /tmp/overhead.json
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import platform
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import time
import urllib.request
from importlib import metadata
from pathlib import Path

from aepo_core.pipeline.rundir import MANIFEST
from aepo_core.pipeline.stages import STAGES

MODES = ("server", "ephemeral", "reference")


# ------------------------------------------------------------------------------ child processes
def child_env(threads: int | None, prefect_home: Path | None = None, api_url: str | None = None) -> dict[str, str]:
    """The environment of a measured process: none of the caller's Prefect settings, offline-friendly
    Prefect defaults, unbuffered stdout (line timestamps), the requested thread count."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("PREFECT_")}
    env.update(PYTHONUNBUFFERED="1", PREFECT_SERVER_ANALYTICS_ENABLED="false", DO_NOT_TRACK="1")
    if prefect_home is not None:
        env["PREFECT_HOME"] = str(prefect_home)
    if api_url:
        env["PREFECT_API_URL"] = api_url
    else:
        env["PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS"] = "120"
    if threads:
        env.update(OMP_NUM_THREADS=str(threads), MKL_NUM_THREADS=str(threads))
    return env


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _stop(proc: subprocess.Popen, grace: float = 20.0) -> None:
    """SIGINT to the process group we started (the server's uvicorn child included), then SIGKILL."""
    if proc.poll() is not None:
        return
    with contextlib.suppress(ProcessLookupError):
        os.killpg(proc.pid, signal.SIGINT)
    try:
        proc.wait(grace)
    except subprocess.TimeoutExpired:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(proc.pid, signal.SIGKILL)
        proc.wait()


def _prefect_cmd() -> list[str]:
    exe = Path(sys.executable).parent / "prefect"
    return [str(exe)] if exe.is_file() else [sys.executable, "-m", "prefect"]


@contextlib.contextmanager
def prefect_server(home: Path, threads: int | None, timeout: float = 180.0):
    """`prefect server start` on a free port of 127.0.0.1; yields (api_url, seconds until healthy)."""
    port = free_port()
    log = open(home / "server.log", "w")  # noqa: SIM115 - closed in finally
    t0 = time.perf_counter()
    proc = subprocess.Popen(
        [*_prefect_cmd(), "server", "start", "--host", "127.0.0.1", "--port", str(port)],
        stdout=log, stderr=subprocess.STDOUT, env=child_env(threads, home), cwd=home, start_new_session=True,
    )
    try:
        health = f"http://127.0.0.1:{port}/api/health"
        while True:
            if proc.poll() is not None:
                raise RuntimeError(f"prefect server exited ({proc.returncode}):\n{_tail(home / 'server.log')}")
            if time.perf_counter() - t0 > timeout:
                raise RuntimeError(f"prefect server not healthy after {timeout:.0f} s:\n{_tail(home / 'server.log')}")
            try:
                with urllib.request.urlopen(health, timeout=2) as resp:
                    if resp.status == 200:
                        break
            except OSError:
                pass
            time.sleep(0.25)
        yield f"http://127.0.0.1:{port}/api", time.perf_counter() - t0
    finally:
        _stop(proc)
        log.close()


def _tail(path: Path, chars: int = 3000) -> str:
    return path.read_text(errors="replace")[-chars:] if path.is_file() else ""


def timed_process(cmd: list[str], env: dict[str, str], cwd: Path, label: str) -> dict:
    """Run `cmd`, timestamping its stdout lines on arrival. Returns start-up (process start to the
    'run directory' line printed just before the iteration loop), each iteration's wall time (the
    period between summary lines), the printed seconds, teardown and total."""
    err_path = cwd / f"{label}.stderr"
    events: list[tuple[float, str]] = []
    with open(err_path, "w") as err:
        t0 = time.perf_counter()
        proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=err, text=True, env=env, cwd=cwd)
        assert proc.stdout is not None
        for line in proc.stdout:
            events.append((time.perf_counter() - t0, line.rstrip("\n")))
            if line.startswith("iter "):
                print(f"  [{label}] {line.rstrip()}", flush=True)
        rc = proc.wait()
        total = time.perf_counter() - t0
    if rc != 0:
        raise RuntimeError(f"{label}: {' '.join(cmd)} exited {rc}:\n{_tail(err_path)}")
    start = next((t for t, line in events if line.startswith("run directory")), None)
    iters = []
    for t, line in events:
        if not line.startswith("iter "):
            continue
        fields = line.split(" | ")
        printed = next((float(f[:-1]) for f in reversed(fields) if f.endswith("s") and f[:-1].replace(".", "", 1).isdigit()), None)
        iters.append({"iteration": int(fields[0].split()[1]), "at": t, "printed_s": printed,
                      "skipped": "(done before:" in line})
    if start is None or not iters:
        raise RuntimeError(f"{label}: no 'run directory' or iteration lines in its output:\n"
                           + "\n".join(line for _, line in events[-20:]))
    previous = start
    for it in iters:
        it["wall_s"] = it["at"] - previous
        previous = it["at"]
    return {"startup_s": start, "teardown_s": total - iters[-1]["at"], "total_s": total, "iterations": iters}


# ------------------------------------------------------------------------------ the reference loop
def reference_worker(run_dir: str, iterations: int, overrides: list[str], threads: int | None) -> None:
    """The stages in a plain loop (no Prefect, no MLflow, no skip checks); prints the same kind of lines."""
    import torch
    from transformers.utils import logging as hf_logging

    from aepo_core.io.engines import release_shared_engine
    from aepo_core.pipeline import stages

    if threads:
        torch.set_num_threads(threads)
    hf_logging.disable_progress_bar()  # as `aepo run` does
    run = stages.open_run(None, run_dir, iterations, overrides, log=lambda *a: None)
    cfg = run.config()
    print(f"run directory {run.root}", flush=True)
    try:
        for i in range(cfg.run.iterations):
            started = time.perf_counter()
            for stage in stages.stages_of(cfg, i):
                stages.PIPELINE[stage].run(run, i)  # progress bars are off by default
            print(f"iter {i:04d} | {time.perf_counter() - started:.1f}s", flush=True)
    finally:
        release_shared_engine()


# ------------------------------------------------------------------------------ layers
def stage_compute(stage: str, manifest: dict) -> float:
    """Seconds of the stage's work, from what it recorded (see the module docstring)."""
    m = manifest["metrics"]
    if stage == "rollout":
        return float(m["generate_seconds"])
    if stage == "update":
        return float(m["step_seconds"])
    if stage == "reward":
        return float(m["verify_seconds"])
    if stage == "evaluate":
        return float(m["generate_seconds"])
    return 0.0  # prepare, entropy: selection and bookkeeping only


def layers(run_dir: Path, measured: dict, include_eval: bool) -> list[dict]:
    """Per iteration: wall, Σ manifest seconds, compute, stage I/O, orchestration (and per-stage detail)."""
    rows = []
    for it in measured["iterations"]:
        i = it["iteration"]
        wall, manifest_s, compute, per_stage, excluded = it["wall_s"], 0.0, 0.0, {}, 0.0
        for stage in STAGES:
            path = run_dir / f"iter_{i:04d}" / stage / MANIFEST
            if not path.is_file():
                continue
            man = json.loads(path.read_text())
            if stage == "evaluate" and not include_eval:
                excluded = float(man["seconds"])
                continue
            c = stage_compute(stage, man)
            per_stage[stage] = {"seconds": float(man["seconds"]), "compute_s": c}
            manifest_s += float(man["seconds"])
            compute += c
        wall -= excluded
        rows.append({
            "iteration": i, "wall_s": wall, "printed_s": it["printed_s"], "skipped_stages": it["skipped"],
            "manifest_s": manifest_s, "compute_s": compute, "stage_io_s": manifest_s - compute,
            "orchestration_s": wall - manifest_s, "evaluate_excluded_s": excluded, "stages": per_stage,
        })
    return rows


def summarise(mode: str, runs: list[dict]) -> dict:
    rows = [r for run in runs for r in run["per_iteration"] if r["iteration"] > 0]
    wall = sum(r["wall_s"] for r in rows)

    def share(key: str) -> float:
        return 100.0 * sum(r[key] for r in rows) / wall if wall > 0 else float("nan")

    return {
        "mode": mode,
        "iterations": len(rows),
        "median_wall_s": statistics.median(r["wall_s"] for r in rows),
        "mean_wall_s": wall / len(rows),
        "compute_pct": share("compute_s"),
        "stage_io_pct": share("stage_io_s"),
        "orchestration_pct": share("orchestration_s"),
        "median_orchestration_s": statistics.median(r["orchestration_s"] for r in rows),
        "startup_s": statistics.median(run["startup_s"] for run in runs),
        "teardown_s": statistics.median(run["teardown_s"] for run in runs),
        "server_start_s": statistics.median(run["server_start_s"] for run in runs) if mode == "server" else None,
    }


# ------------------------------------------------------------------------------ one mode
def run_mode(mode: str, args, overrides: list[str], tmp: Path, repeat: int) -> dict:
    root = tmp / f"{mode}-{repeat}"
    root.mkdir()
    run_dir = root / "runs" / "run"
    home = root / "prefect-home"
    if mode != "reference":
        home.mkdir()
    label = f"{mode}#{repeat}"
    flow_cmd = [sys.executable, "-m", "aepo_core.cli", "run", "--run-dir", str(run_dir),
                "--iterations", str(args.iterations), "--no-progress", *overrides]
    if mode == "server":
        with prefect_server(home, args.threads) as (api_url, server_start):
            print(f"  [{label}] prefect server healthy after {server_start:.1f} s at {api_url}", flush=True)
            measured = timed_process(flow_cmd, child_env(args.threads, home, api_url), root, label)
        measured["server_start_s"] = server_start
    elif mode == "ephemeral":
        measured = timed_process(flow_cmd, child_env(args.threads, home), root, label)
    else:
        cmd = [sys.executable, str(Path(__file__).resolve()), "--reference-worker", str(run_dir),
               "--iterations", str(args.iterations), *(["--threads", str(args.threads)] if args.threads else []),
               *overrides]
        measured = timed_process(cmd, child_env(args.threads), root, label)
    measured["per_iteration"] = layers(run_dir, measured, args.include_eval)
    measured["repeat"] = repeat
    del measured["iterations"]
    return measured


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--prompts", type=int, default=32, help="rollout.prompts_per_batch")
    parser.add_argument("--iterations", type=int, default=6)
    parser.add_argument("--repeats", type=int, default=1)
    parser.add_argument("--threads", type=int, default=None, help="torch threads in every mode (default: torch's)")
    parser.add_argument("--modes", default=",".join(MODES))
    parser.add_argument("--include-eval", action="store_true", help="keep evaluation.every and count evaluation")
    parser.add_argument("--keep", action="store_true", help="keep the temporary folders (runs, logs) and say where")
    parser.add_argument("--out", default="benchmarks/results/overhead.json")
    parser.add_argument("--reference-worker", metavar="RUN_DIR", help=argparse.SUPPRESS)
    parser.add_argument("overrides", nargs="*", help="config overrides, e.g. rollout.n=4 trainer.lr=3e-4")
    args = parser.parse_args()

    if args.reference_worker:
        reference_worker(args.reference_worker, args.iterations, args.overrides, args.threads)
        return
    modes = args.modes.split(",")
    unknown = [m for m in modes if m not in MODES]
    if unknown:
        raise SystemExit(f"unknown modes {unknown}; choose from {list(MODES)}")
    if args.iterations < 2:
        raise SystemExit("--iterations must be at least 2 (iteration 0 is left out)")

    from aepo_core.config import load_config
    from aepo_core.pipeline.sources import resolve_model_path

    overrides = [f"rollout.prompts_per_batch={args.prompts}"]
    if not args.include_eval:  # the flow still evaluates at the last iteration: make that cheap (it is taken out)
        overrides += [f"evaluation.every={args.iterations + 1}", "evaluation.num_prompts=1", "evaluation.n=1"]
    overrides += args.overrides  # the caller's overrides win
    cfg = load_config(None, [*overrides, f"run.iterations={args.iterations}"])
    resolve_model_path(cfg)  # build (or find) the base policy before anything is timed
    print(f"{args.prompts} prompts x {cfg.rollout.n} responses, max {cfg.rollout.max_new_tokens} tokens, "
          f"{args.iterations} iterations, threads {args.threads or 'torch default'}, "
          f"evaluation {'included' if args.include_eval else 'excluded'}, modes {', '.join(modes)}", flush=True)

    load_before = os.getloadavg()
    results: dict[str, list[dict]] = {m: [] for m in modes}
    tmp = Path(tempfile.mkdtemp(prefix="aepo-overhead-"))
    try:
        for r in range(args.repeats):
            order = modes[r % len(modes):] + modes[: r % len(modes)]
            for mode in order:
                print(f"repeat {r}: {mode}", flush=True)
                results[mode].append(run_mode(mode, args, overrides, tmp, r))
    finally:
        if args.keep:
            print(f"kept {tmp}")
        else:
            import shutil

            shutil.rmtree(tmp, ignore_errors=True)

    rows = [summarise(m, results[m]) for m in modes]
    ref = next((r for r in rows if r["mode"] == "reference"), None)
    for r in rows:
        r["median_wall_vs_reference"] = r["median_wall_s"] / ref["median_wall_s"] if ref else None
    header = (f"{'mode':10s} {'iters':>5s} {'median s':>9s} {'compute %':>9s} {'stage I/O %':>11s} "
              f"{'orch %':>7s} {'orch s':>7s} {'start-up s':>10s} {'vs ref':>7s}")
    print(header)
    for r in rows:
        vs = f"{r['median_wall_vs_reference']:7.3f}" if ref else f"{'-':>7s}"
        print(f"{r['mode']:10s} {r['iterations']:5d} {r['median_wall_s']:9.3f} {r['compute_pct']:9.1f} "
              f"{r['stage_io_pct']:11.1f} {r['orchestration_pct']:7.1f} {r['median_orchestration_s']:7.3f} "
              f"{r['startup_s']:10.1f} {vs}")
    if "server" in results:
        print(f"(server mode: the prefect server itself took {rows[modes.index('server')]['server_start_s']:.1f} s "
              "to become healthy, not included in its start-up)")

    def version(name: str) -> str | None:
        try:
            return metadata.version(name)
        except metadata.PackageNotFoundError:
            return None

    meta = {
        "prompts": args.prompts, "n": cfg.rollout.n, "max_new_tokens": cfg.rollout.max_new_tokens,
        "iterations": args.iterations, "repeats": args.repeats, "threads": args.threads, "modes": modes,
        "include_eval": args.include_eval, "overrides": overrides, "engine": cfg.rollout.engine,
        "save_every": cfg.tracking.save_every, "cpu_count": os.cpu_count(), "load_average_before": load_before,
        "platform": platform.platform(),
        "versions": {p: version(p) for p in ("prefect", "mlflow", "torch", "transformers")},
    }
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps({"config": meta, "rows": rows, "runs": results}, indent=2))
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
