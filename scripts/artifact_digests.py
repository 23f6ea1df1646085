"""Digests of every artifact of small fixed-seed runs: the behaviour-preservation check of a refactor.

    python scripts/artifact_digests.py --out before.json            # on the old code
    python scripts/artifact_digests.py --out after.json --compare before.json   # on the new code

Trains, through the stage functions (no Prefect, no MLflow), a 3-iteration run per algorithm
(aepo, grpo by default; --algorithms to choose) on the embedded base policy, float32, and records
the sha256 of every artifact a stage writes -- rollouts, rewards, the update batch, the policy
weights, the optimiser state, the controller decision, the evaluation -- but not the manifests
(they hold timings); JSON records also key by key. With --compare, prints each artifact that
differs or exists on one side only, and exits 1 if any does.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

ARTIFACTS = {
    "rollout": ["rollouts.parquet"],
    "reward": ["rewards.parquet"],
    "update": ["update_batch.parquet", "policy/model.safetensors", "optimizer.pt", "controller_after.json"],
    "entropy": ["controller.json"],
    "evaluate": ["eval.parquet"],
}
OVERRIDES = [
    "rollout.prompts_per_batch=6", "rollout.n=4", "rollout.max_new_tokens=32", "algorithm.reinforce_sample_num=3",
    "algorithm.reg_prompt_fraction=0.5", "algorithm.target_entropy=0.3", "trainer.lr=5e-4", "trainer.dtype=float32",
    "evaluation.every=3", "evaluation.n=2", "evaluation.num_prompts=8", "data.synthetic.n_train=200",
    "data.synthetic.n_eval=16", "run.iterations=3",
]


def _sha(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def _leaves(node, prefix=""):
    """(dotted key, value) of every leaf of a JSON object."""
    if isinstance(node, dict):
        for key, value in node.items():
            yield from _leaves(value, f"{prefix}.{key}" if prefix else key)
    else:
        yield prefix, node


def digests(algorithm: str, root: Path) -> dict[str, str]:
    from aepo_core.config import load_config
    from aepo_core.io.engines import release_shared_engine
    from aepo_core.pipeline import stages

    cfg = load_config(None, [*OVERRIDES, f"algorithm.name={algorithm}", f"run.runs_root={root}"])
    run = stages.init_run(cfg, log=None)
    out = {}
    for i in range(cfg.run.iterations):
        for stage in stages.stages_of(cfg, i):
            stages.PIPELINE[stage].run(run, i)
            for name in ARTIFACTS[stage] if stage in ARTIFACTS else []:
                path = run.stage_dir(i, stage) / name
                if not path.is_file():
                    continue
                out[f"{algorithm}/iter_{i}/{stage}/{name}"] = _sha(path)
                if name.endswith(".json"):  # also key by key: a record that gained a key still compares
                    for key, value in _leaves(json.loads(path.read_text())):
                        text = json.dumps(value, sort_keys=True).encode()
                        out[f"{algorithm}/iter_{i}/{stage}/{name}#{key}"] = hashlib.sha256(text).hexdigest()
    release_shared_engine()
    return out


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, required=True)
    parser.add_argument("--compare", type=Path)
    parser.add_argument("--algorithms", default="aepo,grpo")
    ns = parser.parse_args()
    os.environ.setdefault("OMP_NUM_THREADS", "1")
    import torch

    torch.set_num_threads(1)
    result = {}
    with tempfile.TemporaryDirectory(prefix="aepo-digests-") as tmp:
        for algorithm in ns.algorithms.split(","):
            result.update(digests(algorithm, Path(tmp)))
    ns.out.write_text(json.dumps(result, indent=1, sort_keys=True))
    print(f"{len(result)} artifacts -> {ns.out}")
    if ns.compare:
        before = json.loads(ns.compare.read_text())
        differ = sorted(k for k in set(before) | set(result) if before.get(k) != result.get(k))
        for key in differ:
            print(f"DIFFERS  {key}")
        print(f"{len(result) - len(differ)} of {len(set(before) | set(result))} artifacts bit-identical")
        return 1 if differ else 0
    return 0


if __name__ == "__main__":
    sys.exit(main())
