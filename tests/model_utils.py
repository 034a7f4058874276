"""Shared helpers of the model tests: tiny configs and initialised models."""

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from lm2_jax.model import LM2, ModelConfig
from lm2_jax.model.memory import Memory

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


# Two paths computing the same values (one call, a scan, a loop, decoding) may differ by rounding. float32:
# by 1e-5. bfloat16: by 5% of the spread (std) of the values compared, so that the check keeps its power
# whatever their scale (logits at init have a std of ~0.12; a fixed 6e-2 was half of it). On this CPU the
# paths agree exactly; what bfloat16 rounding costs at all, max |bfloat16 - float32 forward|, is ~3% of
# the logits' std and ~1% of the memory's (tiny config, 4 segments), so 5% leaves room for backends whose
# fusion rounds differently.
F32_TOL = 1e-5
BF16_REL = 0.05


def tolerance(dtype: str, reference) -> float:
  """The allowed max |diff| between two paths that compute `reference` in `dtype`."""
  if dtype == "float32":
    return F32_TOL
  return BF16_REL * float(jnp.std(jnp.asarray(reference, jnp.float32)))


def max_abs_diff(a, b) -> float:
  return float(jnp.max(jnp.abs(jnp.asarray(a, jnp.float32) - jnp.asarray(b, jnp.float32))))


def sigmoid(x):
  """NumPy sigmoid, for the reference replays of the memory writes."""
  return 1.0 / (1.0 + np.exp(-x))


def init_memory_module(cfg: ModelConfig, h, bank, valid, seed: int = 0):
  """(a Memory module, its unboxed variables) initialised on one segment h [B, T, D]."""
  mem = Memory(cfg)
  return mem, nn.unbox(mem.init(jax.random.key(seed), h, bank, bank, valid))


def key_value_row(k: int, v: int, d: int):
  """A hand-made token input [D]: key k one-hot in dims 0..7, value v one-hot in dims 8..15."""
  x = np.zeros(d, np.float32)
  x[k] = x[8 + v] = 1.0
  return x


def lookup_gate_params(d: int) -> dict:
  """Hand-set Memory parameters shared by the lookup tests: value and update pass dims through (update
  x3, so tanh saturates), the output gate is 1/2 everywhere, the input gate open and the forget gate shut:
  a write replaces what the addressed slot held. Addressing parameters are the caller's."""
  eye = np.eye(d, dtype=np.float32)
  zeros = np.zeros((d, d), np.float32)
  return {"value": {"kernel": eye}, "update": {"kernel": 3.0 * eye}, "out_gate": {"kernel": zeros},
          "in_gate": {"kernel": zeros, "bias": np.full((d,), 20.0, np.float32)},
          "forget_gate": {"kernel": zeros, "bias": np.full((d,), -20.0, np.float32)}}


def first_memory_block_grads(cfg: ModelConfig) -> dict:
  """Gradients of block 0's memory parameters for a loss on the last of 3 segments only: what reaches
  them went through the bank written in earlier segments."""
  model, variables, tokens = init_model(cfg, batch=2, segments=3)
  targets = jnp.roll(tokens, -1, axis=1)
  mask = jnp.zeros(tokens.shape).at[:, -cfg.segment_length:].set(1.0)

  def loss(p):
    stats, _ = model.apply({"params": p}, tokens, targets, mask, method="loss")
    return stats.nll_sum.sum()

  return nn.unbox(jax.grad(loss)(variables["params"]))["block_0"]["memory"]
