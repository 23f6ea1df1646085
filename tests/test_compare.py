import pytest

from aepo_core.pipeline.compare import (
    entropy_fall,
    format_source_table,
    format_table,
    plot_against_target,
    plot_controller,
    plot_histories,
    summarise,
    temperature_switches,
)


def history(**traces):
    return {key.replace("__", "/"): list(enumerate(values)) for key, values in traces.items()}


def lines(axes, label=None, **style):
    """The (x, y) of the lines of one described axes with this label (None: unlabelled) and style."""
    return [
        (ln["x"], pytest.approx(ln["y"]))
        for ln in axes["lines"]
        if ln["label"] == label and all(ln[k] == v for k, v in style.items())
    ]


def test_summarise_hand_values():
    h = history(
        entropy__nll=[0.20, 0.10, 0.12, 0.08],
        rollout__regulariser_temperature=[1.2, 0.8, 0.8, 1.2],
        aepo__k=[4, 2, 2, 4],
        aepo__num_positives=[6, 5, 5, 8],
        eval__accuracy=[0.3, 0.4],
        eval__pass_at_1=[0.3, 0.4],
        eval__pass_at_8=[0.7, 0.9],
        eval__pass_at_2=[0.5, 0.6],
    )
    s = summarise(h, "aepo", 0.10, t_high=1.2, t_low=0.8)
    assert s["final_accuracy"] == 0.4 and s["final_pass_at_1"] == 0.4
    assert s["pass_k"] == 8 and s["final_pass_at_k"] == 0.9
    # second half [0.12, 0.08]: |dev| 0.02 each; relative 0.2; too short for the 10-iteration windows
    assert s["mean_abs_dev"] == pytest.approx(0.02)
    assert s["mean_rel_dev"] == pytest.approx(0.2)
    assert s["entropy_fall"] is None
    assert s["frac_t_high"] == pytest.approx(0.5)
    assert (s["switches_up"], s["switches_down"]) == (1, 1)
    assert s["mean_k"] == 3 and s["mean_positives"] == 6


def test_summarise_deviation_by_estimator():
    """Both estimators of the controller's rows are scored against H*, whichever the controller read."""
    h = history(entropy__exact_policy_rows=[0.3, 0.3, 0.11, 0.10], entropy__nll_policy_rows=[0.3, 0.3, 0.13, 0.07],
                entropy__nll=[0.5, 0.5, 0.5, 0.5])
    s = summarise(h, "aepo", 0.10, entropy_key="entropy/exact_policy_rows")
    assert s["mean_rel_dev"] == pytest.approx(0.05) and s["mean_rel_dev_exact"] == pytest.approx(0.05)
    assert s["mean_rel_dev_nll"] == pytest.approx(0.3)  # (0.03 + 0.03) / 2 / 0.1, not the all-rows trace
    assert summarise(h, "grpo", None, entropy_key="entropy/exact_policy_rows")["mean_rel_dev_nll"] is None


def test_summarise_without_controller_or_target():
    s = summarise(history(entropy__nll=[0.2, 0.1]), "grpo", None)
    assert s["mean_rel_dev"] is None and s["frac_t_high"] is None and s["switches_up"] is None
    # equal temperatures (the T_high = T_low = 1 ablation): no fraction at T_high
    s = summarise(history(entropy__nll=[0.2], rollout__regulariser_temperature=[1.0]), "aepo", 0.1, t_high=1.0, t_low=1.0)
    assert s["frac_t_high"] is None


def test_temperature_switches():
    assert temperature_switches([1.2, 1.2, 0.8, 1.2, 0.8, 0.8]) == (1, 2)
    assert temperature_switches([1.0]) == (0, 0)


