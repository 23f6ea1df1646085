"""The user's mistakes: one `error:` line naming the file/key/row and the fix, exit status 2, no
traceback (unless asked for), nothing half-created; configurations that would train nothing or
garbage refused (or warned about) when the run starts."""

from __future__ import annotations

import errno
import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

from aepo_core.config import load_config, save_config
from aepo_core.errors import UserError
from aepo_core.io.models import write_policy
from aepo_core.io.prompts import chat_prompt_ids
from aepo_core.pipeline.stages import init_run

REPO = Path(__file__).resolve().parents[1]


def _aepo(args: list[str], cwd: Path, **env_extra: str) -> subprocess.CompletedProcess:
    env = {k: v for k, v in os.environ.items() if k not in ("PREFECT_API_URL", "AEPO_DEBUG")}  # as a user would
    env.update(PREFECT_HOME=str(cwd / "prefect-home"), **env_extra)
    env["PYTHONPATH"] = os.pathsep.join([str(REPO), env.get("PYTHONPATH", "")])
    return subprocess.run([sys.executable, "-m", "aepo_core.cli", *args], cwd=cwd, env=env,
                          capture_output=True, text=True, timeout=3600)  # hang guard


def _jsonl(path: Path, rows: list[dict]) -> Path:
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def _rows(n: int) -> list[dict]:
    return [{"id": f"q{i}", "prompt": f"Add: {i} 2 3", "answer": str(i + 5)} for i in range(n)]


# ------------------------------------------------------------------------------ the command line
def _missing_dataset(tmp: Path):
    missing = tmp / "missing.jsonl"
    return (["run", "--run-dir", str(tmp / "r"), f"data.train={missing}", f"data.eval={missing}"],
            [f"error: dataset file not found: {missing}"])


def _run_dir_is_a_file(tmp: Path):
    (tmp / "notes.txt").write_text("not a run\n")
    return (["run", "--run-dir", str(tmp / "notes.txt")],
            [f"error: run directory {tmp / 'notes.txt'} is a file, not a directory: give a new or existing "
             "directory (--run-dir or run.name)"])


def _binary_config(tmp: Path):
    (tmp / "ckpt.yaml").write_bytes(bytes(range(256)) * 16)
    return (["run", "--run-dir", str(tmp / "r"), "--config", str(tmp / "ckpt.yaml")],
            [f"error: {tmp / 'ckpt.yaml'} is not a text file (a YAML config is expected)"])


def _run_dir_of_another_config(tmp: Path):
    run = tmp / "r"
    run.mkdir()
    save_config(load_config(None, ["rollout.n=4"]), run / "config.yaml")
    return (["run", "--run-dir", str(run), "rollout.n=6"],
            [f"error: {run / 'config.yaml'} holds this run's configuration, and the one asked for differs:",
             "  rollout.n: 4 (run) vs 6 (now)",
             f"to continue this run with its own configuration: aepo run --run-dir {run} "
             "(it has 30 iterations; add --iterations N to change that)",
             "for a different configuration use a new --run-dir (or run.name)"])


def _file_dataset_without_eval(tmp: Path):
    train = _jsonl(tmp / "train.jsonl", _rows(4))
    return (["run", "--run-dir", str(tmp / "r"), f"data.train={train}"],
            [f"error: data.eval is not set: the run evaluates every evaluation.every iterations and at the end, "
             f"and data.train={train} has no held-out split; set data.eval to a held-out file "
             f"(data.eval={train} evaluates on the training prompts)"])


def _group_of_one(tmp: Path):
    return (["run", "--run-dir", str(tmp / "r"), "algorithm.name=grpo", "rollout.n=1"],
            ["error: invalid configuration in override 'rollout.n=1':",
             "  key 'rollout.n': a group of one response per prompt has no advantage (loss 0, nothing is "
             "trained); set rollout.n to 2 or more (the default is 8) (got 1)"])


@pytest.mark.parametrize("case", [_missing_dataset, _run_dir_is_a_file, _binary_config, _run_dir_of_another_config,
                                  _file_dataset_without_eval, _group_of_one])
