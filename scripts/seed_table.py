"""The seeds table of docs/results.md ("Seeds of the adaptive controller on a GPU") from run directories.

    python scripts/seed_table.py runs/seeds --out docs/results/seeds-gpu

Reads each run's iter_NNNN/entropy/controller.json and last evaluate/_SUCCESS.json (no MLflow: runs
of scripts/stage_loop.py have none) and writes summary.md, summary.json and entropy-by-seed.png.
Per controlled run, over the second half (iterations 50-99 of 100):

- dev: mean |H - H*| / H* of the reading the controller steered (exact, policy rows), and the same
  for the nll estimator of the policy rows;
- mean, min and max of that reading; T's range (the temperature each entropy stage chose);
- iterations at T's clamps (algorithm.adaptive_t_max / t_min of the run's config.yaml; 1.5 / 0.6, the
  defaults, where it has none); T's moves up and down over
  the whole run (iterations where the chosen T rose or fell);
- fast / slow: the reading's spread split into the spread of one iteration's change over sqrt(2)
  (reading noise plus one step's) and the rest, sqrt(sd^2 - fast^2), both relative to H*;
- final held-out avg@n.
GRPO runs (no target): the nll reading's fall, 1 - mean of the last ten iterations / first ten.
"""

from __future__ import annotations

import argparse
import json
import statistics
from pathlib import Path


def series(root: Path) -> list[dict]:
    return [json.loads(p.read_text()) for p in sorted(root.glob("iter_*/entropy/controller.json"))]


def held_reading(measured: dict) -> float:
    """The entropy the target is stated in, from a controller.json's "measured": the policy's own
    reading (target_value), which is what the controller read (read_value) unless it read ahead
    (algorithm.entropy_lookahead); runs from before target_value have read_value only."""
    value = measured.get("target_value")
    return value if value is not None else measured["read_value"]


def final_accuracy(root: Path) -> float | None:
    done = sorted(root.glob("iter_*/evaluate/_SUCCESS.json"))
    return json.loads(done[-1].read_text())["metrics"]["accuracy"] if done else None


def clamps(root: Path) -> tuple[float, float]:
    """(t_min, t_max) of the adaptive controller in the run's config.yaml (the defaults without one)."""
    from aepo_core.config import AlgorithmConfig, load_config

    algo = load_config(root / "config.yaml", []).algorithm if (root / "config.yaml").is_file() else AlgorithmConfig()
    return algo.adaptive_t_min, algo.adaptive_t_max