def test_markdown_table_and_target_plot(tmp_path):
    rows = [
        {"run": "a", "algorithm": "aepo", "target": 0.1, "final_accuracy": 0.4, "final_pass_at_k": 0.9},
        {"run": "b", "algorithm": "aepo", "target": 0.2, "final_accuracy": 0.5, "final_pass_at_k": 0.95},
        {"run": "g", "algorithm": "grpo", "target": None, "final_accuracy": 0.45, "final_pass_at_k": 0.85},
    ]
    md = format_table(rows, markdown=True).splitlines()
    assert md[0].startswith("| run | algorithm | H* |") and md[1].startswith("|---|") and len(md) == 5
    figures = {}
    path = plot_against_target(rows, tmp_path, figures)
    assert path == tmp_path / "against_target.png" and path.is_file()
    fig = figures["against_target"]
    assert [(ax["xlabel"], ax["ylabel"]) for ax in fig["axes"]] == [
        ("target entropy H* (nats/token)", "final avg@n"),
        ("target entropy H* (nats/token)", "final pass@n"),
    ]
    for ax, aepo_values, grpo_value in zip(fig["axes"], ([0.4, 0.5], [0.9, 0.95]), (0.45, 0.85), strict=True):
        assert ax["legend"] == ["aepo (mean of seeds)", "grpo (mean)"]
        assert len(ax["lines"]) == 3  # the AEPO line, its seeds as dots, the GRPO mean
        # one seed per target: the mean of seeds is the seed itself, at targets 0.1 and 0.2
        assert lines(ax, "aepo (mean of seeds)", marker="o") == [([0.1, 0.2], aepo_values)]
        assert lines(ax, None, marker=".", linestyle="None") == [([0.1, 0.2], aepo_values)]
        assert lines(ax, "grpo (mean)", linestyle="--") == [([0.0, 1.0], [grpo_value, grpo_value])]
    nothing = {}
    assert plot_against_target(rows[2:], tmp_path / "none", nothing) is None and nothing == {}


def test_controller_plot_only_for_runs_with_a_temperature(tmp_path):
    aepo = history(entropy__nll=[0.2, 0.1, 0.12], rollout__regulariser_temperature=[1.2, 0.8, 1.2])
    grpo = history(entropy__nll=[0.2, 0.1, 0.05], rollout__regulariser_temperature=[float("nan")] * 3)
    figures = {}
    path = plot_controller({"aepo": aepo, "grpo": grpo}, tmp_path, {"aepo": 0.1, "grpo": None}, figures=figures)
    assert path == tmp_path / "controller.png" and path.is_file()
    fig = figures["controller"]
    # one panel is narrower than the sentence: wrapped, not cut at both sides
    assert fig["suptitle"].replace("\n", " ") == "entropy (blue; dashed: target) and the controller's temperature (red)"
    assert fig["cut_titles"] == []
    entropy_ax, temperature_ax = fig["axes"]  # one panel (aepo; grpo has no temperature) and its twin
    assert (entropy_ax["title"], entropy_ax["ylabel"], temperature_ax["ylabel"]) == ("aepo", "entropy", "T")
    assert len(entropy_ax["lines"]) == 2 and len(temperature_ax["lines"]) == 1
    assert lines(entropy_ax, linestyle="-") == [([0.0, 1.0, 2.0], [0.2, 0.1, 0.12])]
    assert lines(entropy_ax, linestyle="--") == [([0.0, 1.0], [0.1, 0.1])]  # the target
    assert lines(temperature_ax, drawstyle="steps-post") == [([0.0, 1.0, 2.0], [1.2, 0.8, 1.2])]
    assert plot_controller({"grpo": grpo}, tmp_path / "none", {"grpo": None}) is None


def test_final_accuracy_by_source():
    h = {"entropy/nll": [(0, 0.2)], "eval/accuracy": [(0, 0.5)], "eval/a-3/accuracy": [(0, 0.1), (9, 0.6)],
         "eval/b/accuracy": [(9, 0.4)], "eval/pass_at_8": [(9, 0.9)]}
    s = summarise(h, "grpo", None)
    assert s["final_accuracy_by_source"] == {"a-3": 0.6, "b": 0.4}
    # the base policy's evaluation (step -1) is its own column, never a run's final or best
    based = summarise({**h, "eval/accuracy": [(-1, 0.9), (0, 0.5), (9, 0.7)]}, "grpo", None)
    assert (based["base_accuracy"], based["final_accuracy"], based["best_accuracy"]) == (0.9, 0.7, 0.7)
    assert s["base_accuracy"] is None
    table = format_source_table([{"run": "r", **s}, {"run": "q", "final_accuracy_by_source": {"b": 0.25}}])
    assert table.splitlines()[0] == "| run | a-3 | b |"
    assert table.splitlines()[2:] == ["| r | 0.600 | 0.400 |", "| q | - | 0.250 |"]
    assert format_source_table([{"run": "x"}]) is None


