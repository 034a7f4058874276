"""One decoder block: pre-norm self-attention (+ the memory read), then a SwiGLU MLP.

The block's call signature is a scan body, `(carry, bank, shared) -> (carry, bank)`, so the same module
runs unrolled or under `nn.scan` over layers:

  carry  = (x [B, T, D], chain)   chain: the bank being written through the blocks (`chained` flow), or None
  bank   = this block's own bank [B, M, D] (`per_block` flow), or None
  shared = SegmentContext: what every block sees unchanged (the segment-start bank, masks, positions)
"""

from __future__ import annotations

from typing import NamedTuple

import flax.linen as nn
import jax

from lm2_jax.model.config import ModelConfig
from lm2_jax.model.layers import MLP, Attention, RMSNorm, constrain
from lm2_jax.model.memory import Memory
from lm2_jax.typing import Array

RESIDUAL_AXES = ("activation_batch", "activation_length", "activation_embed")


class SegmentContext(NamedTuple):
  """Inputs every block of a segment shares.

  Attributes:
    start_bank: [B, M, D] float32 the chained bank at the segment's start (None otherwise).
    valid: [B, T] real tokens. positions: [T] RoPE positions.
  """

  start_bank: Array | None
  valid: Array
  positions: Array


class DecoderBlock(nn.Module):
  """A Llama decoder block, with an LM2 memory module when `has_memory`."""

  cfg: ModelConfig
  has_memory: bool

  @nn.compact
  def __call__(self, carry, bank, shared: SegmentContext):
    cfg = self.cfg
    x, chain = carry
    h = RMSNorm(cfg, name="attn_norm")(x)
    update = Attention(cfg, name="attn")(h, shared.positions, shared.valid)
    if self.has_memory:
      if cfg.memory_flow == "chained":
        read, chain = Memory(cfg, name="memory")(h, shared.start_bank, chain, shared.valid)
      else:
        read, bank = Memory(cfg, name="memory")(h, bank, bank, shared.valid)
      update = update + read
    x = constrain(x + update, RESIDUAL_AXES)
    x = x + MLP(cfg, name="mlp")(RMSNorm(cfg, name="mlp_norm")(x))
    return (constrain(x, RESIDUAL_AXES), chain), bank


def remat_policy(name: str):
  """The jax.checkpoint policy of `ModelConfig.remat`."""
  if name == "full":
    return None  # save nothing: recompute the whole block in the backward pass
  if name == "dots":
    return jax.checkpoint_policies.checkpoint_dots
  raise ValueError(f"no remat policy for {name!r}")


def block_class(cfg: ModelConfig):
  """DecoderBlock, wrapped in nn.remat when `cfg.remat` asks for it."""
  if cfg.remat == "none":
    return DecoderBlock
  return nn.remat(DecoderBlock, policy=remat_policy(cfg.remat), prevent_cse=not cfg.scan_layers)
