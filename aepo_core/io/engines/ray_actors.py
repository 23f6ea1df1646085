"""Data-parallel rollout on a Ray cluster: D engine actors acting as one engine.

With ``run.ray_address`` set and ``rollout.data_parallel`` D > 1, the rollout and evaluation stages
run in the flow's process and sample through a :class:`RayEngine`: D Ray actors, each holding the
engine ``rollout.engine`` names (HF on its CPUs, or vLLM / HF on one GPU), loaded from the policy
folder on the shared filesystem. A call is cut into the same contiguous shards as on torchrun ranks
(``split_in_order``, aepo_core.io.engines.data_parallel), each actor samples its shard with
``first_index`` at the shard's start, and the completions are concatenated in shard order, which
is request order: the table is the one a single engine samples (tests/test_ray.py).
"""

from __future__ import annotations

from pathlib import Path

from aepo_core.config import Config
from aepo_core.core.update import split_in_order
from aepo_core.io.engines.base import Completion, SamplingRequest


class EngineActor:
    """One engine in a Ray actor's process (``ray.remote(EngineActor)``): `threads` torch threads."""

    def __init__(self, cfg: Config, model_path: str, threads: int):
        import torch

        from aepo_core.io.engines import make_engine

        torch.set_num_threads(threads)  # the CPUs the actor reserved (Ray also sets OMP_NUM_THREADS to them)
        self.engine = make_engine(cfg, model_path)

    def generate(self, requests: list[SamplingRequest], seed: int, first_index: int, progress: bool) -> list[Completion]:
        self.engine.show_progress = progress
        return self.engine.generate(requests, seed, first_index=first_index)

    def load_weights(self, folder: str) -> None:
        self.engine.load_weights(folder)


class RayEngine:
    """D engine actors on the Ray cluster sampling one call together (a :class:`RolloutEngine`).

    Args:
        cfg: the run's config (rollout.engine, its settings, trainer.device: an actor takes one GPU
            where the engine samples on GPUs).
        model_path: the policy folder, at a path every node sees.
        world: D, the number of actors.
        cpus: CPUs each actor reserves and uses as torch threads.
    Use it in a ``with`` block or call :meth:`close`: the actors hold their CPUs / GPUs until then.
    """

    def __init__(self, cfg: Config, model_path: str | Path, world: int, cpus: int):
        import ray

        from aepo_core.io.models import load_tokenizer, resolve_device

        self.world, self.show_progress = world, False
        self.tokenizer = load_tokenizer(model_path, cfg.model.trust_remote_code)  # the stage encodes prompts here
        gpus = 1 if resolve_device(cfg.trainer).type == "cuda" else 0
        actor = ray.remote(EngineActor).options(num_cpus=cpus, num_gpus=gpus)
        self.actors = [actor.remote(cfg, str(model_path), cpus) for _ in range(world)]

    def generate(self, requests: list[SamplingRequest], seed: int, first_index: int = 0) -> list[Completion]:
        """The call's completions in request order: actor r samples ``split_in_order(len, D)[r]``."""
        import ray

        shards = split_in_order(len(requests), self.world)
        parts = [
            actor.generate.remote(requests[s.start : s.stop], seed, first_index + s.start, self.show_progress and r == 0)
            for r, (actor, s) in enumerate(zip(self.actors, shards, strict=False))
        ]
        return [c for part in ray.get(parts) for c in part]

    def load_weights(self, folder: str | Path) -> None:
        import ray

        ray.get([a.load_weights.remote(str(folder)) for a in self.actors])

    def close(self) -> None:
        import ray

        for actor in self.actors:
            ray.kill(actor)
        self.actors = []

    def __enter__(self) -> RayEngine:
        return self

    def __exit__(self, *exc) -> None:
        self.close()
