"""One update case on 1 or N processes, for tests/test_distributed.py.

In-process (one rank): ``run_case(case)``. Under torchrun (N ranks, gloo):
``python -m torch.distributed.run --standalone --nproc_per_node N tests/distributed_case.py CASE.pt``.
A case (a dict saved with torch.save) names the model folder, the batches, the algorithm and trainer
sections, how many steps to take, the optimiser state to start from (an update stage folder) and
where to write the result: {"metrics": [one dict per step], "weights": full state dict} (rank 0),
plus the optimiser state as an update stage would write it (``save_to``).
"""

from __future__ import annotations

import sys
from datetime import timedelta
from pathlib import Path

import torch
import torch.distributed as dist
from transformers import AutoModelForCausalLM

from aepo_core.config import AlgorithmConfig, TrainerConfig
from aepo_core.core.aepo import ControllerState
from aepo_core.core.ranks import Ranks
from aepo_core.core.update import make_optimizer, update_step
from aepo_core.io.sharded import (
    OPTIMIZER_DCP,
    OPTIMIZER_FILE,
    full_state_dict,
    load_optimizer,
    save_optimizer,
    shard_policy,
)
from aepo_core.pipeline.stage_rank import exit_rank


def run_case(case: dict, ranks: Ranks = Ranks()) -> dict | None:
    model = AutoModelForCausalLM.from_pretrained(case["model"], dtype=torch.float32)
    if ranks.world > 1:
        model = shard_policy(model, torch.device("cpu"))
    trainer = TrainerConfig(**case["trainer"])
    optimizer = make_optimizer(model, trainer)
    if case.get("resume_from"):
        load_optimizer(model, optimizer, Path(case["resume_from"]))
    torch.manual_seed(0)
    metrics = []
    for _ in range(case["steps"]):
        result = update_step(model, optimizer, case["policy_batch"], case.get("regulariser_batch"),
                             AlgorithmConfig(**case["algorithm"]), trainer, ControllerState(),
                             group_size=case["group_size"], ranks=ranks)
        metrics.append(result.metrics)
    weights = full_state_dict(model) if ranks.world > 1 else {k: v.detach().clone() for k, v in model.state_dict().items()}
    if case.get("save_to"):
        folder = Path(case["save_to"])
        if ranks.rank == 0:
            folder.mkdir(parents=True, exist_ok=True)
            model.save_pretrained(str(folder / "policy"), state_dict=dict(weights))
        if ranks.world > 1:
            dist.barrier()
            save_optimizer(model, optimizer, folder / OPTIMIZER_DCP)
        else:
            torch.save(optimizer.state_dict(), folder / OPTIMIZER_FILE)
    return {"metrics": metrics, "weights": weights, "world": ranks.world} if ranks.rank == 0 else None


def main() -> None:
    torch.set_num_threads(1)
    dist.init_process_group("gloo", timeout=timedelta(seconds=120))  # a hang fails the test, not the CI job
    try:
        case = torch.load(sys.argv[1], weights_only=False)
        out = run_case(case, Ranks.current())
        if out is not None:
            torch.save(out, case["out"])
    finally:
        dist.destroy_process_group()
    exit_rank(0)  # as a stage's rank: no SIGABRT from gloo's threads at the interpreter's exit


if __name__ == "__main__":
    main()