def test_entropy_fall_compares_ten_iteration_windows():
    trace = [0.3] + [0.2] * 9 + [0.5] * 5 + [0.1] * 9 + [0.19]
    # first ten: mean 0.21; last ten: mean 0.109 -> fall 1 - 0.109 / 0.21
    assert entropy_fall(trace) == pytest.approx(1 - 0.109 / 0.21)
    assert entropy_fall(trace[:19]) is None


def test_ablations_are_crosses_not_part_of_the_line(tmp_path):
    from aepo_core.pipeline.compare import aepo_variant, split_aepo_line

    base = {"algorithm.name": "aepo", "algorithm.t_high": "1.2", "rollout.seed": "0", "algorithm.target_entropy": "0.1"}
    same = {**base, "rollout.seed": "1", "algorithm.target_entropy": "0.2", "run.name": "x"}
    ablation = {**base, "algorithm.t_high": "1.0"}
    assert aepo_variant(base) == aepo_variant(same) != aepo_variant(ablation)
    rows = [
        {"run": "a", "algorithm": "aepo", "target": 0.1, "final_accuracy": 0.4, "variant": aepo_variant(base)},
        {"run": "b", "algorithm": "aepo", "target": 0.2, "final_accuracy": 0.5, "variant": aepo_variant(same)},
        {"run": "t1", "algorithm": "aepo", "target": 0.15, "final_accuracy": 0.3, "variant": aepo_variant(ablation)},
    ]
    figures = {}
    path = plot_against_target(rows, tmp_path, figures)
    assert path is not None and path.is_file()
    avg = figures["against_target"]["axes"][0]
    assert avg["legend"] == ["aepo (mean of seeds)"] and avg["texts"] == ["t1"]
    assert lines(avg, "aepo (mean of seeds)") == [([0.1, 0.2], [0.4, 0.5])]  # the line leaves t1 out
    assert lines(avg, None, marker="x") == [([0.15], [0.3])]  # the ablation: one labelled cross
    assert all(ln["x"] == [] for ln in figures["against_target"]["axes"][1]["lines"])  # no pass@n here
    line, ablations = split_aepo_line(rows)
    assert [r["run"] for r in line] == ["a", "b"] and [r["run"] for r in ablations] == ["t1"]


def test_running_mean_hand_values():
    from aepo_core.pipeline.compare import running_mean

    assert running_mean([1.0, 3.0, 5.0, 7.0], 2) == [1.0, 2.0, 4.0, 6.0]
    assert running_mean([2.0], 5) == [2.0]


def test_history_plots_draw_each_run_raw_and_smoothed_with_its_target(tmp_path):
    aepo = history(entropy__nll=[0.2, 0.1, 0.12], reward__reward_mean=[0.5, 0.7, 0.6], eval__accuracy=[0.3, 0.4])
    aepo["eval/accuracy"].insert(0, (-1, 0.25))  # the base policy's evaluation
    grpo = history(entropy__nll=[0.2, 0.1, 0.05], reward__reward_mean=[0.4, 0.4, 0.5])
    figures = {}
    paths = plot_histories({"grpo": grpo, "aepo": aepo}, tmp_path, {"aepo": 0.1, "grpo": None}, smooth=2,
                           figures=figures)
    # no run has a temperature trace: no temperature plot; eval only for aepo
    assert [p.name for p in paths] == ["entropy.png", "reward.png", "eval_accuracy.png"]
    assert all(p.is_file() for p in paths) and list(figures) == ["entropy", "reward", "eval_accuracy"]
    (entropy,) = figures["entropy"]["axes"]
    assert entropy["xlabel"] == "iteration" and entropy["ylabel"].startswith("entropy (nats/token")
    assert entropy["title"].startswith("entropy per iteration (2-iteration running mean")
    assert entropy["legend"] == ["aepo", "grpo"]  # runs in name order
    assert len(entropy["lines"]) == 5  # per run: raw + running mean; aepo's target
    # running mean over 2 iterations: [0.2, (0.2 + 0.1) / 2, (0.1 + 0.12) / 2]
    assert lines(entropy, "aepo") == [([0.0, 1.0, 2.0], [0.2, 0.15, 0.11])]
    assert lines(entropy, "grpo") == [([0.0, 1.0, 2.0], [0.2, 0.15, 0.075])]
    assert lines(entropy, None, linestyle="--") == [([0.0, 1.0], [0.1, 0.1])]  # aepo's target only
    raw = lines(entropy, None, linestyle="-")
    assert raw == [([0.0, 1.0, 2.0], [0.2, 0.1, 0.12]), ([0.0, 1.0, 2.0], [0.2, 0.1, 0.05])]
    (reward,) = figures["reward"]["axes"]
    assert (reward["ylabel"], reward["legend"], len(reward["lines"])) == ("policy-batch reward", ["aepo", "grpo"], 4)
    assert lines(reward, "grpo") == [([0.0, 1.0, 2.0], [0.4, 0.4, 0.45])]
    (accuracy,) = figures["eval_accuracy"]["axes"]
    assert accuracy["ylabel"] == "held-out accuracy" and accuracy["legend"] == ["aepo"]
    # evaluations as points, from the base policy's (-1) on, on the whole scale of a fraction
    assert lines(accuracy, "aepo", marker="o") == [([-1.0, 0.0, 1.0], [0.25, 0.3, 0.4])]
    assert len(accuracy["lines"]) == 1
    assert accuracy["xlabel"] == "iteration (-1: the base policy)" and accuracy["ylim"] == [0.0, 1.02]
    assert all(not fig["cut_titles"] for fig in figures.values())


