"""scripts/seed_table.py: the seeds table's numbers on run directories written by hand."""

from __future__ import annotations

import importlib.util
import json
from pathlib import Path

import pytest

_spec = importlib.util.spec_from_file_location("seed_table", Path(__file__).parents[1] / "scripts" / "seed_table.py")
seed_table = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(seed_table)


def _write_run(root: Path, reads: list[float], temps: list[float | None], target: float = 0.1,
               ahead: list[float] | None = None) -> None:
    for i, (h, t) in enumerate(zip(reads, temps, strict=True)):
        stage = root / f"iter_{i:04d}" / "entropy"
        stage.mkdir(parents=True)
        measured = {"nll": h + 0.01, "exact": h, "nll_policy_rows": h + 0.02, "exact_policy_rows": h, "read_value": h}
        if ahead is not None:  # the controller read ahead (algorithm.entropy_lookahead); the target is on h
            measured.update(read_value=ahead[i], target_value=h)
        stage.joinpath("controller.json").write_text(json.dumps(
            {"measured": measured, "target": target, "next_temperature": t, "state": {}}))
    done = root / f"iter_{len(reads) - 1:04d}" / "evaluate"
    done.mkdir(parents=True)
    done.joinpath("_SUCCESS.json").write_text(json.dumps({"metrics": {"accuracy": 0.75}}))


def test_a_controlled_run_by_hand(tmp_path):
    # 100 iterations; the second half alternates 0.09, 0.11 around H* = 0.1: |H - H*| / H* = 0.1 on
    # every iteration; sd 0.01; the 49 changes are 25 x +0.02 and 24 x -0.02 (mean 0.02 / 49), so
    # fast = sqrt(0.02^2 - (0.02 / 49)^2) / sqrt(2) / 0.1, above sd / 0.1: slow = 0.
    reads = [0.15] * 50 + [0.09, 0.11] * 25
    temps = [1.0] * 50 + [1.5, 0.6] * 25  # second half: 25 at each clamp; 49 rises, 50 falls overall
    _write_run(tmp_path / "pi-0.1-s0", reads, temps)
    row = seed_table.run_row(tmp_path / "pi-0.1-s0", "pi-0.1-s0")
    assert row["dev"] == pytest.approx(0.1)
    assert row["dev_nll"] == pytest.approx(sum(abs(h + 0.02 - 0.1) for h in reads[50:]) / 50 / 0.1)
    assert (row["mean"], row["lo"], row["hi"]) == pytest.approx((0.1, 0.09, 0.11))
    assert (row["at_max"], row["at_min"], row["t_lo"], row["t_hi"]) == (25, 25, 0.6, 1.5)
    assert (row["moves_up"], row["moves_down"]) == (25, 25)  # 1.0 -> 1.5 once, then 24 more rises
    assert row["fast"] == pytest.approx((0.02**2 - (0.02 / 49) ** 2) ** 0.5 / 2**0.5 / 0.1)
    assert row["slow"] == pytest.approx(0.0, abs=1e-6)
    assert row["final_accuracy"] == 0.75


def test_grpo_gets_its_fall_and_the_table_skips_it(tmp_path):
    reads = [0.2] * 10 + [0.1] * 80 + [0.05] * 10  # nll policy rows = read + 0.02
    _write_run(tmp_path / "grpo-s0", reads, [None] * 100)
    row = seed_table.run_row(tmp_path / "grpo-s0", "grpo-s0")
    assert row["target"] is None and row["fall"] == pytest.approx(1 - 0.07 / 0.22)
    text = seed_table.markdown([row])
    assert "| grpo-s0 |" not in text and "fall (last ten vs first ten iterations) 68%" in text


def test_the_clamps_come_from_the_runs_config(tmp_path):
    root = tmp_path / "tmax13-0.08-s0"
    _write_run(root, [0.07] * 100, [1.0] * 60 + [1.3] * 40, target=0.08)
    (root / "config.yaml").write_text("algorithm:\n  controller: adaptive\n  adaptive_t_max: 1.3\n")
    row = seed_table.run_row(root, root.name)
    assert (row["at_max"], row["at_min"]) == (40, 0)  # at this run's clamp, 1.3 (the default 1.5: 0)


def test_the_plot_draws_the_runs_asked_for_and_says_when_there_are_none(tmp_path, monkeypatch, capsys):
    runs = tmp_path / "runs"
    for name in ("tmax13-0.08-s0", "tmax13-0.08-s1"):  # no pi- arm: the default plot has nothing to draw
        _write_run(runs / name, [0.08] * 100, [1.2] * 100, target=0.08)
    monkeypatch.setattr("sys.argv", ["seed_table.py", str(runs), "--out", str(tmp_path / "a")])
    seed_table.main()
    assert "no plot: no run with a target is named pi-*" in capsys.readouterr().out
    assert (tmp_path / "a" / "summary.md").is_file() and not (tmp_path / "a" / "entropy-by-seed.png").exists()
    monkeypatch.setattr("sys.argv", ["seed_table.py", str(runs), "--out", str(tmp_path / "b"), "--plot-prefix", "tmax13"])
    seed_table.main()
    assert (tmp_path / "b" / "entropy-by-seed.png").stat().st_size > 0


def test_a_run_that_read_ahead_is_measured_on_the_policys_own_reading(tmp_path):
    reads = [0.1] * 50 + [0.09, 0.11] * 25
    _write_run(tmp_path / "ahead-s0", reads, [1.0] * 100, ahead=[0.5] * 100)
    row = seed_table.run_row(tmp_path / "ahead-s0", "ahead-s0")
    assert row["dev"] == pytest.approx(0.1) and row["mean"] == pytest.approx(0.1)  # not the 0.5 read ahead
