"""Training: run config, mesh + sharding rules, optimizer, train state, steps, checkpoints, metrics, loop.

Entry point: `lm2_jax.train.loop.train(config.load_config(path, overrides))` (what `train.py` does).
"""
