"""Checkpoint retention: which of the update stages' outputs a run keeps, and pruning the rest.

Every update stage writes `policy/` (13 MB on the embedded default, ~15 GB for a 7B model in bf16)
and `optimizer.pt` (AdamW's two moments: twice the policy in fp32). Kept, after each iteration:

- the optimiser state of the newest `run.keep_optimizer_states` updates (resume needs the newest):
  `optimizer.pt` (a single-process update) or `optimizer/` (a distributed one, a
  torch.distributed.checkpoint folder: aepo_core.io.sharded), and
  with LoRA (`model.lora.enabled`) their `adapter/` likewise: the next update continues from the
  adapter and its optimiser state together, as a full fine-tuning run continues from `policy/`;
- `policy/` of the newest update (the next rollout samples it), of every iteration i with
  (i + 1) % `run.keep_policies_every` == 0 (default `tracking.save_every`: the checkpoints MLflow
  uploads) and of the last. An evaluation reads its policy when it runs, in the same iteration;
  rerunning an old one needs the policy kept (`run.keep_policies_every`, e.g. = evaluation.every).

What is deleted is first recorded in the stage's `_PRUNED.json` (name -> setting, time); the
manifest is not touched, so the stage stays complete with the same digest and nothing downstream
turns stale (`RunDir.damage` does not count a pruned file as damage). A stage that needs a pruned
file to run, or a rerun whose recomputation would, is refused before anything is touched
(`stages.stage_inputs`, `stages.check_rerun_possible`), naming the file and the setting that keeps it.
"""

from __future__ import annotations

import shutil

from aepo_core.atomic import bytes_under
from aepo_core.config import Config
from aepo_core.errors import UserError
from aepo_core.io.sharded import OPTIMIZER_DCP, OPTIMIZER_FILE
from aepo_core.pipeline.rundir import RunDir, is_pruned

# the update stage's outputs retention may delete (a folder ends in "/"); the optimiser state's two
# forms are the writer's (aepo_core.io.sharded): one process's file, N processes' DCP folder
POLICY, OPTIMIZER, OPTIMIZER_DIR, ADAPTER = "policy/", OPTIMIZER_FILE, OPTIMIZER_DCP + "/", "adapter/"
OPTIMIZER_STATES = (OPTIMIZER, OPTIMIZER_DIR)  # either form, whichever the update wrote
SETTING = {POLICY: "run.keep_policies_every", OPTIMIZER: "run.keep_optimizer_states",
           OPTIMIZER_DIR: "run.keep_optimizer_states", ADAPTER: "run.keep_optimizer_states"}


class PrunedArtifact(UserError):
    """A stage needs a file that retention deleted."""


def policies_every(cfg: Config) -> int:
    """run.keep_policies_every, or tracking.save_every when unset."""
    return cfg.run.keep_policies_every or cfg.tracking.save_every


def keeps(cfg: Config, name: str, iteration: int, newest: int) -> bool:
    """Whether retention keeps update output `name` (POLICY, OPTIMIZER, OPTIMIZER_DIR or ADAPTER) of
    `iteration` once iteration `newest` has finished (iteration <= newest). The adapter follows its
    optimiser state: resuming a LoRA update needs both."""
    if name in (*OPTIMIZER_STATES, ADAPTER):
        return iteration > newest - cfg.run.keep_optimizer_states
    return iteration == newest or (iteration + 1) % policies_every(cfg) == 0 or iteration == cfg.run.iterations - 1


def prune(run: RunDir, cfg: Config, newest: int) -> int:
    """Delete the update outputs of iterations before `newest` that retention does not keep.

    Args:
        run: the run directory (the caller holds its writer lock).
        cfg: the run's config (run.keep_optimizer_states, run.keep_policies_every).
        newest: the iteration that has just finished (all its stages done).
    Returns:
        Bytes freed.
    """
    freed = 0
    for i in run.iterations_present():
        if i >= newest or run.manifest(i, "update") is None:
            continue
        already = run.pruned(i, "update")
        folder = run.stage_dir(i, "update")
        doomed = [name for name in (POLICY, *OPTIMIZER_STATES, ADAPTER)
                  if name not in already and not keeps(cfg, name, i, newest) and (folder / name).exists()]
        if not doomed:
            continue
        run.mark_pruned(i, "update", doomed, ", ".join(dict.fromkeys(SETTING[name] for name in doomed)))
        for name in doomed:
            path = folder / name
            freed += bytes_under(path)
            if path.is_dir():
                shutil.rmtree(path)
            else:
                path.unlink()
    return freed


def pruned_need(
    run: RunDir, iteration: int, stage: str, needs: tuple[tuple[int, str, str], ...],
    skip: set[tuple[int, str]] = frozenset(), because: str = "",
) -> str | None:
    """What `stage` of `iteration` needs that retention deleted, as one sentence naming the file and
    the setting that keeps it; None if nothing.

    Args:
        needs: what the stage opens, as (iteration offset, stage, file name; a folder ends in "/")
            (aepo_core.pipeline.stages.Stage.needs).
        skip: (iteration, stage) pairs recomputed before this one: needs on them do not count.
        because: why the stage would run, put after the file (e.g. " (rerunning … would …)").
    """
    for offset, source, name in needs:
        i = iteration + offset
        if i < 0 or (i, source) in skip:
            continue
        if is_pruned(name, run.pruned(i, source)):
            path = run.stage_dir(i, source) / name.rstrip("/")
            return f"{stage} of iteration {iteration} needs {path}, which retention pruned{because}; {HINT[name]}"
    return None


HINT = {
    OPTIMIZER: "run.keep_optimizer_states=N keeps the newest N optimiser states (set it when a run starts)",
    OPTIMIZER_DIR: "run.keep_optimizer_states=N keeps the newest N optimiser states (set it when a run starts)",
    POLICY: "run.keep_policies_every=1 keeps every policy (set it when a run starts)",
    ADAPTER: "run.keep_optimizer_states=N keeps the newest N adapters with their optimiser states (set it when "
             "a run starts)",
}
