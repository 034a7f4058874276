"""AdamW with warm-up + cosine decay, global-norm clipping, and weight decay on matrices only."""

from __future__ import annotations

import jax
import optax

from lm2_jax.train.config import TrainConfig


def make_schedule(cfg: TrainConfig) -> optax.Schedule:
  """Linear warm-up 0 -> learning_rate over warmup_steps, then cosine down to lr * min_lr_ratio."""
  decay = cfg.decay_steps or max(cfg.steps - cfg.warmup_steps, 1)
  return optax.warmup_cosine_decay_schedule(
      init_value=0.0, peak_value=cfg.learning_rate, warmup_steps=cfg.warmup_steps,
      decay_steps=cfg.warmup_steps + decay, end_value=cfg.learning_rate * cfg.min_lr_ratio)


def _path_str(path) -> str:
  return "/".join(str(getattr(k, "key", getattr(k, "name", getattr(k, "idx", k)))) for k in path)


def decay_mask(params):
  """True for parameters to decay: matrices (ndim >= 2) except the learned memory init.

  Norm scales, biases and gate biases are vectors and never decay; `memory_init` is a [M, D] matrix but
  it is the memory's starting state, and pulling it to zero would change what the model remembers.
  """
  return jax.tree_util.tree_map_with_path(
      lambda path, x: x.ndim >= 2 and "memory_init" not in _path_str(path), params)


def make_optimizer(cfg: TrainConfig) -> optax.GradientTransformation:
  """The run's optimizer; the learning rate follows `make_schedule(cfg)` of the optimizer step."""
  parts = []
  if cfg.clip_norm > 0:
    parts.append(optax.clip_by_global_norm(cfg.clip_norm))
  parts.append(optax.adamw(make_schedule(cfg), b1=cfg.b1, b2=cfg.b2, eps=cfg.eps,
                           weight_decay=cfg.weight_decay, mask=decay_mask))
  return optax.chain(*parts)