def run_row(root: Path, name: str) -> dict:
    s = series(root)
    m = [j["measured"] for j in s]
    nll = [x["nll_policy_rows"] if x.get("nll_policy_rows") is not None else x["nll"] for x in m]
    row = {"name": name, "iterations": len(s), "final_accuracy": final_accuracy(root)}
    if s[0]["next_temperature"] is None:  # no controller (GRPO): no target to hold
        row.update(target=None, nll_first=nll[0], nll_last=nll[-1], fall=1 - sum(nll[-10:]) / sum(nll[:10]))
        return row
    target = s[0]["target"]
    t_min, t_max = clamps(root)
    read = [held_reading(x) for x in m]
    temps = [j["next_temperature"] for j in s]
    half = range(len(s) // 2, len(s))
    h = [read[i] for i in half]
    steps = [b - a for a, b in zip(h[:-1], h[1:], strict=True)]
    sd, fast = statistics.pstdev(h), statistics.pstdev(steps) / 2**0.5
    row.update(
        target=target,
        dev=sum(abs(read[i] - target) for i in half) / len(half) / target,
        dev_nll=sum(abs(nll[i] - target) for i in half) / len(half) / target,
        mean=statistics.mean(h), lo=min(h), hi=max(h),
        t_lo=min(temps[i] for i in half), t_hi=max(temps[i] for i in half),
        at_max=sum(temps[i] >= t_max - 1e-6 for i in half), at_min=sum(temps[i] <= t_min + 1e-6 for i in half),
        moves_up=sum(b > a + 1e-9 for a, b in zip(temps[:-1], temps[1:], strict=True)),
        moves_down=sum(b < a - 1e-9 for a, b in zip(temps[:-1], temps[1:], strict=True)),
        fast=fast / target, slow=max(sd**2 - fast**2, 0.0) ** 0.5 / target,
    )
    return row


def markdown(rows: list[dict]) -> str:
    lines = [
        "| run | H* | \\|H−H*\\|/H*, exact (nll) | mean H, range (iterations 50–99) | T range, 50–99 "
        "| iterations at T's max / min, 50–99 | T moves up, down | fast / slow spread (of H*) | final avg@8 |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        if r["target"] is None:
            continue
        dev = f"{100 * r['dev']:.1f}%"
        dev = f"**{dev}**" if r["dev"] <= 0.10 else dev
        lines.append(
            f"| {r['name']} | {r['target']:g} | {dev} ({100 * r['dev_nll']:.1f}%) | {r['mean']:.3f}, {r['lo']:.3f}–{r['hi']:.3f} "
            f"| {r['t_lo']:.2f}–{r['t_hi']:.2f} | {r['at_max']} / {r['at_min']} | {r['moves_up']}, {r['moves_down']} "
            f"| {100 * r['fast']:.0f}% / {100 * r['slow']:.0f}% | {r['final_accuracy']:.3f} |"
        )
    for r in rows:
        if r["target"] is None:
            lines.append(f"\n{r['name']}: nll {r['nll_first']:.3f} at the first iteration, {r['nll_last']:.3f} at the last; "
                         f"fall (last ten vs first ten iterations) {100 * r['fall']:.0f}%; final avg@8 {r['final_accuracy']:.3f}")
    return "\n".join(lines) + "\n"


def plot(runs: Path, rows: list[dict], path: Path, prefix: str = "pi-") -> bool:
    """Entropy and T against iteration for the runs whose names start with `prefix` (the plan's
    `pi-<target>` arms by default), one panel per target; False (nothing drawn) when no run with a
    target matches."""
    from aepo_core.pipeline.compare import _pyplot

    plt = _pyplot()
    targets = sorted({r["target"] for r in rows if r["target"] is not None and r["name"].startswith(prefix)})
    if not targets:
        return False
    fig, axes = plt.subplots(2, len(targets), figsize=(4 * len(targets), 6.5), sharex=True, squeeze=False)
    for c, target in enumerate(targets):
        for r in rows:
            if r["name"].startswith(prefix) and r["target"] == target:
                s = series(runs / r["name"])
                label = r["name"].rsplit("-", 1)[1] if prefix == "pi-" else r["name"]
                axes[0, c].plot([held_reading(j["measured"]) for j in s], lw=1, label=label)
                axes[1, c].plot([j["next_temperature"] for j in s], lw=1)
        ax = axes[0, c]
        ax.axhline(target, color="k", ls="--", lw=1)
        ax.fill_between(range(50, 100), 0.9 * target, 1.1 * target, color="grey", alpha=0.2)
        ax.set_title(f"H* = {target:g}")
        ax.legend(fontsize=7)
        axes[1, c].set_xlabel("iteration")
    axes[0, 0].set_ylabel("entropy (exact, policy rows)")
    axes[1, 0].set_ylabel("regulariser temperature T")
    what = "Adaptive controller (PI, gain 0.1, 32 prompts): every seed" if prefix == "pi-" else f"runs {prefix}*"
    fig.suptitle(f"{what}; grey band = target ±10% over iterations 50–99")
    fig.tight_layout()
    fig.savefig(path, dpi=80)
    return True


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("runs", type=Path, help="folder of run directories (a plan's run.runs_root)")
    parser.add_argument("--out", type=Path, required=True)
    parser.add_argument("--plot-prefix", default="pi-", help="plot the runs whose names start with this (default: pi-)")
    args = parser.parse_args()
    names = sorted(p.parent.parent.parent.name for p in args.runs.glob("*/iter_0000/entropy/controller.json"))
    rows = [run_row(args.runs / name, name) for name in names]
    order = {"pi": 0, "grpo": 2}
    rows.sort(key=lambda r: (order.get(r["name"].split("-")[0], 1), r["name"]))
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "summary.json").write_text(json.dumps(rows, indent=1))
    title = ("# Seeds of the adaptive controller (docs/results.md): |H-H*|/H* over iterations 50-99, from each run's "
             "controller.json (scripts/seed_table.py)\n\n")
    (args.out / "summary.md").write_text(title + markdown(rows))
    if not plot(args.runs, rows, args.out / "entropy-by-seed.png", args.plot_prefix):
        print(f"no plot: no run with a target is named {args.plot_prefix}* (--plot-prefix)")
    print(markdown(rows))


if __name__ == "__main__":
    main()
