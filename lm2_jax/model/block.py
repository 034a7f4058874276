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
import jax.numpy as jnp

from lm2_jax.kernels import cpu_attention
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

  def setup(self):
    cfg = self.cfg
    self.attn_norm = RMSNorm(cfg)
    self.attn = Attention(cfg)
    if self.has_memory:
      self.memory = Memory(cfg)
    self.mlp_norm = RMSNorm(cfg)
    self.mlp = MLP(cfg)

  def __call__(self, carry, bank, shared: SegmentContext):
    cfg = self.cfg
    x, chain = carry
    h = self.attn_norm(x)
    update = self.attn(h, shared.positions, shared.valid)
    if self.has_memory:
      if cfg.memory_flow == "chained":
        read, chain = self.memory(h, shared.start_bank, chain, shared.valid)
      else:
        read, bank = self.memory(h, bank, bank, shared.valid)
      update = update + read
    x = constrain(x + update, RESIDUAL_AXES)
    return (self._mlp(x), chain), bank

  def decode(self, x: Array, read_bank: Array | None, cache: tuple[Array, Array], cache_valid: Array,
             index: Array):
    """Runs n new tokens of the current segment against a KV cache (no memory write).

    Args:
      x: [B, n] + [D] block inputs of tokens at segment positions index..index+n-1.
      read_bank: [B, M, D] the bank this block reads (segment start), None without memory.
      cache: keys, values [B, T, K, H] of the segment so far; this call writes its n entries.
      cache_valid: [B, T] real tokens in the cache, this call's tokens included.
      index: int32 scalar, the segment position of x's first token.
    Returns:
      (block output [B, n, D], updated cache).
    """
    n, t = x.shape[1], cache[0].shape[1]
    positions = index + jnp.arange(n)
    h = self.attn_norm(x)
    k_new, v_new = self.attn.project_kv(h, positions)
    keys = jax.lax.dynamic_update_slice_in_dim(cache[0], k_new.astype(cache[0].dtype), index, axis=1)
    values = jax.lax.dynamic_update_slice_in_dim(cache[1], v_new.astype(cache[1].dtype), index, axis=1)
    update = self.attn(h, positions, None, kv=(keys, values), kv_pos=jnp.arange(t),
                       kv_valid=cache_valid)
    if self.has_memory:
      update = update + self.memory.read_segment(h, read_bank)
    return self._mlp(x + update), (keys, values)

  def _mlp(self, x: Array) -> Array:
    return constrain(x + self.mlp(self.mlp_norm(x)), RESIDUAL_AXES)


def remat_policy(name: str):
  """The jax.checkpoint policy of `ModelConfig.remat`."""
  # Both keep the fused CPU attention kernel's outputs (named only where it runs): its backward pass
  # needs nothing else from the forward kernel, so the recompute skips it.
  kernel = jax.checkpoint_policies.save_only_these_names(cpu_attention.SAVE_NAME)
  if name == "full":
    return kernel  # else save nothing: recompute the whole block in the backward pass
  if name == "dots":
    return jax.checkpoint_policies.save_from_both_policies(jax.checkpoint_policies.checkpoint_dots,
                                                           kernel)
  raise ValueError(f"no remat policy for {name!r}")


def block_class(cfg: ModelConfig):
  """DecoderBlock, wrapped in nn.remat when `cfg.remat` asks for it."""
  if cfg.remat == "none":
    return DecoderBlock
  return nn.remat(DecoderBlock, policy=remat_policy(cfg.remat), prevent_cse=not cfg.scan_layers)
