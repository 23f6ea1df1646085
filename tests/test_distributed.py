"""The update on 2 processes (torchrun, gloo, FSDP2 on CPU) equals the single-process update: loss,
grad norm, every metric and every weight (fp32, <= 1e-5), on an even batch, on an uneven one
(rows not divisible by 2, varying lengths, padding passes), and across a resume from 2 ranks to 1
and from 1 to 2 (the optimiser state as a torch.distributed.checkpoint folder, and as optimizer.pt).
The end-to-end run on 2 ranks is in test_distributed_run.py."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from conftest import VOCAB, tiny_qwen

from aepo_core.config import TrainerConfig
from aepo_core.core.batch import SequenceBatch
from aepo_core.core.ranks import Ranks, deal, micro_batch_rows
from aepo_core.core.update import _partition
from aepo_core.io.sharded import OPTIMIZER_DCP, OPTIMIZER_FILE

HERE = Path(__file__).parent
TRAINER = {"dtype": "float32", "device": "cpu", "lr": 1e-2, "max_tokens_per_micro_batch": None}

pytestmark = pytest.mark.usefixtures("one_thread")


def make_batch(responses, rewards, temperature=1.0, seed=0, prompt_len=3):
    g = torch.Generator().manual_seed(seed)
    prompts = [torch.randint(1, VOCAB, (prompt_len,), generator=g).tolist() for _ in responses]
    return SequenceBatch.from_token_lists(prompts, responses, pad_id=0, rewards=rewards, temperatures=temperature)


def policy_batch():  # 4 prompts x 2 responses
    return make_batch([[4, 5, 6], [7, 8], [9, 10, 11, 12], [13], [14, 15, 16], [17, 18], [19, 20], [21, 22, 23]],
                      [1, 0, 1, 1, 0, 1, 0, 0], seed=1)


def regulariser_batch():  # 2 prompts x 2 responses at T = 1.2: two positives
    return make_batch([[24, 25], [26], [27, 28, 29], [30, 31, 3, 2]], [1, 0, 0, 1], 1.2, seed=2)


def uneven_batch():
    """3 prompts x 3 responses (9 rows: odd), response lengths 1..7, prompts of two lengths."""
    g = torch.Generator().manual_seed(3)
    lengths = [1, 7, 3, 5, 2, 6, 4, 1, 3]
    responses = [torch.randint(2, VOCAB, (n,), generator=g).tolist() for n in lengths]
    batch = make_batch(responses, [1, 0, 1, 0, 0, 1, 1, 1, 0], temperature=0.9, seed=4, prompt_len=4)
    return batch


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory) -> Path:
    folder = tmp_path_factory.mktemp("tiny")
    tiny_qwen(seed=5, tie_word_embeddings=True).save_pretrained(str(folder))  # tied, as the base policy
    return folder


def in_process(case: dict) -> dict:
    from distributed_case import run_case

    return run_case(case)


def on_ranks(case: dict, tmp_path: Path, nproc: int = 2) -> dict:
    """`case` on `nproc` torchrun ranks; a hang fails after the ranks' 120 s process-group timeout."""
    path = tmp_path / f"case-{os.urandom(4).hex()}.pt"
    case = {**case, "out": str(path.with_suffix(".out.pt"))}
    torch.save(case, path)
    env = {**os.environ, "OMP_NUM_THREADS": "1",
           "PYTHONPATH": os.pathsep.join([str(HERE.parent), str(HERE), os.environ.get("PYTHONPATH", "")])}
    done = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={nproc}",
                           str(HERE / "distributed_case.py"), str(path)], env=env, capture_output=True, text=True,
                          timeout=600)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-5000:]
    out = torch.load(case["out"], weights_only=False)
    assert out["world"] == nproc
    return out


def assert_same(a: dict, b: dict, atol: float = 1e-5) -> None:
    """Every metric of every step (relative 1e-5) and every weight (absolute `atol`) agree."""
    assert len(a["metrics"]) == len(b["metrics"])
    for ma, mb in zip(a["metrics"], b["metrics"], strict=True):
        assert set(ma) == set(mb)
        for key in ma:
            assert mb[key] == pytest.approx(ma[key], rel=1e-5, abs=1e-6, nan_ok=True), key
    assert set(a["weights"]) == set(b["weights"])
    for name, weight in a["weights"].items():
        diff = (weight.float() - b["weights"][name].float()).abs().max().item()
        assert diff <= atol, (name, diff)


