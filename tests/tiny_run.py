"""Sizes of the small pipeline runs the end-to-end tests train (importable from the tests)."""

from __future__ import annotations

from pathlib import Path

P, N, K = 8, 4, 3  # prompts per batch, responses per prompt, most REINFORCE rows per step


def tiny_overrides(base_policy_dir: Path, root: Path, target: float = 0.3) -> list[str]:
    return [
        f"model.path={base_policy_dir}",
        f"run.runs_root={root}",
        f"rollout.prompts_per_batch={P}",
        f"rollout.n={N}",
        "rollout.max_new_tokens=48",
        f"algorithm.reinforce_sample_num={K}",
        f"algorithm.target_entropy={target}",
        "algorithm.reg_prompt_fraction=0.5",
        "trainer.lr=5e-4",
        "evaluation.every=2",
        "evaluation.n=2",
        "evaluation.num_prompts=12",
    ]
