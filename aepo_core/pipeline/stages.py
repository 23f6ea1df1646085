"""The six stages of an iteration, as plain functions over the run directory (no Prefect in here).

    prepare -> rollout -> reward -> update -> entropy -> evaluate

Each stage reads the artifacts of earlier stages, writes its own through `RunDir.publish` (temporary
folder + rename, `_SUCCESS.json` last) and returns its metrics. `upstream(run, i, stage)` says what a
stage depends on; the flow skips a stage whose manifest records exactly those digests.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import math
import shutil
import socket
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import torch

from aepo_core.atomic import disk_full_error
from aepo_core.config import (
    ADDED_LATER,
    EXECUTION_ONLY,
    Config,
    config_version,
    load_config,
    override_changes,
    parse_override,
    save_config,
    with_execution_of,
)
from aepo_core.core.algorithms import Decision, decision_from_json, decision_to_json, make_algorithm
from aepo_core.core.batch import SequenceBatch
from aepo_core.core.ranks import Ranks
from aepo_core.core.update import autocast_dtype, entropy_ahead, make_optimizer, update_step
from aepo_core.errors import UserError
from aepo_core.io.engines import Completion, RolloutEngine, SamplingRequest, shared_engine
from aepo_core.io.engines.data_parallel import DataParallelEngine
from aepo_core.io.lora import ADAPTER, AdaptersDisabled, merge_into_base, save_adapter, trainable_lora
from aepo_core.io.models import load_policy, load_tokenizer, resolve_device, write_policy
from aepo_core.io.prompts import encode_prompts
from aepo_core.io.sharded import (
    OPTIMIZER_DCP,
    OPTIMIZER_FILE,
    barrier,
    full_state_dict,
    load_optimizer,
    save_optimizer,
    shard_policy,
)
from aepo_core.io.verifiers import make_verifier
from aepo_core.pipeline import retention
from aepo_core.pipeline.distributed import launch_stage, placement, stage_processes
from aepo_core.pipeline.evaluation import evaluate_model, write_source_names
from aepo_core.pipeline.retention import PrunedArtifact, pruned_need
from aepo_core.pipeline.rundir import (
    BASE_ITERATION,
    LOCK_FILE,
    DamagedStage,
    RunDir,
    StageNotReady,
    file_digest,
    folder_digest,
)
from aepo_core.pipeline.sources import task_metrics

POLICY, REGULARISER = "policy", "regulariser"


# ------------------------------------------------------------------------------------- the run
class ConfigMismatch(UserError):
    """An existing run directory was asked to continue with a different configuration."""


def digest_tree(cfg: Config) -> dict[str, Any]:
    """The config as the digests see it: its JSON tree without the keys added after runs existed
    that still hold the value they were added at (`aepo_core.config.ADDED_LATER`), so a run made
    before a key existed keeps its digests (its stages stay done, its default name stays), and
    without the execution-only keys whatever their value (`aepo_core.config.EXECUTION_ONLY`: how many
    processes compute a stage does not change what it computes)."""
    tree = cfg.model_dump(mode="json")
    for dotted in [*ADDED_LATER, *EXECUTION_ONLY]:
        *parents, leaf = dotted.split(".")
        node = tree
        for part in parents:
            node = node[part]
        if dotted in EXECUTION_ONLY or node.get(leaf) == ADDED_LATER[dotted]:
            node.pop(leaf, None)
    return tree


def config_digest(cfg: Config) -> str:
    """Digest of everything that shapes the artifacts (run length and naming excluded)."""
    tree = digest_tree(cfg)
    tree["run"], tree["tracking"] = {}, {}
    return hashlib.sha256(json.dumps(tree, sort_keys=True).encode()).hexdigest()[:16]


def stage_config_digest(cfg: Config, stage: str) -> str:
    tree = digest_tree(cfg)
    picked = {}
    for dotted in stage_keys(cfg, stage):
        node = tree
        try:
            for part in dotted.split("."):
                node = node[part]
        except KeyError:
            if dotted in ADDED_LATER or dotted in EXECUTION_ONLY:  # left out (digest_tree)
                continue
            raise
        picked[dotted] = node
    return hashlib.sha256(json.dumps(picked, sort_keys=True).encode()).hexdigest()[:16]


def stage_keys(cfg: Config, stage: str) -> tuple[str, ...]:
    """The config keys `stage` reads under `cfg`: its record's config_keys, and those it reads only
    in some configurations (`Stage.keys_when`)."""
    record = PIPELINE[stage]
    return record.config_keys + (record.keys_when(cfg) if record.keys_when else ())


def default_run_name(cfg: Config) -> str:
    return f"{make_algorithm(cfg.algorithm).run_name()}-{config_digest(cfg)[:8]}"


def _check_same_config(run: RunDir, cfg: Config) -> Config:
    """The stored (latest) config of an existing run; ConfigMismatch when `cfg` differs (run.iterations
    aside), naming each differing key, the rerun that set it, and the command that continues the run."""
    stored = run.config()
    if config_digest(stored) != config_digest(cfg):
        a, b = stored.flat(), cfg.flat()
        set_by = {key: record for record in run.config_history() for key in record.get("changes") or {}}
        diff = []
        for key in sorted(k for k in a if a.get(k) != b.get(k) and not k.startswith(("run.", "tracking."))):
            record = set_by.get(key)
            since = f", since `rerun-stage` {record['rerun']} at {record['at']}" if record else ""
            diff.append(f"{key}: {a.get(key)!r} (run{since}) vs {b.get(key)!r} (now)")
        raise ConfigMismatch(
            f"{run.config_path} holds this run's configuration, and the one asked for differs:\n  "
            + "\n  ".join(diff)
            + f"\nto continue this run with its own configuration: aepo run --run-dir {run.root}"
            + f" (it has {stored.run.iterations} iterations; add --iterations N to change that)"
            + "\nfor a different configuration use a new --run-dir (or run.name)"
        )
    return stored


def run_root(cfg: Config, run_dir: str | Path | None = None) -> Path:
    """Where the run of `cfg` lives: `run_dir`, or runs_root/<run.name or the default name>."""
    return Path(run_dir) if run_dir else Path(cfg.run.runs_root) / (cfg.run.name or default_run_name(cfg))


def init_run(cfg: Config, run_dir: str | Path | None = None, log=print) -> RunDir:
    """Create the run directory (config, dataset snapshot, starting policy) or reopen an existing one.

    Reopening checks that the stored config equals `cfg` except for `run.iterations`, so a resumed
    run never silently mixes two configurations. A new run is checked first (aepo_core.pipeline.preflight:
    data, prompt lengths, eval split) and a failed start leaves nothing behind. The caller becomes
    the run directory's one writer (RunDirBusy names another holder) and must `release_writer()`
    when done; leftovers of interrupted saves are removed."""
    from aepo_core.pipeline.preflight import check_machine, check_run_dir

    root = run_root(cfg, run_dir)
    run = RunDir(root)
    check_run_dir(root)
    check_machine(cfg)  # here too: a deployment's flow starts without the CLI's check_start
    created = not root.exists()
    lock_created = not (root / LOCK_FILE).exists()
    run.acquire_writer()
    try:
        for path in run.remove_stale_temporaries():
            log(f"removed {path} (left by an interrupted save)")
        return _init_run(run, cfg, log)
    except BaseException as exc:
        run.release_writer()
        full = disk_full_error(exc, root, root if created else None) if isinstance(exc, Exception) else None
        if created:  # a failed start leaves nothing behind
            shutil.rmtree(root, ignore_errors=True)
        elif lock_created and not run.config_path.is_file():  # the user's own folder keeps only its own files
            (root / LOCK_FILE).unlink(missing_ok=True)
        if full is not None:
            raise full from exc
        raise


def _init_run(run: RunDir, cfg: Config, log) -> RunDir:
    from aepo_core.pipeline.preflight import check_new_run, load_split_tables, resolve_base

    root = run.root
    if run.config_path.is_file():
        stored = _check_same_config(run, cfg)
        updated = stored
        if stored.run.iterations != cfg.run.iterations:
            updated = updated.model_copy(update={"run": cfg.run})
        before, now = stored.flat(), cfg.flat()
        if any(before[key] != now[key] for key in EXECUTION_ONLY):  # e.g. resumed on 1 rank
            updated = with_execution_of(updated, cfg)
        if updated is not stored:
            save_config(updated, run.config_path)
        return run
    tables = load_split_tables(cfg)  # refusals first: nothing is written before they pass
    base = resolve_base(cfg, log=log)
    check_new_run(cfg, tables, base, log=log)
    created = not root.exists()
    written = [run.root / "dataset", run.root / "base.json"]
    try:
        root.mkdir(parents=True, exist_ok=True)
        for split, table in tables.items():
            run.dataset_path(split).parent.mkdir(parents=True, exist_ok=True)
            pq.write_table(table, run.dataset_path(split))
        if base.exists():
            base = base.resolve()
            run.write_json("base.json", {"path": str(base), "digest": folder_digest(base)})
        else:  # a hub id: identified by name (pin a local copy for reproducible runs)
            run.write_json("base.json", {"path": str(base), "digest": f"hub:{base}"})
        save_config(cfg, run.config_path)  # written last: its presence marks an initialised run
    except BaseException:
        if created:
            shutil.rmtree(root, ignore_errors=True)
        else:
            for path in written:
                if path.is_dir():
                    shutil.rmtree(path, ignore_errors=True)
                else:
                    path.unlink(missing_ok=True)
        raise
    return run


def start_config(
    config: str | Path | None = None,
    run_dir: str | Path | None = None,
    iterations: int | None = None,
    overrides: list[str] | None = None,
) -> Config:
    """The config a start asks for: the run directory's stored one (when no config is given and the
    overrides set only execution-only keys, `EXECUTION_ONLY`, applied to it: `aepo run --run-dir X
    trainer.nproc=1` resumes X on one process), or the requested config."""
    extra = [f"run.iterations={iterations}"] if iterations else []
    execution_only = all(parse_override(text)[0] in EXECUTION_ONLY for text in overrides or [])
    if run_dir and RunDir(run_dir).config_path.is_file() and not config and execution_only:
        return load_config(RunDir(run_dir).config_path, list(overrides or []) + extra)
    return load_config(config, list(overrides or []) + extra)


def check_start(
    config: str | Path | None = None,
    run_dir: str | Path | None = None,
    iterations: int | None = None,
    overrides: list[str] | None = None,
    log=print,
) -> None:
    """Everything `open_run` would refuse, checked without writing anything (the CLI calls this
    before the flow starts, so a user's mistake is one line, not a flow failure)."""
    from aepo_core.pipeline.preflight import (
        check_machine,
        check_new_run,
        check_run_dir,
        load_split_tables,
        resolve_base,
    )

    cfg = start_config(config, run_dir, iterations, overrides)
    run = RunDir(run_root(cfg, run_dir))
    check_run_dir(run.root)
    check_machine(cfg)
    if run.config_path.is_file():
        _check_same_config(run, cfg)
        return
    tables = load_split_tables(cfg)
    check_new_run(cfg, tables, resolve_base(cfg, log=log), log=log)


def open_run(
    config: str | Path | None = None,
    run_dir: str | Path | None = None,
    iterations: int | None = None,
    overrides: list[str] | None = None,
    log=print,
) -> RunDir:
    """The run to train: an existing run directory reopened with its stored config (when no config
    or override is given), or `init_run` with the requested config (which must then match)."""
    return init_run(start_config(config, run_dir, iterations, overrides), run_dir, log=log)


def policy_dir(run: RunDir, iteration: int) -> Path:
    """The policy that samples iteration `iteration`: the previous update's output, or the base."""
    if iteration == 0:
        return Path(run.read_json("base.json")["path"])
    return run.stage_dir(iteration - 1, "update") / "policy"


def controller_decision(run: RunDir, cfg: Config, iteration: int) -> Decision:
    """The controller's decision for `iteration`: the previous entropy stage's controller.json (the
    one record of it), or for iteration 0 the algorithm's decision on its initial state."""
    algo = make_algorithm(cfg.algorithm)
    if iteration == 0:
        return algo.decide(algo.initial_state())
    data = json.loads((run.stage_dir(iteration - 1, "entropy") / "controller.json").read_text())
    if "next_k_halved" not in data:  # written before the key existed: the same rule decides it
        return algo.decide(decision_from_json({**data, "next_k_halved": False}).state)
    return decision_from_json(data)


def evaluation_due(cfg: Config, iteration: int) -> bool:
    return (iteration + 1) % cfg.evaluation.every == 0 or iteration == cfg.run.iterations - 1


def upstream(run: RunDir, cfg: Config, iteration: int, stage: str, verify: bool = True) -> dict[str, str]:
    """Digests of what `stage` of `iteration` reads; StageNotReady when one is missing. `verify`:
    check each input's files against its manifest (DamagedStage); False reads the recorded digests
    only (what a rank does with the digests its launcher checked: `rank_inputs`)."""
    if stage not in PIPELINE:
        raise ValueError(f"unknown stage '{stage}' (stages: {', '.join(STAGES)})")
    ups: dict[str, str] = {}
    for offset, name in PIPELINE[stage].reads:
        i = iteration + offset
        key = name if offset == 0 else f"previous_{name}"
        if i >= 0:
            ups[key] = run.digest(i, name, verify=verify)  # checks its files against its manifest (DamagedStage)
        elif name == "update":
            ups[key] = verified_base_digest(run) if verify else run.read_json("base.json")["digest"]
        else:
            ups[key] = "initial"
    if stage == "prepare":
        ups["dataset"] = file_digest(run.dataset_path("train"))
    if stage == "evaluate":
        if not run.dataset_path("eval").is_file():
            raise StageNotReady("no evaluation split in this run (set data.eval)")
        ups["dataset"] = file_digest(run.dataset_path("eval"))
    ups["config"] = stage_config_digest(cfg, stage)
    return ups


def require_unpruned(run: RunDir, iteration: int, stage: str) -> None:
    """PrunedArtifact (naming the file and the setting) when `stage` of `iteration` would open a file
    retention deleted (`Stage.needs`)."""
    problem = pruned_need(run, iteration, stage, PIPELINE[stage].needs)
    if problem:
        raise PrunedArtifact(problem)


def stage_inputs(run: RunDir, cfg: Config, iteration: int, stage: str) -> dict[str, str]:
    """What a stage about to run reads: its upstream digests (`upstream`), after checking that no
    file it opens was deleted by retention (`require_unpruned`)."""
    require_unpruned(run, iteration, stage)
    return upstream(run, cfg, iteration, stage)


def rank_inputs(run: RunDir, cfg: Config, iteration: int, stage: str, checked: dict[str, str] | None) -> dict[str, str]:
    """What a stage reads, as `stage_inputs`; on a rank given the digests its launcher has just
    checked (`checked`), those, after comparing them with the digests recorded in the run directory
    as this process sees it (no hashing: a cheap check that every node sees the same files).

    Raises StageNotReady when they differ (the run directory is not shared, or not yet in sync)."""
    if checked is None:
        return stage_inputs(run, cfg, iteration, stage)
    seen = upstream(run, cfg, iteration, stage, verify=False)
    if seen != checked:
        differ = sorted(k for k in set(seen) | set(checked) if seen.get(k) != checked.get(k))
        raise StageNotReady(
            f"{run.root} as {socket.gethostname()} sees it differs from what the flow checked for {stage} of iteration "
            f"{iteration} ({', '.join(differ)}): is the run directory on a filesystem every node shares?")
    return checked


def check_rerun_possible(run: RunDir, config_of: Callable[[int], Config], iteration: int, stage: str) -> None:
    """Refuse (PrunedArtifact) a rerun of `stage` at `iteration` when it, or a later stage that its
    new output could make stale and that would then be recomputed, needs a file retention pruned.
    The stages recomputed in that chain write their outputs again, so only needs outside it count;
    an evaluation feeds nothing, so it can be rerun whenever its policy is kept. `config_of(i)`: the
    config iteration i will have after the rerun."""
    chain = {(iteration, stage)}
    for i in range(iteration, config_of(iteration).run.iterations):
        for name in stages_of(config_of(i), i):
            if any((i + d, source) in chain for d, source in PIPELINE[name].reads):
                chain.add((i, name))
    for i, name in sorted(chain, key=lambda item: (item[0], STAGES.index(item[1]))):
        because = "" if (i, name) == (iteration, stage) else (
            f" (rerunning {stage} of iteration {iteration} can change what it reads, so it would be recomputed)")
        problem = pruned_need(run, i, name, PIPELINE[name].needs, skip=chain - {(i, name)}, because=because)
        if problem:
            raise PrunedArtifact(problem)


def verified_base_digest(run: RunDir) -> str:
    """base.json's digest, after checking the starting policy's folder still has it."""
    base = run.read_json("base.json")
    if base is None:
        raise StageNotReady(f"{run.root / 'base.json'} is missing: start a new run")
    path = Path(base["path"])
    if not base["digest"].startswith("hub:"):
        if not path.is_dir() or folder_digest(path) != base["digest"]:
            raise DamagedStage(
                f"the starting policy {path} is missing or differs from the digest in {run.root / 'base.json'}: "
                "restore it (e.g. `aepo build-base` for the embedded one) or start a new run"
            )
    return base["digest"]


def stages_of(cfg: Config, iteration: int) -> list[str]:
    return [s for s in STAGES if s != "evaluate" or evaluation_due(cfg, iteration)]


def run_iteration(run: RunDir, iteration: int, call_stage: Callable[[str, int], Any]) -> tuple[list[str], list[str]]:
    """One iteration's due stages (`stages_of`, under the iteration's config: a rerun's overrides
    apply from its iteration on), in order: a stage already complete and up to date is skipped, the
    others are run by ``call_stage(name, iteration)`` (the `train` flow calls its Prefect task, a plain
    loop ``PIPELINE[name]``). The stage loop of every driver; returns (names run, names skipped)."""
    cfg = run.config(iteration)
    ran, skipped = [], []
    for stage in stages_of(cfg, iteration):
        if is_stage_complete(run, cfg, iteration, stage):
            skipped.append(stage)
            continue
        call_stage(stage, iteration)
        ran.append(stage)
    return ran, skipped


def base_evaluation_pending(run: RunDir) -> bool:
    """Whether the starting policy's held-out evaluation (base/evaluate, once per run, under the
    config of the run's start) is asked for (run.evaluate_base) and not yet complete."""
    return run.config().run.evaluate_base and not is_stage_complete(
        run, run.config(BASE_ITERATION), BASE_ITERATION, "evaluate")


def is_stage_complete(run: RunDir, cfg: Config, iteration: int, stage: str, log=print) -> bool:
    """Done, up to date with what it read, and its files intact. A damaged stage (a file missing,
    truncated or altered since its manifest) is reported by path and counts as not done, so it is
    recomputed before anything reads it."""
    try:
        if not run.is_complete(iteration, stage, upstream(run, cfg, iteration, stage)):
            return False
    except StageNotReady:
        return False
    problem = run.damage(iteration, stage)
    if problem:
        log(f"{problem}: recomputing {stage} of iteration {iteration}")
        return False
    return True


def _seed(*parts: int) -> int:
    return int(hashlib.sha256(repr(parts).encode()).hexdigest()[:8], 16)


# ------------------------------------------------------------------------------------- stages
def prepare(run: RunDir, iteration: int) -> dict[str, Any]:
    """This iteration's prompts: the next slice of a seeded per-epoch permutation of the train split."""
    started = time.perf_counter()
    cfg = run.config(iteration)
    ups = stage_inputs(run, cfg, iteration, "prepare")
    table = pq.read_table(run.dataset_path("train"))
    size, per_batch = table.num_rows, cfg.rollout.prompts_per_batch
    perms: dict[int, np.ndarray] = {}  # a batch spans at most a few epochs
    indices = []
    for j in range(iteration * per_batch, (iteration + 1) * per_batch):
        epoch, pos = divmod(j, size)
        if epoch not in perms:
            perms[epoch] = np.random.default_rng(_seed(cfg.rollout.seed, epoch)).permutation(size)
        indices.append(int(perms[epoch][pos]))
    prompts = table.take(indices).append_column("prompt_index", pa.array(range(per_batch), pa.int32()))
    with run.publish(iteration, "prepare", ups, {"prompts": per_batch}, started=started) as (tmp, metrics):
        pq.write_table(prompts, tmp / "prompts.parquet")
        metrics["epoch"] = iteration * per_batch // size
    return metrics


def on_ranks(run: RunDir, cfg: Config, iteration: int, stage: str, ups: dict[str, str],
             show_progress: bool = False) -> dict[str, Any] | None:
    """Run `stage` on the processes its config asks for when it is placed on other processes
    (`aepo_core.pipeline.distributed.placement`: torchrun ranks on this machine, or the update on Ray
    Train workers, aepo_core.pipeline.ray_cluster); returns the metrics the ranks published, or None:
    compute it here (rollout and evaluate on Ray stay here and sample through engine actors,
    `stage_engine`).

    The ranks are given `ups`, the digests this process has just checked, and compare them with the
    digests recorded in the run directory they see (`rank_inputs`) rather than hashing the inputs
    again each (for a large policy, its checkpoint and optimiser state N times over).

    Raises DistributedStageFailed (a rank failed) or StageNotReady (the ranks exited without
    publishing the stage for these upstream digests)."""
    where, nproc = placement(cfg, stage, Ranks.current().world), stage_processes(cfg, stage)
    if where == "torchrun":
        launch_stage(stage, run.root, iteration, nproc, show_progress, upstream=ups)
    elif where == "ray_train":
        from aepo_core.pipeline.ray_cluster import launch_on_ray

        launch_on_ray(update, cfg, run.root, iteration, nproc, show_progress, upstream=ups)
    else:
        return None
    published = run.manifest(iteration, stage)
    if published is None or published["upstream"] != ups:
        raise StageNotReady(f"the {stage} ranks of iteration {iteration} exited without publishing "
                            f"{run.stage_dir(iteration, stage)}")
    return published["metrics"]


@contextlib.contextmanager
def stage_engine(cfg: Config, model_path: Path, stage: str, what: str) -> Iterator[RolloutEngine]:
    """The engine `stage` (rollout or evaluate) samples with: the process's (shared_engine, kept after
    the stage); on the ranks of a data-parallel stage, this rank's engine as its part of one engine
    over all ranks (DataParallelEngine: a collective); placed on Ray ("ray_actors"), D =
    rollout.data_parallel engine actors on the cluster, released when the stage's sampling is done
    (`what`: the stage, iteration and run, for their errors)."""
    ranks = Ranks.current()
    if placement(cfg, stage, ranks.world) == "ray_actors":
        from aepo_core.pipeline.ray_cluster import engine_actors

        with engine_actors(cfg, model_path, what) as engine:
            yield engine
        return
    engine = shared_engine(cfg, model_path)
    yield DataParallelEngine(engine, ranks) if ranks.world > 1 else engine


def sample_rollout(
    engine, cfg: Config, policy: list[SamplingRequest], regulariser: list[SamplingRequest], golds: list[str], seed: int
) -> tuple[list[Completion], int, int]:
    """The policy requests and, in prompt order, the regulariser requests the REINFORCE term can use.

    Args:
        engine: the rollout engine; cfg: the run's config.
        policy: one request per prompt (the policy batch); regulariser: the regulariser batch's
            requests, prompt order (prompt p of both lists is the same prompt), each with its own seed.
        golds: the gold answer of each prompt (index p).
        seed: the engine call's seed.
    Returns:
        (completions ordered by request then sample, request_index into policy + regulariser;
        regulariser prompts sampled; engine calls).

    rollout.regulariser_sampling "all": every regulariser request in the policy batch's engine call
    (the reference code). "in_order": the update trains the first k <= K candidates of the regulariser
    rows in prompt order (AEPO.regulariser_candidates; a group's candidates depend on its own rows
    only), so once K are known no later prompt can change what it trains. The first prompts go with
    the policy batch (as many as could supply K candidates at best, ceil(K / n)), are verified, and
    more follow (as many as the candidates found per prompt so far suggest) until K are known or no
    prompt is left. Each request has its own random stream, so the rows are those sampling them all
    would give (tests/test_pipeline.py).
    """
    if not regulariser or cfg.rollout.regulariser_sampling == "all":
        return engine.generate(policy + regulariser, seed=seed), len(regulariser), 1
    algo = make_algorithm(cfg.algorithm)
    needed, n = int(cfg.algorithm.reinforce_sample_num), cfg.rollout.n
    verifier = make_verifier(cfg.data.verifier, cfg.data.math_answer)
    completions, rewards, done, calls = [], [], 0, 0
    try:
        while True:
            found = len(algo.regulariser_candidates(torch.tensor(rewards), n)) if rewards else 0
            if done == len(regulariser) or (done and found >= needed):
                return completions, done, calls
            per_prompt = max(found / done, 1.0) if done else float(n)
            take = min(len(regulariser) - done, math.ceil((needed - found) / per_prompt))
            head = policy if calls == 0 else []
            out = engine.generate(head + regulariser[done : done + take], seed=seed)
            calls += 1
            reg_rows = []
            for c in out:
                if c.request_index >= len(head):  # a regulariser row: index into policy + regulariser
                    c.request_index += len(policy) - len(head) + done
                    reg_rows.append(c)
            completions += out
            judged = verifier.judge_batch([c.text for c in reg_rows], [golds[c.request_index - len(policy)] for c in reg_rows])
            rewards += [j.reward for j in judged]
            done += take
    finally:
        verifier.close()


def rollout(run: RunDir, iteration: int, show_progress: bool = False,
            checked: dict[str, str] | None = None) -> dict[str, Any]:
    """Sample the policy batch (n per prompt at rollout.temperature) and, for AEPO, the regulariser
    batch (of the first reg_prompt_fraction of prompts, at the controller's temperature; in prompt
    order until the REINFORCE term has its rows: `sample_rollout`)."""
    started = time.perf_counter()
    cfg = run.config(iteration)
    ups = rank_inputs(run, cfg, iteration, "rollout", checked)  # checked: a rank, given what its launcher checked
    if (published := on_ranks(run, cfg, iteration, "rollout", ups, show_progress)) is not None:
        return published  # sampled by rollout.data_parallel engine processes
    prompts = pq.read_table(run.stage_dir(iteration, "prepare") / "prompts.parquet")
    decision = controller_decision(run, cfg, iteration)
    with stage_engine(cfg, policy_dir(run, iteration), "rollout", f"the rollout stage of iteration {iteration} of {run.root}") as engine:
        engine.show_progress = show_progress
        r = cfg.rollout
        seed = _seed(r.seed, iteration)
        prompt_ids = encode_prompts(engine.tokenizer, prompts.column("prompt").to_pylist(), cfg.data.prompt_suffix)
        # one random stream per (batch, prompt): a response does not depend on what is sampled with it
        policy = [SamplingRequest(ids, r.n, r.temperature, r.top_p, r.max_new_tokens, seed=_seed(seed, 0, p))
                  for p, ids in enumerate(prompt_ids)]
        regulariser = []
        reg_temperature = make_algorithm(cfg.algorithm).regulariser_temperature(decision)
        if reg_temperature is not None:
            num_reg = math.ceil(cfg.algorithm.reg_prompt_fraction * len(prompt_ids))
            regulariser = [SamplingRequest(ids, r.n, reg_temperature, r.top_p, r.max_new_tokens, seed=_seed(seed, 1, p))
                           for p, ids in enumerate(prompt_ids[:num_reg])]
        gen_started = time.perf_counter()
        completions, reg_prompts, calls = sample_rollout(
            engine, cfg, policy, regulariser, prompts.column("answer").to_pylist(), seed)
        seconds = time.perf_counter() - gen_started
    requests = policy + regulariser
    roles = [POLICY] * len(policy) + [REGULARISER] * len(regulariser)
    num_prompts = len(prompt_ids)
    pids = prompts.column("id").to_pylist()
    table = pa.table(
        {
            "row_id": pa.array(range(len(completions)), pa.int32()),
            "prompt_index": pa.array([c.request_index % num_prompts for c in completions], pa.int32()),
            "prompt_id": [pids[c.request_index % num_prompts] for c in completions],
            "sample": pa.array([c.sample_index for c in completions], pa.int32()),
            "batch": [roles[c.request_index] for c in completions],
            "temperature": pa.array([c.temperature for c in completions], pa.float32()),
            "prompt_token_ids": pa.array([requests[c.request_index].prompt_token_ids for c in completions], pa.list_(pa.int32())),
            "token_ids": pa.array([c.token_ids for c in completions], pa.list_(pa.int32())),
            "logprobs": pa.array([c.logprobs for c in completions], pa.list_(pa.float32())),
            "text": [c.text for c in completions],
            "finish_reason": [c.finish_reason for c in completions],
        }
    )
    tokens = sum(len(c.token_ids) for c in completions)
    # which engine sampled (HFRolloutEngine, VLLMRolloutEngine; DataParallelEngine on torchrun ranks, RayEngine)
    params = {"regulariser_temperature": reg_temperature, "seed": seed, "sampled_by": type(engine).__name__}
    if Ranks.current().rank != 0:  # every rank holds the whole table; rank 0 writes it
        return {}
    with run.publish(iteration, "rollout", ups, params, started=started) as (tmp, metrics):
        pq.write_table(table, tmp / "rollouts.parquet")
        metrics.update(
            responses=len(completions),
            tokens=tokens,
            tokens_per_s=tokens / seconds if seconds > 0 else 0.0,
            response_tokens_mean=tokens / max(1, len(completions)),
            truncated_fraction=sum(c.finish_reason == "length" for c in completions) / max(1, len(completions)),
            regulariser_temperature=reg_temperature if reg_temperature is not None else float("nan"),
            regulariser_prompts=reg_prompts,
            engine_calls=calls,
            generate_seconds=seconds,
        )
    return metrics


def reward(run: RunDir, iteration: int) -> dict[str, Any]:
    """Verify every response against its prompt's gold answer."""
    started = time.perf_counter()
    cfg = run.config(iteration)
    ups = stage_inputs(run, cfg, iteration, "reward")
    prompts = pq.read_table(run.stage_dir(iteration, "prepare") / "prompts.parquet")
    rollouts = pq.read_table(run.stage_dir(iteration, "rollout") / "rollouts.parquet", columns=["row_id", "prompt_index", "batch", "text"])
    answers = prompts.column("answer").to_pylist()
    golds = [answers[i] for i in rollouts.column("prompt_index").to_pylist()]
    verify_started = time.perf_counter()
    verifier = make_verifier(cfg.data.verifier, cfg.data.math_answer)
    try:
        judged = verifier.judge_batch(rollouts.column("text").to_pylist(), golds)
    finally:
        verifier.close()
    verify_seconds = time.perf_counter() - verify_started
    rewards = np.array([j.reward for j in judged], dtype=np.float32)
    table = pa.table(
        {
            "row_id": rollouts.column("row_id"),
            "reward": pa.array(rewards, pa.float32()),
            "verdict": [j.verdict for j in judged],
            "extracted": [j.extracted for j in judged],
        }
    )
    is_policy = np.array(rollouts.column("batch").to_pylist()) == POLICY
    n = cfg.rollout.n
    groups = rewards[is_policy].reshape(-1, n)
    # a gold the verifier cannot read is the data's fault, not the model's: counted and named, not hidden
    prompt_ids, indices = prompts.column("id").to_pylist(), rollouts.column("prompt_index").to_pylist()
    bad_gold_ids = sorted({prompt_ids[i] for i, j in zip(indices, judged, strict=True) if j.verdict == "bad_gold"})
    if bad_gold_ids:
        import warnings

        shown = ", ".join(repr(i) for i in bad_gold_ids[:5]) + (" …" if len(bad_gold_ids) > 5 else "")
        warnings.warn(
            f"iteration {iteration}: {len(bad_gold_ids)} prompt(s) have a gold answer the "
            f"'{cfg.data.verifier}' verifier cannot read (verdict bad_gold, reward 0): {shown}",
            stacklevel=2,
        )
    params = {"bad_gold_prompt_ids": bad_gold_ids}
    with run.publish(iteration, "reward", ups, params, started=started) as (tmp, metrics):
        pq.write_table(table, tmp / "rewards.parquet")
        metrics.update(
            reward_mean=float(rewards[is_policy].mean()),
            accuracy=float((rewards[is_policy] > 0).mean()),
            mixed_group_fraction=float(((groups.min(1) != groups.max(1))).mean()),
            regulariser_accuracy=float((rewards[~is_policy] > 0).mean()) if (~is_policy).any() else float("nan"),
            verify_seconds=verify_seconds,
            bad_gold=sum(j.verdict == "bad_gold" for j in judged),
            bad_gold_prompts=len(bad_gold_ids),
        )
    return metrics


def _batch_of(rows: pa.Table, rewards: np.ndarray, pad_id: int) -> SequenceBatch:
    return SequenceBatch.from_token_lists(
        rows.column("prompt_token_ids").to_pylist(),
        rows.column("token_ids").to_pylist(),
        pad_id,
        rewards=torch.tensor(rewards, dtype=torch.float32),
        temperatures=torch.tensor(rows.column("temperature").to_numpy(), dtype=torch.float32),
        response_logprobs=rows.column("logprobs").to_pylist(),
    )


def role_batches(rollouts: pa.Table, reward_of: np.ndarray, pad_id: int) -> dict[str, tuple[np.ndarray, SequenceBatch | None]]:
    """Split rollouts.parquet rows into the policy and regulariser batches the update step takes.

    Returns {role: (order, batch)}: ``order`` are the rollout rows in batch order (groups of n
    consecutive samples of one prompt), ``batch`` their SequenceBatch (None when the role is empty).
    """
    roles = np.array(rollouts.column("batch").to_pylist())
    batches = {}
    for role in (POLICY, REGULARISER):
        idx = np.flatnonzero(roles == role)
        order = idx[np.lexsort((rollouts.column("sample").to_numpy()[idx], rollouts.column("prompt_index").to_numpy()[idx]))]
        batches[role] = (order, _batch_of(rollouts.take(order), reward_of[order], pad_id) if len(order) else None)
    return batches


_REFERENCE: dict[tuple[str, str], Any] = {}


def reference_policy(path: Path, device: torch.device, trust_remote_code: bool = False):
    """The frozen reference policy for ``algorithm.kl_coef > 0``: loaded once per process and path.

    eval() mode, every parameter with requires_grad False, so no optimiser or backward pass can
    touch it. The cache holds one model (a new path replaces the old one).
    """
    key = (str(Path(path).resolve()), str(device))
    if key not in _REFERENCE:
        _REFERENCE.clear()
        ref = load_policy(path, device=device, trust_remote_code=trust_remote_code).eval()
        ref.requires_grad_(False)
        _REFERENCE[key] = ref
    return _REFERENCE[key]


def training_policy(run: RunDir, cfg: Config, iteration: int, device: torch.device):
    """The model the update of `iteration` trains, in train() mode: the previous update's policy (the
    base for iteration 0); with model.lora.enabled the run's starting policy, frozen, with the LoRA
    adapters of the previous update (new ones, seeded, for iteration 0) as its only trainable
    parameters (aepo_core.io.lora)."""
    trust = cfg.model.trust_remote_code
    if not cfg.model.lora.enabled:
        return load_policy(policy_dir(run, iteration), device=device, trust_remote_code=trust)
    base = load_policy(policy_dir(run, 0), device=device, trust_remote_code=trust)
    previous = run.stage_dir(iteration - 1, "update") / ADAPTER if iteration > 0 else None
    return trainable_lora(base, cfg.model.lora, previous, seed=_seed(cfg.trainer.seed, iteration))


def update(run: RunDir, iteration: int, show_progress: bool = False,
           checked: dict[str, str] | None = None) -> dict[str, Any]:
    """One AEPO (or baseline) update on this iteration's rollouts; saves policy, optimiser, batch record
    (and, with LoRA, the adapter beside the merged policy).

    With trainer.nproc = N > 1, called in the flow's process, it runs this same function on N
    torchrun ranks (aepo_core.pipeline.distributed) or Ray Train workers (run.ray_address) and
    returns the metrics they published; called in a rank, it trains its share of the step on the
    FSDP2-sharded policy (rank 0 publishes). `checked`: on a rank, the input digests its launcher
    checked (`rank_inputs`; the same for rollout and evaluate_stage)."""
    started = time.perf_counter()
    cfg = run.config(iteration)
    ups = rank_inputs(run, cfg, iteration, "update", checked)  # checked: a rank, given what its launcher checked
    ranks = Ranks.current()
    if (published := on_ranks(run, cfg, iteration, "update", ups, show_progress)) is not None:
        return published
    rollouts = pq.read_table(run.stage_dir(iteration, "rollout") / "rollouts.parquet")
    rewards = pq.read_table(run.stage_dir(iteration, "reward") / "rewards.parquet")
    if rewards.column("row_id").to_pylist() != rollouts.column("row_id").to_pylist():
        raise StageNotReady(f"{run.stage_dir(iteration, 'reward')}: rewards do not match the rollouts' rows")
    reward_of = rewards.column("reward").to_numpy()
    device = resolve_device(cfg.trainer)
    if device.type == "cuda" and ranks.world > 1:  # each rank its own GPU (stage_rank.main set it)
        device = torch.device("cuda", torch.cuda.current_device())
    source = policy_dir(run, iteration)
    lora = cfg.model.lora.enabled
    policy = training_policy(run, cfg, iteration, device)
    if ranks.world > 1:
        policy = shard_policy(policy, device, autocast_dtype(device, cfg.trainer.dtype))
    tokenizer = load_tokenizer(source, cfg.model.trust_remote_code)
    policy.train()
    optimizer = make_optimizer(policy, cfg.trainer)  # its trainable parameters: the adapters only under LoRA
    if iteration > 0:  # optimizer.pt (one process) or optimizer/ (N processes), whoever wrote it
        load_optimizer(policy, optimizer, run.stage_dir(iteration - 1, "update"))
        for group in optimizer.param_groups:  # the moments carry on; the hyperparameters follow the config
            group.update(lr=cfg.trainer.lr, betas=cfg.trainer.betas, weight_decay=cfg.trainer.weight_decay)
    torch.manual_seed(_seed(cfg.trainer.seed, iteration))

    batches = role_batches(rollouts, reward_of, tokenizer.pad_token_id)
    decision = controller_decision(run, cfg, iteration)
    # the task's own view of the policy rows under pi_old (synthetic task: the valid-choice entropy);
    # on N ranks every rank computes it: a sharded model's forward passes are collectives
    order = batches[POLICY][0]
    texts = pq.read_table(run.stage_dir(iteration, "prepare") / "prompts.parquet").column("prompt").to_pylist()
    policy_rows = rollouts.take(order)
    choice = task_metrics(
        cfg.data, policy, tokenizer, [texts[i] for i in policy_rows.column("prompt_index").to_pylist()],
        policy_rows.column("prompt_token_ids").to_pylist(), policy_rows.column("token_ids").to_pylist(),
    )
    # the controller's look-ahead reading (algorithm.entropy_lookahead): these fresh rows' entropy where
    # the earlier updates' momentum will carry the policy, before this step (read after it on the rows
    # it trained on, the change was the step's effect on its own samples: on one measured state 2.7x
    # the change read on the next iteration's rows)
    ahead = entropy_ahead(policy, optimizer, batches[POLICY][1], cfg.trainer) if cfg.algorithm.entropy_lookahead else {}
    step_started = time.perf_counter()
    bar = None
    if show_progress:
        from tqdm.auto import tqdm

        bar = tqdm(total=len(batches[POLICY][0]), desc="update", unit="row", leave=False)
    # the k3 KL's reference: the run's starting policy, loaded once per process and never trained;
    # under LoRA the same model with its adapters off (the frozen base, no second copy)
    ref_policy = None
    if cfg.algorithm.kl_coef > 0:
        ref_policy = AdaptersDisabled(policy) if lora else reference_policy(
            policy_dir(run, 0), device, cfg.model.trust_remote_code)
    try:
        result = update_step(
            policy, optimizer, batches[POLICY][1], batches[REGULARISER][1], cfg.algorithm, cfg.trainer, decision,
            group_size=cfg.rollout.n, ref_policy=ref_policy, progress=bar.update if bar is not None else None,
            ranks=ranks,
        )
    finally:
        if bar is not None:
            bar.close()
    seconds = time.perf_counter() - step_started
    row_ids = rollouts.column("row_id").to_numpy()
    records = [
        {
            "rollout_row_id": int(row_ids[batches[POLICY if rec["source"] == POLICY else REGULARISER][0][rec["source_index"]]]),
            **{k: rec[k] for k in ("row", "mini_batch", "role", "source", "advantage", "weight", "reward", "temperature")},
        }
        for rec in result.rows
    ]
    size = sum(t.numel() * t.element_size() for t in policy.state_dict().values())
    size += sum(v.numel() * v.element_size() for st in optimizer.state.values() for v in st.values() if torch.is_tensor(v))
    weights = full_state_dict(policy) if ranks.world > 1 else None  # gathered by every rank, held by rank 0
    with _publish_update(run, ranks, iteration, ups, {"algorithm": cfg.algorithm.name}, started,
                         size) as (tmp, metrics):
        policy.eval()
        if ranks.world == 1:
            torch.save(optimizer.state_dict(), tmp / OPTIMIZER_FILE)
        else:  # each rank its shards, then all wait: rank 0 writes the rest and the manifest
            save_optimizer(policy, optimizer, tmp / OPTIMIZER_DCP)
            barrier()
            if ranks.rank != 0:
                return metrics
        if lora:  # the adapter (what the next update continues from), then the merged weights (consumes `policy`)
            save_adapter(policy, tmp / ADAPTER)
            policy = merge_into_base(policy)
        write_policy(policy, tokenizer, tmp / "policy", weights)
        pq.write_table(pa.Table.from_pylist(records), tmp / "update_batch.parquet")
        metrics.update(result.metrics)
        metrics.update(ahead)
        metrics.update(choice)
        metrics["step_seconds"] = seconds
        metrics["rows_trained"] = len(records)
    return metrics


@contextlib.contextmanager
def _publish_update(run: RunDir, ranks: Ranks, iteration: int, ups: dict[str, str], params: dict[str, Any],
                    started: float, expected_bytes: int) -> Iterator[tuple[Path, dict[str, Any]]]:
    """`run.publish` on rank 0 (the one writer of the manifest); every other rank gets the same
    temporary folder (broadcast from rank 0) to write its optimiser shards into, and no manifest."""
    if ranks.rank == 0:
        with run.publish(iteration, "update", ups, params, started=started, expected_bytes=expected_bytes) as out:
            if ranks.world > 1:
                torch.distributed.broadcast_object_list([str(out[0])], src=0)
            yield out
        return
    where: list[str | None] = [None]
    torch.distributed.broadcast_object_list(where, src=0)
    yield Path(where[0]), {}


def task_entropy_ceiling(measured: dict[str, Any]) -> float | None:
    """An upper reference for the policy's entropy (nats/token): the entropy of a uniformly random
    valid answer, named in the reachability warning when the target stays out of reach upwards.

    The update stage measures it for the synthetic task (``choice/uniform_valid_entropy``, from the
    batch's prompts; :func:`aepo_core.pipeline.sources.task_metrics`); a user's dataset has none.
    """
    value = measured.get("choice/uniform_valid_entropy")
    return float(value) if isinstance(value, int | float) else None


def entropy(run: RunDir, iteration: int) -> dict[str, Any]:
    """Record the entropy the update measured and decide the next iteration's temperature and k cap."""
    started = time.perf_counter()
    cfg = run.config(iteration)
    ups = stage_inputs(run, cfg, iteration, "entropy")
    measured = run.manifest(iteration, "update")["metrics"]
    a = cfg.algorithm
    algo = make_algorithm(a)
    # the one place the controller moves and decides: rollout and update read controller.json
    previous = controller_decision(run, cfg, iteration)
    state = algo.next_state(previous.state, previous, measured)
    next_decision = algo.decide(state)
    next_t = next_decision.temperature
    read = algo.control_metric()
    record = {
        "nll": measured.get("entropy/nll"),
        "exact": measured.get("entropy/exact"),
        "nll_policy_rows": measured.get("entropy/nll_policy_rows"),
        "exact_policy_rows": measured.get("entropy/exact_policy_rows"),
        # which reading moved the controller (algorithm.entropy_rows), and its value (None: the
        # update measured nothing there and h_prev was kept)
        "rows": a.entropy_rows,
        "read": read,
        "read_value": measured.get(read),
        # the reading the target is stated in: read_value itself, unless the controller reads ahead
        # (algorithm.entropy_lookahead: the policy's entropy now, against read_value's ahead)
        "target_metric": algo.entropy_metric(),
        "target_value": measured.get(algo.entropy_metric()),
    }
    decision = decision_to_json(next_decision, a.entropy_estimator, record, a.target_entropy)
    message = algo.reachability_message(state, task_entropy_ceiling(measured))
    if message is not None and state.at_clamp_iterations == a.reach_window:
        # said once, when it starts; the manifest's params keep it (MLflow tag, flow summary line)
        print(f"warning: iteration {iteration}: {message}", flush=True)
    with run.publish(iteration, "entropy", ups, {"reachability": message}, started=started) as (tmp, metrics):
        (tmp / "controller.json").write_text(json.dumps(decision, indent=2))
        metrics.update(
            entropy_nll=decision["measured"]["nll"],
            entropy_exact=decision["measured"]["exact"],
            entropy_read=state.h_prev,
            target=a.target_entropy,
            next_temperature=next_t if next_t is not None else float("nan"),
            next_k_cap=decision["next_k_cap"],
            # the REINFORCE weight the next update uses (the adaptive controller's second actuator moves it)
            next_alpha=next_decision.alpha if next_decision.alpha is not None else a.alpha,
            entropy_coef=state.entropy_coef,
            at_clamp_iterations=state.at_clamp_iterations,
            target_unreached=float(message is not None),
        )
    return metrics


def evaluate_stage(run: RunDir, iteration: int, show_progress: bool = False,
                   checked: dict[str, str] | None = None) -> dict[str, Any]:
    """Held-out accuracy of this iteration's policy (after its update) at the configured temperature,
    n and length; iteration BASE_ITERATION (-1): the base policy, before any update."""
    started = time.perf_counter()
    cfg = run.config(iteration)
    ups = rank_inputs(run, cfg, iteration, "evaluate", checked)  # checked: a rank, given what its launcher checked
    if (published := on_ranks(run, cfg, iteration, "evaluate", ups, show_progress)) is not None:
        return published  # sampled by rollout.data_parallel engine processes
    policy = policy_dir(run, iteration + 1)
    table = pq.read_table(run.dataset_path("eval"))
    with stage_engine(cfg, policy, "evaluate", f"the evaluate stage of iteration {iteration} of {run.root}") as engine:
        engine.show_progress = show_progress  # an evaluation samples the most rows of any stage: say so
        records, results = evaluate_model(cfg, policy, table, engine=engine)
    if Ranks.current().rank != 0:  # every rank holds every record; rank 0 writes them
        return {}
    with run.publish(iteration, "evaluate", ups, {"sampled_by": type(engine).__name__}, started=started) as (tmp, metrics):
        pq.write_table(records, tmp / "eval.parquet")
        write_source_names(records, tmp)  # source -> metric name part of the per-source metrics
        metrics.update(results)
    return metrics


@dataclass(frozen=True)
class Stage:
    """One stage of an iteration, in one record.

    name: the stage's folder name in iter_NNNN/.
    reads: the artifacts it reads, as (iteration offset, stage); -1 is the previous iteration's
        (for iteration 0: the base policy and the initial controller decision).
    config_keys: the config keys (dotted; a section means all of it) it reads: their digest is in
        its manifest, so changing one makes this stage and its readers stale, nothing before it.
        tests/test_stage_keys.py fails when a stage reads a key not declared here.
    run: the stage function ``run(run_dir, iteration) -> metrics``.
    progress: whether ``run`` takes ``show_progress`` (progress bars).
    needs: the files it opens in what it reads, as (iteration offset, stage, name; a folder ends in
        "/"): what retention must not have deleted for it to run (aepo_core.pipeline.retention).
    keys_when: the config keys it reads only in some configurations, as a function of the config
        (so a run that does not read them is not made stale by them; `stage_keys`).
    """

    name: str
    reads: tuple[tuple[int, str], ...]
    config_keys: tuple[str, ...]
    run: Callable[..., dict[str, Any]]
    progress: bool = False
    needs: tuple[tuple[int, str, str], ...] = ()
    keys_when: Callable[[Config], tuple[str, ...]] | None = None

    def __call__(self, run: RunDir, iteration: int, show_progress: bool = False) -> dict[str, Any]:
        """Run the stage: ``run(run_dir, iteration)``, with ``show_progress`` where it takes one."""
        return self.run(run, iteration, show_progress=show_progress) if self.progress else self.run(run, iteration)


def _verifier_if_in_order(cfg: Config) -> tuple[str, ...]:
    """In-order regulariser sampling verifies the rows to decide where to stop (`sample_rollout`)."""
    return ("data.verifier", "data.math_answer") if cfg.rollout.regulariser_sampling == "in_order" else ()


# The pipeline, in order. The dataset snapshot (prepare, evaluate) and the starting policy are read
# through their digests too (see `upstream`).
PIPELINE: dict[str, Stage] = {
    s.name: s
    for s in (
        Stage("prepare", (), ("rollout.prompts_per_batch", "rollout.seed"), prepare),
        Stage("rollout", ((0, "prepare"), (-1, "update"), (-1, "entropy")),
              ("model", "data.prompt_suffix", "rollout", "algorithm", "trainer.device"), rollout, progress=True,
              needs=((-1, "update", "policy/"),), keys_when=_verifier_if_in_order),
        Stage("reward", ((0, "prepare"), (0, "rollout")), ("data.verifier", "data.math_answer", "rollout.n"), reward),
        # prepare and data.train: the embedded task's metrics read the prompts' terms (task_metrics)
        Stage("update", ((0, "prepare"), (0, "rollout"), (0, "reward"), (-1, "update"), (-1, "entropy")),
              ("algorithm", "trainer", "rollout.n", "model.trust_remote_code", "model.lora", "data.train"), update, progress=True,
              needs=tuple((-1, "update", name) for name in (retention.POLICY, *retention.OPTIMIZER_STATES, retention.ADAPTER))),
        Stage("entropy", ((0, "update"), (-1, "entropy")), ("algorithm",), entropy),
        Stage("evaluate", ((0, "update"),),
              ("model", "evaluation", "data.verifier", "data.math_answer", "data.prompt_suffix", "rollout.engine",
               "rollout.max_new_tokens", "rollout.batch_size", "rollout.vllm", "rollout.seed", "trainer.device"),
              evaluate_stage, progress=True, needs=((0, "update", "policy/"),)),
    )
}
STAGES = tuple(PIPELINE)  # the names, in order


# ------------------------------------------------------------------------------------- reruns
def metric_changes(before: dict[str, Any] | None, after: dict[str, Any], limit: int = 16) -> list[str]:
    """What a rerun changed in a stage's metrics, one line each: "accuracy: 0.8125 -> 0.8438".

    Args:
        before: the stage's metrics before the rerun (None: it had not run); after: now.
        limit: most lines (the rest are counted in a last line).
    Returns:
        Lines for the numeric metrics that differ, in name order (new ones as "- -> value", seconds
        and throughput left out: they change on every run).
    """
    before = before or {}
    noisy = ("seconds", "_s", "per_s")
    lines = []
    for key in sorted(after):
        new = after[key]
        if isinstance(new, bool) or not isinstance(new, int | float) or key.endswith(noisy):
            continue
        old = before.get(key)
        if isinstance(old, int | float) and not isinstance(old, bool) and old == new:
            continue
        old_text = f"{old:.4g}" if isinstance(old, int | float) and not isinstance(old, bool) else "-"
        lines.append(f"{key}: {old_text} -> {new:.4g}")
    if len(lines) > limit:
        lines = lines[:limit] + [f"... and {len(lines) - limit} more"]
    return lines


def stale_stages(run: RunDir, from_iteration: int = 0) -> list[tuple[int, str]]:
    """(iteration, stage) pairs that were done but no longer match what they read (each iteration
    under its own config, `RunDir.config(i)`), directly or through a stale stage before them."""
    stale: set[tuple[int, str]] = set()
    for i in range(from_iteration, run.config().run.iterations):
        cfg = run.config(i)
        for stage in stages_of(cfg, i):
            if run.manifest(i, stage) is None:
                continue
            if any((i + d, name) in stale for d, name in PIPELINE[stage].reads) or not is_stage_complete(run, cfg, i, stage):
                stale.add((i, stage))
    return sorted(stale, key=lambda item: (item[0], STAGES.index(item[1])))


# Keys fixed when a run is created (the dataset snapshot, the starting policy, where the run lives).
FROZEN_KEYS = ("model.", "data.train", "data.eval", "data.synthetic", "data.prompt_column", "data.answer_column",
               "data.id_column", "data.source_column", "run.runs_root", "run.name", "run.iterations")


def prepare_rerun(
    run_dir: str | Path, iteration: int, stage: str, overrides: list[str] | None = None, apply: bool = True
) -> RunDir:
    """Check a single-stage rerun can go ahead (run, stage name, iteration, upstream artifacts, no
    override of a key fixed at run creation) and, if `apply`, write the overrides into the run's
    config (recorded in config_history.jsonl). Raises with a clear message and changes nothing."""
    run = RunDir(run_dir)
    if not run.config_path.is_file():
        raise StageNotReady(f"{run.root} is not a run directory (no config.yaml)")
    if stage not in STAGES:
        raise ValueError(f"unknown stage '{stage}' (stages: {', '.join(STAGES)})")
    frozen = [o for o in overrides or [] if o.split("=", 1)[0].strip().startswith(FROZEN_KEYS)]
    if frozen:
        raise ValueError(f"{', '.join(frozen)}: fixed when the run was created (dataset snapshot, base policy); "
                         "start a new run for that")
    latest = run.config()
    cfg = load_config(run.config_path, overrides or [])
    if not 0 <= iteration < cfg.run.iterations:
        raise ValueError(f"iteration {iteration} is outside this run (0..{cfg.run.iterations - 1})")
    # the overrides apply from this iteration on; earlier iterations keep the config they were computed with
    record = {"at": time.strftime("%Y-%m-%dT%H:%M:%S%z"), "rerun": f"{stage}@{iteration}", "overrides": overrides,
              "from_iteration": iteration, "changes": override_changes(latest, cfg, overrides or [])}
    records = run.config_history() + [record]

    def config_of(i: int) -> Config:
        return config_version(cfg, records, i)

    run.acquire_writer()  # RunDirBusy names the process writing this run now
    try:
        upstream(run, config_of(iteration), iteration, stage)  # StageNotReady names the missing (or damaged) artifact
        check_rerun_possible(run, config_of, iteration, stage)  # PrunedArtifact: it or its recomputation needs a pruned file
    except BaseException:
        run.release_writer()
        raise
    if not apply:
        run.release_writer()
        return run
    run.remove_stale_temporaries()
    if overrides:  # only now, so a refused rerun leaves the run as it was
        with open(run.history_path, "a") as fh:
            fh.write(json.dumps(record) + "\n")
        save_config(cfg, run.config_path)
    return run  # the caller holds the writer lock: release_writer() when done