def case_of(model_dir: Path, **kw) -> dict:
    return {"model": str(model_dir), "policy_batch": policy_batch(), "regulariser_batch": regulariser_batch(),
            "algorithm": {"name": "aepo", "reinforce_sample_num": 2, "target_entropy": 5.0},
            "trainer": TRAINER, "group_size": 2, "steps": 1, **kw}


def test_dealing_gives_every_rank_the_same_number_of_passes():
    micro = [[0, 1], [2], [3, 4], [5]]
    tokens = [True, False, True, True]  # [2] has no response token: no rank runs it
    shares = [deal(micro, tokens, Ranks(r, 2)) for r in range(2)]
    assert [len(s) for s in shares] == [2, 2]
    assert shares[0] == [([0, 1], True), ([5], True)] and shares[1] == [([3, 4], True), ([0], False)]
    assert deal(micro, tokens, Ranks()) == [([0, 1], True), ([3, 4], True), ([5], True)]
    assert micro_batch_rows(9, None, Ranks(0, 2)) == 5 and micro_batch_rows(9, 2, Ranks(0, 2)) == 2
    assert micro_batch_rows(9, None, Ranks()) is None


def test_two_ranks_equal_one_process(model_dir, tmp_path):
    """AEPO with REINFORCE rows, 2 mini-batches (pi_old's separate pass), 2 steps (AdamW's moments)."""
    case = case_of(model_dir, trainer={**TRAINER, "mini_batches": 2}, steps=2)
    one, two = in_process(case), on_ranks(case, tmp_path)
    assert one["metrics"][0]["aepo/k"] == 2 and one["metrics"][0]["actor/optimizer_steps"] == 2
    assert two["metrics"][1]["loss/total"] == pytest.approx(one["metrics"][1]["loss/total"], rel=1e-5)
    assert two["metrics"][1]["actor/grad_norm"] == pytest.approx(one["metrics"][1]["actor/grad_norm"], rel=1e-5)
    assert_same(one, two)


def test_uneven_batch_does_not_hang_and_matches(model_dir, tmp_path):
    """9 rows of lengths 1..7 at a token budget that makes an odd number of micro-batches, so one
    rank runs a padding pass; policy rows at T = 0.9 (the tempered log-probs)."""
    case = case_of(model_dir, policy_batch=uneven_batch(), regulariser_batch=None, group_size=3,
                   algorithm={"name": "grpo"}, trainer={**TRAINER, "max_tokens_per_micro_batch": 20})
    batch = case["policy_batch"]
    micro = _partition(batch.attention_mask.sum(1).tolist(), TrainerConfig(**case["trainer"]), Ranks(0, 2))[0]
    assert len(micro) % 2 == 1  # an odd number of micro-batches: rank 1 runs a padding pass
    assert [counts for _, counts in deal(micro, [True] * len(micro), Ranks(1, 2))][-1] is False
    one, two = in_process(case), on_ranks(case, tmp_path)
    assert one["metrics"][0]["batch/rows"] == 9
    assert_same(one, two)


def test_resume_across_world_sizes_matches_an_uninterrupted_run(model_dir, tmp_path):
    """2 steps in one process against: 1 step on 2 ranks (optimizer/ as DCP), then 1 step in one
    process from it; and 1 step in one process (optimizer.pt), then 1 step on 2 ranks from it."""
    uninterrupted = in_process(case_of(model_dir, steps=2))
    uninterrupted["metrics"] = uninterrupted["metrics"][1:]

    first_on_two = tmp_path / "two"
    on_ranks(case_of(model_dir, save_to=str(first_on_two)), tmp_path)
    assert (first_on_two / OPTIMIZER_DCP / ".metadata").is_file()
    two_then_one = in_process(case_of(first_on_two / "policy", resume_from=str(first_on_two)))
    assert_same(uninterrupted, two_then_one)

    first_on_one = tmp_path / "one"
    in_process(case_of(model_dir, save_to=str(first_on_one)))
    assert (first_on_one / OPTIMIZER_FILE).is_file()
    one_then_two = on_ranks(case_of(first_on_one / "policy", resume_from=str(first_on_one)), tmp_path)
    assert_same(uninterrupted, one_then_two)


