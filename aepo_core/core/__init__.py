"""The algorithm core: pure functions over tensors and the one update step.

advantages, losses, entropy, batch (the padded batch), aepo (controller state, positives, assembly),
baselines (entropy bonus / shaping, Clip-Cov / KL-Cov), algorithms (the registry), update (the
generic PPO epoch). Imports only the foundation (aepo_core.config, errors): no I/O, no pipeline.
"""
