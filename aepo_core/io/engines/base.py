"""The rollout interface shared by the HF transformers engine (CPU default) and the vLLM engine.

One `generate` call takes every request of an iteration (the policy batch at T=1 and the AEPO
regulariser batch at T_high/T_low together), each with its own temperature, n, top_p and token budget.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Literal, Protocol, runtime_checkable

from transformers import PreTrainedTokenizerBase


@dataclass(frozen=True)
class SamplingRequest:
    """One prompt to sample `n` responses for.

    seed: this request's own random stream (None: derived from the call's seed and the request's
    position in the call, `first_index` + its index in the list). With a seed, a request's samples do not depend on what else is sampled
    with it: the same request alone, in another order or in another batch gives the same responses
    (HF engine; vLLM on GPUs).
    """

    prompt_token_ids: list[int]
    n: int = 1
    temperature: float = 1.0  # 0 means greedy
    top_p: float = 1.0
    max_new_tokens: int = 64
    seed: int | None = None


@dataclass
class Completion:
    """One sampled response. `logprobs[i]` is log p(token_ids[i]) under the distribution it was drawn
    from: softmax(logits / temperature), renormalised over the top-p nucleus when top_p < 1. Greedy
    rows (temperature 0) report log-probs at temperature 1."""

    request_index: int
    sample_index: int
    temperature: float
    token_ids: list[int]
    logprobs: list[float]
    text: str
    finish_reason: Literal["stop", "length"]


@runtime_checkable
class RolloutEngine(Protocol):
    """Everything the stages, the evaluation and the shared-engine cache use of an engine.

    Both engines (:class:`aepo_core.io.engines.hf.HFRolloutEngine`,
    :class:`aepo_core.io.engines.vllm.VLLMRolloutEngine`) implement every member; tests/test_engine.py
    checks that, and that no caller uses a member declared nowhere here.
    """

    tokenizer: PreTrainedTokenizerBase  # the policy's tokenizer: prompts are encoded with it
    show_progress: bool  # show a progress bar while generating (the rollout stage sets it per call)

    def generate(self, requests: list[SamplingRequest], seed: int, first_index: int = 0) -> list[Completion]:
        """All completions, ordered by request then sample index (request i's n rows are contiguous).

        first_index: the position of requests[0] in a larger call this one is a contiguous shard of
        (data-parallel rollout, :class:`aepo_core.io.engines.data_parallel.DataParallelEngine`): an
        unseeded request draws the random stream of its position in the whole call, and completions
        carry that position as their request_index, so the shards' completions concatenated are
        the whole call's."""
        ...

    def load_weights(self, folder: str | Path) -> None:
        """Switch to the policy saved in `folder` (an HF checkpoint of the same architecture)."""
        ...

    def close(self) -> None:
        """Release the model (and its device memory); the engine is not used afterwards."""
        ...
