import json

import pytest

from aepo_core.config import load_config
from aepo_core.pipeline.rundir import MANIFEST, RunDir, StageNotReady
from aepo_core.pipeline.stages import PIPELINE, stage_config_digest


def test_publish_is_atomic_and_writes_the_manifest_last(tmp_path):
    run = RunDir(tmp_path)
    with run.publish(0, "reward", {"rollout": "abc"}, {"p": 1}) as (tmp, metrics):
        (tmp / "rewards.parquet").write_bytes(b"data")
        metrics["reward_mean"] = 0.5
        assert not (tmp / MANIFEST).exists()
        assert not run.stage_dir(0, "reward").exists()  # nothing under the final name yet
    manifest = json.loads((run.stage_dir(0, "reward") / MANIFEST).read_text())
    assert manifest["upstream"] == {"rollout": "abc"} and manifest["metrics"] == {"reward_mean": 0.5}
    assert manifest["params"] == {"p": 1} and len(manifest["digest"]) == 64
    assert run.is_complete(0, "reward", {"rollout": "abc"})
    assert not run.is_complete(0, "reward", {"rollout": "changed"})


def test_a_crash_mid_stage_leaves_the_previous_version_and_no_debris(tmp_path):
    run = RunDir(tmp_path)
    with run.publish(0, "reward", {"rollout": "v1"}) as (tmp, _):
        (tmp / "rewards.parquet").write_bytes(b"v1")
    with pytest.raises(RuntimeError), run.publish(0, "reward", {"rollout": "v2"}) as (tmp, _):
        (tmp / "rewards.parquet").write_bytes(b"half")
        raise RuntimeError("killed")
    assert (run.stage_dir(0, "reward") / "rewards.parquet").read_bytes() == b"v1"
    assert run.manifest(0, "reward")["upstream"] == {"rollout": "v1"}
    assert [p.name for p in run.stage_dir(0, "reward").parent.iterdir()] == ["reward"]


def test_digest_changes_with_content_and_missing_stage_is_named(tmp_path):
    run = RunDir(tmp_path)
    digests = []
    for content in (b"a", b"b", b"a"):
        with run.publish(1, "prepare", {}) as (tmp, _):
            (tmp / "prompts.parquet").write_bytes(content)
        digests.append(run.digest(1, "prepare"))
    assert digests[0] != digests[1] and digests[0] == digests[2]
    with pytest.raises(StageNotReady, match="iter_0001/rollout"):
        run.digest(1, "rollout")
    with pytest.raises(ValueError, match="bad stage name"):
        run.stage_dir(0, "../rollouts")  # which stages exist is the pipeline's: stages.upstream refuses "rollouts"
    from aepo_core.config import load_config
    from aepo_core.pipeline.stages import upstream

    with pytest.raises(ValueError, match="unknown stage 'rollouts'"):
        upstream(run, load_config(None, []), 0, "rollouts")


def test_unreadable_manifest_counts_as_not_done(tmp_path):
    run = RunDir(tmp_path)
    run.stage_dir(0, "prepare").mkdir(parents=True)
    (run.stage_dir(0, "prepare") / MANIFEST).write_text("{not json")
    assert run.manifest(0, "prepare") is None


@pytest.mark.parametrize(
    ("override", "stale"),
    [
        ("data.verifier=math", {"reward", "evaluate"}),
        ("data.math_answer=boxed_or_last_number", {"reward", "evaluate"}),
        ("evaluation.n=16", {"evaluate"}),
        ("trainer.lr=0.01", {"update"}),
        ("algorithm.target_entropy=0.9", {"rollout", "update", "entropy"}),
        ("rollout.prompts_per_batch=4", {"prepare", "rollout"}),
    ],
)
def test_a_config_change_makes_exactly_the_stages_that_read_it_stale(override, stale):
    before, after = load_config(None), load_config(None, [override])
    changed = {s for s in PIPELINE if stage_config_digest(before, s) != stage_config_digest(after, s)}
    assert changed == stale


