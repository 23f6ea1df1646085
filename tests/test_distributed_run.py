"""End to end on 2 processes: `aepo run trainer.nproc=2 rollout.data_parallel=2` for 2 iterations on
the real base policy (the update stage under torchrun, FSDP2 on CPU; rollout and evaluation on 2 HF
engine processes), its artifacts intact and complete, the sampled tables those of one process, then
the same run resumed for a third iteration on 1 process: nothing done before is recomputed and the
single-process update continues from the 2-rank optimiser state. The same run on a local Ray cluster
(run.ray_address: the update under Ray Train, the engines as Ray actors) equals the torchrun one."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

from aepo_core.config import load_config
from aepo_core.io.sharded import OPTIMIZER_DCP, OPTIMIZER_FILE
from aepo_core.pipeline.rundir import BASE_ITERATION, RunDir
from aepo_core.pipeline.stages import STAGES, is_stage_complete, stages_of

pytestmark = pytest.mark.slow

def aepo_run(args: list[str], tmp_path) -> subprocess.CompletedProcess:
    env = dict(os.environ, PREFECT_HOME=str(tmp_path / "prefect-home"), OMP_NUM_THREADS="1")
    env.pop("PREFECT_API_URL", None)
    done = subprocess.run([sys.executable, "-m", "aepo_core.cli", "run", "--no-progress", *args], env=env,
                          capture_output=True, text=True, timeout=3600)  # a hang guard, not a speed check
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-5000:]
    return done


def same_tables(run: RunDir, single, tmp_path) -> bool:
    """Iteration 0's rollout and the base evaluation recomputed in this process (a new run of the
    same config on one engine) against the run's: the same rows, tokens and texts, the log-probs to
    float32 rounding (each engine's batch differs in size, and so do its kernels)."""
    import numpy as np
    import pyarrow.parquet as pq

    from aepo_core.pipeline import stages
    from aepo_core.pipeline.rundir import BASE_ITERATION

    copy = stages.init_run(single, tmp_path / "single", log=lambda *a: None)
    try:
        for stage, i in (("prepare", 0), ("rollout", 0), ("evaluate", BASE_ITERATION)):
            stages.PIPELINE[stage].run(copy, i)
    finally:
        copy.release_writer()
    for stage, i, name in (("rollout", 0, "rollouts.parquet"), ("evaluate", BASE_ITERATION, "eval.parquet")):
        ours, theirs = (pq.read_table(r.stage_dir(i, stage) / name) for r in (copy, run))
        floats = [c for c in ours.column_names if c in ("logprobs", "nll")]
        assert ours.drop(floats).equals(theirs.drop(floats)), stage
        for c in floats:
            for a, b in zip(ours.column(c).to_pylist(), theirs.column(c).to_pylist(), strict=True):
                assert np.allclose(a, b, atol=1e-4), (stage, c)
    return True


TWO_RANKS = ["trainer.nproc=2", "rollout.data_parallel=2", "run.keep_optimizer_states=2", "run.keep_policies_every=1"]


@pytest.fixture(scope="module")
def two_rank_run(base_policy_dir, tmp_path_factory, tiny_overrides) -> tuple[Path, list[str]]:
    """A 2-iteration run on 2 torchrun ranks: (its run directory, the overrides it was started with)."""
    tmp_path = tmp_path_factory.mktemp("torchrun")
    run_dir = tmp_path / "runs" / "two"
    overrides = [*tiny_overrides(base_policy_dir, tmp_path / "runs"), *TWO_RANKS]
    first = aepo_run(["--run-dir", str(run_dir), "--iterations", "2", *overrides], tmp_path)
    assert "finished 2 iterations" in first.stdout
    return run_dir, overrides


def test_a_run_on_two_ranks_completes_validates_and_resumes_on_one(two_rank_run, tmp_path):
    run_dir, _ = two_rank_run
    run = RunDir(run_dir)
    cfg = run.config()
    assert cfg.trainer.nproc == 2 and cfg.rollout.data_parallel == 2
    for i in range(2):
        for stage in stages_of(cfg, i):
            assert is_stage_complete(run, cfg, i, stage), (i, stage)
            assert run.damage(i, stage) is None, (i, stage)
        update = run.stage_dir(i, "update")
        assert (update / OPTIMIZER_DCP / ".metadata").is_file() and not (update / OPTIMIZER_FILE).exists()
        assert (update / "policy" / "model.safetensors").is_file()
        metrics = run.manifest(i, "update")["metrics"]
        assert metrics["actor/optimizer_steps"] >= 1 and metrics["entropy/nll"] > 0

    # the 2 engine processes sampled what one samples: iteration 0's rollout and the base's evaluation
    # again in this process, from the same files and seeds
    single = load_config(run.config_path, ["rollout.data_parallel=1", "trainer.nproc=1"])
    assert same_tables(run, single, tmp_path)

    # resumed on one process: the execution-only keys change no digest, so iterations 0-1 stay done
    done_before = {p: p.stat().st_mtime_ns for p in run_dir.rglob("_SUCCESS.json")}
    resumed = aepo_run(["--run-dir", str(run_dir), "--iterations", "3", "trainer.nproc=1", "rollout.data_parallel=1"],
                       tmp_path)
    assert "done before: prepare, rollout, reward, update, entropy" in resumed.stdout
    assert {p: p.stat().st_mtime_ns for p in done_before} == done_before
    assert load_config(run.config_path).trainer.nproc == 1
    assert (run.stage_dir(2, "update") / OPTIMIZER_FILE).is_file()  # read the 2-rank DCP state, wrote its own
    for stage in STAGES:
        if stage in stages_of(run.config(2), 2):
            assert run.damage(2, stage) is None, stage


# ------------------------------------------------------------------------------------------ Ray
@pytest.fixture
def ray_cluster():
    """A local Ray cluster of 2 CPUs (`ray start --head`), its address; stopped afterwards."""
    from aepo_core.pipeline.ray_cluster import local_cluster

    with local_cluster(cpus=2) as address:
        yield address


def test_the_ray_path_equals_torchrun(two_rank_run, ray_cluster, tmp_path):
    """`aepo run ... run.ray_address=HOST:PORT` on a local Ray cluster (2 CPUs): the update under Ray
    Train's TorchTrainer on 2 workers, rollout and evaluation on 2 engine actors, 2 iterations (the
    second resumes the optimiser state the Ray workers wrote and samples the updated policy). Both
    iterations and the base evaluation equal the torchrun run's to the bit (tables, weights, update
    metrics); a failed worker is the stage's error."""
    import numpy as np
    import pyarrow.parquet as pq
    from safetensors.torch import load_file

    from aepo_core.pipeline import stages
    from aepo_core.pipeline.distributed import DistributedStageFailed
    from aepo_core.pipeline.ray_cluster import launch_on_ray

    torchrun_dir, overrides = two_rank_run
    ray_dir = tmp_path / "runs" / "ray"
    done = aepo_run(["--run-dir", str(ray_dir), "--iterations", "2", *overrides, f"run.ray_address={ray_cluster}"],
                    tmp_path)
    assert "finished 2 iterations" in done.stdout
    ours, theirs = RunDir(ray_dir), RunDir(torchrun_dir)
    compared = [(BASE_ITERATION, "evaluate", "eval.parquet"), (1, "evaluate", "eval.parquet")] + [
        (i, stage, name) for i in (0, 1) for stage, name in (("prepare", "prompts.parquet"), ("rollout", "rollouts.parquet"),
                                                             ("reward", "rewards.parquet"), ("update", "update_batch.parquet"))]
    for i, stage, name in compared:
        assert pq.read_table(ours.stage_dir(i, stage) / name).equals(pq.read_table(theirs.stage_dir(i, stage) / name)), (i, stage)
    # sampled by the engine actors, trained by Ray Train's workers (which write the DCP optimiser folder)
    for i, stage in ((BASE_ITERATION, "evaluate"), (0, "rollout"), (1, "rollout"), (1, "evaluate")):
        assert ours.manifest(i, stage)["params"]["sampled_by"] == "RayEngine", (i, stage)
        assert theirs.manifest(i, stage)["params"]["sampled_by"] == "DataParallelEngine", (i, stage)
    timing = ("seconds", "tokens_per_s", "duration")
    for i in (0, 1):
        a, b = (load_file(r.stage_dir(i, "update") / "policy" / "model.safetensors") for r in (ours, theirs))
        assert a.keys() == b.keys() and all(np.array_equal(a[k].numpy(), b[k].numpy()) for k in a), i
        assert (ours.stage_dir(i, "update") / OPTIMIZER_DCP / ".metadata").is_file()
        metrics = [{k: v for k, v in r.manifest(i, "update")["metrics"].items() if not any(t in k for t in timing)}
                   for r in (ours, theirs)]
        assert metrics[0] == metrics[1], i
        for stage in stages_of(ours.config(), i):
            assert ours.damage(i, stage) is None, (i, stage)

    # a worker's exception is the stage's error: iteration 5 has no rollouts to train on
    with pytest.raises(DistributedStageFailed, match=r"update stage of iteration 5 of .* failed on 2 Ray Train workers "
                                                     r".*StageNotReady: .*iter_0005.prepare has no _SUCCESS.json"):
        launch_on_ray(stages.update, ours.config(0), ray_dir, 5, 2)
    # a rank compares the digests its launcher checked with the run directory it sees
    with pytest.raises(DistributedStageFailed, match=r"differs from what the flow checked for update of iteration 1 "
                                                     r"\(rollout\): is the run directory on a filesystem every node shares"):
        launch_on_ray(stages.update, ours.config(1), ray_dir, 1, 2,
                      upstream={**stages.upstream(ours, ours.config(1), 1, "update"), "rollout": "0" * 64})
