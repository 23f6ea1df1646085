"""From a dataset prompt to the token ids the policy sees: user message (+ suffix) in the chat template."""

from __future__ import annotations

from transformers import PreTrainedTokenizerBase


def chat_prompt_ids(tokenizer: PreTrainedTokenizerBase, prompt: str, suffix: str = "") -> list[int]:
    """Token ids of `prompt + suffix` as one user turn, ending with the assistant header."""
    messages = [{"role": "user", "content": prompt + suffix}]
    if getattr(tokenizer, "chat_template", None):
        ids = tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=True, return_dict=False)
        return list(ids)
    return tokenizer.encode(prompt + suffix)  # base models without a template see the raw text


def encode_prompts(tokenizer: PreTrainedTokenizerBase, prompts: list[str], suffix: str = "") -> list[list[int]]:
    return [chat_prompt_ids(tokenizer, p, suffix) for p in prompts]