def test_in_order_regulariser_sampling_makes_the_rollout_read_the_verifier():
    """It verifies the tempered rows to know where to stop sampling, so there (only) the verifier is
    the rollout's key too."""
    in_order = ["rollout.regulariser_sampling=in_order"]
    before, after = load_config(None, in_order), load_config(None, [*in_order, "data.verifier=math"])
    changed = {s for s in PIPELINE if stage_config_digest(before, s) != stage_config_digest(after, s)}
    assert changed == {"rollout", "reward", "evaluate"}


def test_a_reruns_overrides_apply_from_its_iteration_on():
    """config_version replays the change records: each sets its keys from its iteration on, a later
    record wins, and the starting values come back by undoing the records newest first."""
    from aepo_core.config import config_version, override_changes

    start = load_config(None)
    first = load_config(None, ["data.verifier=math"])  # rerun at iteration 3
    second = load_config(None, ["data.verifier=math", "evaluation.n=16", "trainer.lr=0.002"])  # rerun at 1
    records = [
        {"from_iteration": 3, "changes": override_changes(start, first, ["data.verifier=math"])},
        {"from_iteration": 1, "changes": override_changes(first, second, ["evaluation.n=16", "trainer.lr=0.002"])},
    ]
    assert records[0]["changes"] == {"data.verifier": ["synthetic", "math"]}
    seen = [(c.data.verifier, c.evaluation.n, c.trainer.lr) for c in (config_version(second, records, i) for i in range(5))]
    assert seen == [("synthetic", 8, start.trainer.lr), ("synthetic", 16, 0.002), ("synthetic", 16, 0.002),
                    ("math", 16, 0.002), ("math", 16, 0.002)]
    assert config_version(second, records, None) is second
    # a later rerun that sets a value back from an earlier iteration on wins there, not before it
    third = load_config(None, ["evaluation.n=16", "trainer.lr=0.002"])
    records.append({"from_iteration": 4, "changes": override_changes(second, third, ["data.verifier=synthetic"])})
    assert [config_version(third, records, i).data.verifier for i in range(6)] == [
        "synthetic", "synthetic", "synthetic", "math", "synthetic", "synthetic"]
    # an override equal to the latest value still says "from here on": it is recorded
    assert override_changes(third, third, ["evaluation.n=16"]) == {"evaluation.n": [16, 16]}
    # records written before versioning carry no changes: already in config.yaml, for every iteration
    assert config_version(start, [{"rerun": "reward@0", "overrides": ["evaluation.n=8"]}], 0) is start


def test_execution_only_keys_are_the_latest_configs_for_every_iteration():
    """A rerun that recorded trainer.nproc=2 from iteration 3, then a resume on 1 process: every
    iteration, the rerun's included, runs on 1 (how a stage runs is not what it computed)."""
    from aepo_core.config import config_version, override_changes

    start = load_config(None)
    two = load_config(None, ["trainer.nproc=2", "rollout.data_parallel=2"])
    lr = load_config(None, ["trainer.nproc=2", "rollout.data_parallel=2", "trainer.lr=0.002"])
    records = [
        {"from_iteration": 3, "changes": override_changes(start, two, ["trainer.nproc=2", "rollout.data_parallel=2"])},
        {"from_iteration": 7, "changes": override_changes(two, lr, ["trainer.lr=0.002"])},
    ]
    resumed = load_config(None, ["trainer.lr=0.002"])  # the run's config.yaml after `trainer.nproc=1` etc.
    seen = [(c.trainer.nproc, c.rollout.data_parallel, c.trainer.lr) for c in (config_version(resumed, records, i) for i in (1, 5, 8))]
    assert seen == [(1, 1, start.trainer.lr), (1, 1, start.trainer.lr), (1, 1, 0.002)]