def test_markdown_table_has_one_cell_per_column():
    """The |H-H*|/H* head is escaped, so every line has as many cells as the delimiter line."""
    from aepo_core.pipeline.compare import TABLE, format_table

    rows = [{"run": "a", "algorithm": "aepo", "target": 0.1, "mean_rel_dev": 0.05}]
    lines = format_table(rows, markdown=True).splitlines()
    cells = [len([c for c in line.replace("\\|", "").split("|")[1:-1]]) for line in lines]
    assert cells == [len(TABLE)] * len(lines) and "\\|H-H*\\|/H*" in lines[0]


def test_compare_errors_are_one_line_and_create_nothing(tmp_path):
    """A mistyped store is refused before MLflow creates it; unknown run ids and malformed filters
    are one plain sentence (ValueError, which the CLI prints with exit 2), not MLflow's traceback."""
    from mlflow.tracking import MlflowClient

    from aepo_core.pipeline.compare import compare_runs

    missing = tmp_path / "nope" / "mlflow.db"
    with pytest.raises(ValueError, match="no MLflow store at"):
        compare_runs(f"sqlite:///{missing}", tmp_path / "out")
    assert not missing.parent.exists()
    with pytest.raises(ValueError, match="no MLflow store at"):
        compare_runs(f"file://{tmp_path / 'mlruns'}", tmp_path / "out")
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    client = MlflowClient(uri)  # a real store with one run in the default experiment name
    run = client.create_run(client.create_experiment("aepo"))
    client.log_metric(run.info.run_id, "entropy/nll", 0.1)
    with pytest.raises(ValueError, match="--run-id deadbeef: no such run"):
        compare_runs(uri, tmp_path / "out", run_ids=["deadbeef"])
    with pytest.raises(ValueError, match="is not a valid MLflow filter"):
        compare_runs(uri, tmp_path / "out", filter_string="tags.algorithm = = 'x")


def test_temperature_plot_draws_the_steps_taken(tmp_path):
    """Bang-bang's two-level temperature is drawn as it was chosen: no running mean inventing 0.96."""
    bb = history(rollout__regulariser_temperature=[1.2, 0.8, 0.8, 1.2, 0.8])
    figures = {}
    plot_histories({"bb": bb}, tmp_path, smooth=5, figures=figures)
    (temperature,) = figures["temperature"]["axes"]
    assert temperature["legend"] == ["bb"] and len(temperature["lines"]) == 1
    (line,) = temperature["lines"]
    assert line["drawstyle"] == "steps-post" and set(line["y"]) == {0.8, 1.2}
    assert line["x"] == [0.0, 1.0, 2.0, 3.0, 4.0] and line["y"] == [1.2, 0.8, 0.8, 1.2, 0.8]
