"""The embedded default: the synthetic addition task (synthetic), its tokenizer (tokenizer) and the
tiny base policy warmed up on it (base_policy). Imports the foundation, the core and io."""