def test_a_user_mistake_is_a_few_plain_lines_with_status_2(case, tmp_path):
    args, expected = case(tmp_path)
    before = sorted(p.relative_to(tmp_path) for p in tmp_path.rglob("*"))
    config_before = (tmp_path / "r" / "config.yaml").read_bytes() if (tmp_path / "r" / "config.yaml").exists() else None
    done = _aepo(args, tmp_path)
    assert done.returncode == 2, done.stdout[-2000:] + done.stderr[-3000:]
    assert done.stderr.splitlines() == expected
    assert done.stdout == ""
    # nothing was created or changed (no empty run directory, no snapshot, the stored config as it was)
    after = sorted(p.relative_to(tmp_path) for p in tmp_path.rglob("*") if not p.is_relative_to(tmp_path / "prefect-home"))
    assert after == before
    if config_before is not None:
        assert (tmp_path / "r" / "config.yaml").read_bytes() == config_before


@pytest.mark.parametrize("how", [{"AEPO_DEBUG": "1"}, {"flag": "--debug"}])
def test_the_traceback_is_shown_when_asked_for(how, tmp_path):
    args, _ = _missing_dataset(tmp_path)
    if "flag" in how:
        done = _aepo(args[:1] + [how["flag"]] + args[1:], tmp_path)
    else:
        done = _aepo(args, tmp_path, **how)
    assert done.returncode == 1
    assert "Traceback" in done.stderr and "DatasetError" in done.stderr


def test_a_user_error_inside_the_flow_is_one_line(tmp_path):
    """The train flow itself (as a deployment or a script calls it) refusing a missing dataset: the
    CLI's handler prints one line, Prefect's ~150-line traceback log is dropped."""
    missing = tmp_path / "missing.jsonl"
    script = tmp_path / "inflow.py"
    script.write_text(textwrap.dedent(f"""
        from aepo_core.cli import _quiet_prefect, app

        @app.command("train-flow")
        def train_flow() -> None:
            _quiet_prefect()
            from flows.train import train
            train(run_dir={str(tmp_path / 'r')!r}, overrides=["data.train={missing}", "data.eval={missing}"])

        app()
    """))
    env = dict(os.environ, PREFECT_HOME=str(tmp_path / "prefect-home"))
    env["PYTHONPATH"] = os.pathsep.join([str(REPO), env.get("PYTHONPATH", "")])
    env.pop("PREFECT_API_URL", None)
    env.pop("AEPO_DEBUG", None)
    done = subprocess.run([sys.executable, str(script), "train-flow"], cwd=tmp_path, env=env,
                          capture_output=True, text=True, timeout=3600)  # hang guard
    assert done.returncode == 2, done.stderr[-3000:]
    assert "Traceback" not in done.stderr + done.stdout
    assert done.stderr.splitlines()[-1] == f"error: dataset file not found: {missing}"
    assert len((done.stdout + done.stderr).splitlines()) <= 3
    assert not (tmp_path / "r").exists()


# ------------------------------------------------------------------------------ starting a run
@pytest.fixture(scope="module")
def tiny_policy(tmp_path_factory, tokenizer, tiny_model) -> Path:
    """A real HF folder with a 512-token context (max_position_embeddings), fast to load."""
    folder = tmp_path_factory.mktemp("tiny-policy")
    write_policy(tiny_model, tokenizer, folder)
    assert json.loads((folder / "config.json").read_text())["max_position_embeddings"] == 512
    return folder


def _long_prompt_file(tmp_path: Path) -> Path:
    rows = _rows(3)
    rows[1] = {"id": "long-1", "prompt": "Add: " + " ".join(str(i % 9 + 1) for i in range(700)), "answer": "1"}
    return _jsonl(tmp_path / "long.jsonl", rows)


def test_a_prompt_longer_than_the_context_is_refused_naming_it(tmp_path, tiny_policy, tokenizer):
    data = _long_prompt_file(tmp_path)
    prompt = json.loads(data.read_text().splitlines()[1])["prompt"]
    length = len(chat_prompt_ids(tokenizer, prompt))
    assert length > 512
    cfg = load_config(None, [f"model.path={tiny_policy}", f"data.train={data}", f"data.eval={data}", "data.id_column=id"])
    with pytest.raises(UserError) as err:
        init_run(cfg, tmp_path / "r", log=None)
    assert str(err.value) == (
        f"prompt 'long-1' of the train split ({data}) is {length:,} tokens (chat template and data.prompt_suffix "
        f"included); with rollout.max_new_tokens=48 it does not fit the model's context of 512 tokens "
        f"(max_position_embeddings of {tiny_policy}); 1 of 3 train prompts are longer than 464 tokens: drop them "
        "from the file, shorten data.prompt_suffix, lower rollout.max_new_tokens, or use a model with a longer context"
    )
    assert not (tmp_path / "r").exists()


