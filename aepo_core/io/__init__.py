"""Reading and writing the outside world: models and tokenizers (models), user datasets (datasets),
chat prompts (prompts), reward verifiers (verifiers), rollout engines (engines: hf, vllm).
Imports the foundation and the core only."""
