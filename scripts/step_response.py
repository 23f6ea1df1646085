"""Open-loop step response of a trained run: copies of it continued with the regulariser's
temperature held fixed, to see what the controller's actuator does without the controller.

    python scripts/step_response.py runs/sweep/pi-0.08-s3 --temperatures 0.7,1.1,1.5 --iterations 25 \\
        --out runs/step/pi-0.08-s3 --parallel 3

Each temperature T gets a copy of the run at OUT/T<T> (its last update's policy and optimiser state,
which retention keeps, are what it continues from), extended by --iterations iterations with
algorithm.controller=fixed and algorithm.fixed_temperature=T from the first new iteration on, and run
through the stage functions (aepo_core.pipeline.stages.run_iteration), one process with one thread
each (scripts/stage_loop.py's pool). The first new iteration still samples at the run's own last
decision (the previous entropy stage's controller.json, which cannot be recomputed: the policy before
it is pruned), so the step acts from the second one. The run itself is not changed.

Prints, per temperature, the entropy the controller reads (the run's algorithm.entropy_rows and
estimator) by iteration, and writes OUT/step.json: {"run", "start", "temperatures": {T: {"entropy":
[...], "temperature": [...], "positives": [...]}}} and OUT/step.png (entropy by iteration). A copy that exists is resumed, not copied again.
"""

from __future__ import annotations

import argparse
import json
import shutil
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from seed_table import held_reading  # noqa: E402  (the scripts folder, as a script sees it)
from stage_loop import run_children, run_iterations  # noqa: E402


def continue_fixed(run_dir: Path, start: int, end: int, temperature: float) -> None:
    """Continue the run at `run_dir` from `start` (its end) to `end` iterations, the temperature fixed
    from `start` on; resumes a copy stopped part way (each step below is checked, not assumed)."""
    from aepo_core.pipeline.processes import use_threads
    from aepo_core.pipeline.rundir import RunDir
    from aepo_core.pipeline.stages import open_run, prepare_rerun

    if RunDir(run_dir).config().run.iterations < end:  # more iterations, as `aepo run --iterations` gives
        open_run(None, run_dir, end).release_writer()
    algo = RunDir(run_dir).config(start).algorithm
    if (algo.controller, algo.fixed_temperature) != ("fixed", temperature):  # from `start` on
        prepare_rerun(run_dir, start, "prepare",
                      ["algorithm.controller=fixed", f"algorithm.fixed_temperature={temperature}"]).release_writer()
    use_threads(1)
    # the iterations before `start` are the run's own, complete (and pruned)
    run_iterations(open_run(None, run_dir), range(start, end))


def series(run_dir: Path, start: int, end: int) -> dict[str, list]:
    """What the continued iterations measured: the controller's reading, the regulariser's
    temperature and the positives it found, from each iteration's controller.json."""
    out: dict[str, list] = {"entropy": [], "temperature": [], "positives": []}
    for i in range(start, end):
        data = json.loads((run_dir / f"iter_{i:04d}" / "entropy" / "controller.json").read_text())
        rollout = json.loads((run_dir / f"iter_{i:04d}" / "rollout" / "_SUCCESS.json").read_text())
        out["entropy"].append(held_reading(data["measured"]))
        out["temperature"].append(rollout["metrics"].get("regulariser_temperature"))
        out["positives"].append(data["state"].get("num_positives"))
    return out


def plot(result: dict, path: Path) -> None:
    """The entropy read against iterations after the run's end, one line per temperature (log scale:
    a runaway spans decades)."""
    from aepo_core.pipeline.compare import _pyplot

    plt = _pyplot()
    fig, ax = plt.subplots(figsize=(7, 4))
    for t, s in result["temperatures"].items():
        ax.plot(range(1, len(s["entropy"]) + 1), s["entropy"], lw=1.2, label=f"T = {t}")
    ax.set_yscale("log")
    ax.set_xlabel(f"iterations after the run's end (iteration {result['start'] - 1}); T acts from the second")
    ax.set_ylabel("entropy read by the controller")
    ax.set_title(f"open-loop step response: {Path(result['run']).name}", fontsize=9)
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=80)
    plt.close(fig)


def _temperatures(text: str) -> list[float]:
    values = [float(t) for t in text.split(",") if t.strip()]
    if not values or min(values) <= 0:
        raise argparse.ArgumentTypeError(f"temperatures above 0, comma-separated; got {text!r}")
    return values


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("run_dir", type=Path, help="a finished run directory (left as it is)")
    parser.add_argument("--temperatures", type=_temperatures, default=[0.7, 1.1, 1.5])
    parser.add_argument("--iterations", type=int, default=25, help="iterations to continue each copy by")
    parser.add_argument("--out", type=Path, help="folder for the copies and step.json (required)")
    parser.add_argument("--parallel", type=int, default=1, help="copies at once (one process and one thread each)")
    parser.add_argument("--one", nargs=3, help=argparse.SUPPRESS)  # a child: START END TEMPERATURE, run_dir the copy
    args = parser.parse_args()
    if args.one:
        continue_fixed(args.run_dir, int(args.one[0]), int(args.one[1]), float(args.one[2]))
        return 0

    from aepo_core.pipeline.rundir import RunDir

    if args.out is None:
        parser.error("--out is required")
    if not (args.run_dir / "config.yaml").is_file():
        parser.error(f"{args.run_dir} is not a run directory (no config.yaml)")
    if args.iterations < 1:
        parser.error("--iterations must be 1 or more")
    start = RunDir(args.run_dir).config().run.iterations
    end = start + args.iterations
    jobs = []
    for t in args.temperatures:
        copy = args.out / f"T{t:g}"
        if not copy.exists():
            shutil.copytree(args.run_dir, copy, symlinks=True, ignore=shutil.ignore_patterns(".writer.lock"))
        jobs.append((f"T{t:g}", [__file__, str(copy), "--one", str(start), str(end), str(t)], args.out / f"T{t:g}.log",
                     f"{args.run_dir} from iteration {start}, T fixed at {t:g}"))
    failed = run_children(jobs, max(1, args.parallel))
    if failed:
        print(f"failed: {', '.join(failed)} (their logs in {args.out})")
        return 1
    result = {"run": str(args.run_dir.resolve()), "start": start,
              "temperatures": {f"{t:g}": series(args.out / f"T{t:g}", start, end) for t in args.temperatures}}
    (args.out / "step.json").write_text(json.dumps(result, indent=1) + "\n")
    plot(result, args.out / "step.png")
    print(f"entropy read by iteration after {start - 1} (the first new one samples at the run's own last decision):")
    for t, s in result["temperatures"].items():
        print(f"T {t:>4}: " + " ".join(f"{h:.3f}" for h in s["entropy"]))
    return 0


if __name__ == "__main__":
    sys.exit(main())
