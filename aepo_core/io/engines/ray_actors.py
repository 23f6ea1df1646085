"""Data-parallel rollout on a Ray cluster: D engine actors acting as one engine.

With ``run.ray_address`` set and ``rollout.data_parallel`` D > 1, the rollout and evaluation stages
run in the flow's process and sample through a :class:`RayEngine`: D Ray actors, each holding the
engine ``rollout.engine`` names (HF on its CPUs, or vLLM / HF on its GPUs), loaded from the policy
folder on the shared filesystem. A call is cut into the shards torchrun ranks would sample
(``request_shards``, aepo_core.io.engines.data_parallel), each actor samples its shard with
``first_index`` at the shard's start, and the completions are concatenated in shard order, which
is request order: the table is the one a single engine samples (tests/test_distributed_run.py).
"""

from __future__ import annotations

from pathlib import Path

from aepo_core.config import Config
from aepo_core.io.engines.base import Completion, SamplingRequest
from aepo_core.io.engines.data_parallel import request_shards

READY_TIMEOUT_S = 1800  # an actor's start and model load (a large model's vLLM start takes minutes)


class EngineActor:
    """One engine in a Ray actor's process (``ray.remote(EngineActor)``): `threads` torch threads."""

    def __init__(self, cfg: Config, model_path: str, threads: int):
        import torch

        from aepo_core.io.engines import make_engine

        torch.set_num_threads(threads)  # the CPUs the actor reserved (Ray also sets OMP_NUM_THREADS to them)
        self.engine = make_engine(cfg, model_path)

    def ready(self) -> bool:
        return True

    def generate(self, requests: list[SamplingRequest], seed: int, first_index: int, progress: bool) -> list[Completion]:
        self.engine.show_progress = progress
        return self.engine.generate(requests, seed, first_index=first_index)

    def load_weights(self, folder: str) -> None:
        self.engine.load_weights(folder)


class RayEngine:
    """D engine actors on the Ray cluster sampling one call together (a :class:`RolloutEngine`).

    Args:
        cfg: the run's config (rollout.engine and its settings).
        model_path: the policy folder, at a path every node sees (made absolute here).
        world: D, the number of actors.
        resources: what each actor reserves, {"CPU": c, "GPU": g} (aepo_core.pipeline.ray_cluster
            .worker_resources); it runs c torch threads.
    Raises ray's errors (an actor that failed to start, or GetTimeoutError after READY_TIMEOUT_S):
    the constructor waits until every actor has loaded its engine, so that a start failure is not
    counted as sampling time and shows here. Use it in a ``with`` block or call :meth:`close`: the
    actors hold their CPUs / GPUs until then.
    """

    def __init__(self, cfg: Config, model_path: str | Path, world: int, resources: dict[str, float]):
        import ray

        from aepo_core.io.models import load_tokenizer

        folder = Path(model_path).resolve() if Path(model_path).exists() else model_path  # or a hub id
        self.world, self.show_progress = world, False
        self.tokenizer = load_tokenizer(folder, cfg.model.trust_remote_code)  # the stage encodes prompts here
        actor = ray.remote(EngineActor).options(num_cpus=resources["CPU"], num_gpus=resources.get("GPU", 0))
        self.actors = [actor.remote(cfg, str(folder), int(resources["CPU"])) for _ in range(world)]
        try:
            ray.get([a.ready.remote() for a in self.actors], timeout=READY_TIMEOUT_S)
        except BaseException:
            self.close()
            raise

    def generate(self, requests: list[SamplingRequest], seed: int, first_index: int = 0) -> list[Completion]:
        """The call's completions in request order: actor r samples ``request_shards(len, D)[r]``."""
        import ray

        parts = [
            actor.generate.remote(requests[s.start : s.stop], seed, first_index + s.start, self.show_progress and r == 0)
            for r, (actor, s) in enumerate(zip(self.actors, request_shards(len(requests), self.world), strict=True))
            if len(s)
        ]
        return [c for part in ray.get(parts) for c in part]

    def load_weights(self, folder: str | Path) -> None:
        import ray

        ray.get([a.load_weights.remote(str(Path(folder).resolve())) for a in self.actors])

    def close(self) -> None:
        import ray

        for actor in self.actors:
            ray.kill(actor)
        self.actors = []

    def __enter__(self) -> RayEngine:
        return self

    def __exit__(self, *exc) -> None:
        self.close()