def test_prompt_plus_response_exactly_at_the_context_fits_one_more_token_does_not(tmp_path, tiny_policy, tokenizer):
    rows = _rows(3)
    rows[2]["prompt"] = "Add: " + " ".join(str(i % 9 + 1) for i in range(150))
    data = _jsonl(tmp_path / "d.jsonl", rows)
    longest = max(len(chat_prompt_ids(tokenizer, r["prompt"])) for r in rows)
    common = [f"model.path={tiny_policy}", f"data.train={data}", f"data.eval={data}", "data.id_column=id",
              "rollout.prompts_per_batch=3"]
    fits = load_config(None, [*common, f"rollout.max_new_tokens={512 - longest}"])
    init_run(fits, tmp_path / "fits", log=None)
    assert (tmp_path / "fits" / "config.yaml").is_file()
    # the evaluation's own length is checked too
    over = load_config(None, [*common, f"evaluation.max_new_tokens={512 - longest + 1}"])
    with pytest.raises(UserError, match=rf"prompt 'q2' of the eval split .* is {longest} tokens.*evaluation.max_new_tokens={512 - longest + 1}"):
        init_run(over, tmp_path / "over", log=None)
    assert not (tmp_path / "over").exists()


def test_more_prompts_per_batch_than_the_dataset_is_warned_with_both_numbers(tmp_path, tiny_policy):
    data = _jsonl(tmp_path / "five.jsonl", _rows(5))
    lines: list[str] = []
    common = [f"model.path={tiny_policy}", f"data.train={data}", f"data.eval={data}", "data.id_column=id"]
    init_run(load_config(None, [*common, "rollout.prompts_per_batch=5"]), tmp_path / "five", log=lines.append)
    assert lines == []
    init_run(load_config(None, [*common, "rollout.prompts_per_batch=8"]), tmp_path / "eight", log=lines.append)
    assert lines == [
        f"warning: rollout.prompts_per_batch=8 is larger than the train split (5 prompts in {data}): every batch "
        "repeats prompts; set rollout.prompts_per_batch to at most 5"
    ]
    assert (tmp_path / "eight" / "config.yaml").is_file()  # a warning, not a refusal


def test_a_file_dataset_without_eval_is_refused_before_anything_is_written(tmp_path, tiny_policy):
    data = _jsonl(tmp_path / "train.jsonl", _rows(4))
    cfg = load_config(None, [f"model.path={tiny_policy}", f"data.train={data}"])
    with pytest.raises(UserError, match=r"^data\.eval is not set: .*set data\.eval to a held-out file"):
        init_run(cfg, tmp_path / "r", log=None)
    assert not (tmp_path / "r").exists()


@pytest.mark.parametrize("existed", [False, True])
def test_a_start_that_fails_while_writing_leaves_nothing_behind(existed, tmp_path, tiny_policy, monkeypatch):
    import aepo_core.pipeline.stages as stages

    data = _jsonl(tmp_path / "d.jsonl", _rows(4))
    root = tmp_path / "r"
    if existed:
        root.mkdir()
        (root / "notes.txt").write_text("mine\n")

    def disk_full(*args, **kwargs):
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(stages, "save_config", disk_full)
    cfg = load_config(None, [f"model.path={tiny_policy}", f"data.train={data}", f"data.eval={data}",
                             "rollout.prompts_per_batch=4"])
    from aepo_core.atomic import DiskFull

    with pytest.raises(DiskFull, match="no space left on device"):  # the full disk, said in one line
        init_run(cfg, root, log=None)
    if existed:  # the user's folder keeps what it held, and only that
        assert sorted(p.name for p in root.iterdir()) == ["notes.txt"]
    else:
        assert not root.exists()


def test_help_shows_flags_without_a_type_and_the_run_dir_default_as_the_readme_does():
    from typer.testing import CliRunner

    from aepo_core.cli import app

    result = CliRunner().invoke(app, ["run", "--help"])
    assert result.exit_code == 0
    assert "<bool>" not in result.output and "--progress / --no-progress" in result.output
    assert "runs/aepo-h0.15-1a2b3c4d" in " ".join(result.output.split())
