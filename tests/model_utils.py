"""Shared helpers of the model tests: tiny configs and initialised models."""

import jax
import jax.numpy as jnp

from lm2_jax.model import LM2, ModelConfig

TINY = "configs/model/tiny.yaml"


def tiny_config(**overrides) -> ModelConfig:
  return ModelConfig.from_yaml(TINY, **overrides)


def init_model(cfg: ModelConfig, batch: int = 2, segments: int = 3, seed: int = 0):
  """(model, variables, tokens [batch, segments*T]) with random tokens."""
  model = LM2(cfg)
  tokens = jax.random.randint(jax.random.key(seed + 1), (batch, segments * cfg.segment_length), 0,
                              cfg.vocab_size)
  variables = model.init(jax.random.key(seed), tokens)
  return model, variables, tokens


def max_abs_diff(a, b) -> float:
  return float(jnp.max(jnp.abs(jnp.asarray(a, jnp.float32) - jnp.asarray(b, jnp.float32))))