def test_nproc_is_execution_only_and_lora_is_refused(tmp_path):
    """trainer.nproc changes no digest (a run continues on another number of processes), a run
    directory resumes with it set on top of its stored config, and LoRA on N ranks is refused."""
    from aepo_core.config import ConfigError, load_config, save_config
    from aepo_core.pipeline.stages import STAGES, config_digest, stage_config_digest, start_config

    one, two = load_config(None, ["rollout.n=4"]), load_config(None, ["rollout.n=4", "trainer.nproc=2"])
    assert config_digest(one) == config_digest(two)
    assert all(stage_config_digest(one, s) == stage_config_digest(two, s) for s in STAGES)
    assert stage_config_digest(one, "update") != stage_config_digest(load_config(None, ["rollout.n=4", "trainer.lr=1"]),
                                                                     "update")
    save_config(two, tmp_path / "config.yaml")
    resumed = start_config(run_dir=tmp_path, overrides=["trainer.nproc=1"])
    assert resumed.trainer.nproc == 1 and resumed.rollout.n == 4  # the stored config, one key changed
    with pytest.raises(ConfigError, match="trainer.nproc > 1 with model.lora.enabled is not supported yet"):
        load_config(None, ["trainer.nproc=2", "model.lora.enabled=true"])


def test_a_failed_rank_is_the_stage_error_naming_run_and_iteration(tmp_path):
    from aepo_core.pipeline.distributed import DistributedStageFailed, launch_stage, root_cause

    assert root_cause("noise\nValueError: bad row 3\ntorch.distributed.elastic.multiprocessing.errors."
                      "ChildFailedError: \nmore") == "ValueError: bad row 3"
    missing = tmp_path / "no-run"  # no config.yaml: every rank fails reading it
    with pytest.raises(DistributedStageFailed, match=rf"the update stage of iteration 3 of {missing} failed on 2 processes "
                                                     r"\(torchrun exit status 1\): .*config"):
        launch_stage("update", missing, 3, 2)


@pytest.mark.parametrize(("overrides", "world", "where"), [
    ([], 1, {"update": "here", "rollout": "here", "evaluate": "here", "reward": "here"}),
    (["trainer.nproc=2"], 1, {"update": "torchrun", "rollout": "here", "evaluate": "here", "reward": "here"}),
    (["rollout.data_parallel=2"], 1, {"update": "here", "rollout": "torchrun", "evaluate": "torchrun", "reward": "here"}),
    (["trainer.nproc=2", "rollout.data_parallel=2"], 2, {"update": "here", "rollout": "here", "evaluate": "here"}),
    (["trainer.nproc=2", "rollout.data_parallel=3", "run.ray_address=127.0.0.1:6379"], 1,
     {"update": "ray_train", "rollout": "ray_actors", "evaluate": "ray_actors", "entropy": "here"}),
    (["run.ray_address=127.0.0.1:6379"], 1, {"update": "here", "rollout": "here", "evaluate": "here"}),
])
def test_placement_by_hand(overrides, world, where):
    """Where each stage runs, from the launching process (world 1) and from inside the ranks (world 2)."""
    from aepo_core.config import load_config
    from aepo_core.pipeline.distributed import placement

    cfg = load_config(None, overrides)
    assert {stage: placement(cfg, stage, world) for stage in where} == where


def test_a_finished_rank_exits_without_the_interpreters_finalization(tmp_path):
    """exit_rank: the status asked for, stdout and stderr flushed, and no finalization (an atexit
    handler stands for it: gloo's threads decref'ing tensors there abort the process, pytorch#190489)."""
    script = ("import atexit, sys\n"
              "from aepo_core.pipeline.stage_rank import exit_rank\n"
              "atexit.register(lambda: print('finalized'))\n"
              "print('written', end='')\n"
              "print('to stderr', end='', file=sys.stderr)\n"
              "exit_rank(3)\n")
    done = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=120)
    assert (done.returncode, done.stdout, done.stderr) == (3, "written", "to stderr")
