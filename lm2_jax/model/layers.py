"""Llama backbone layers: RMSNorm, RoPE, grouped-query attention, SwiGLU MLP.

Parameters are named like Hugging Face Llama's (q_proj, o_proj, gate_proj, ...) so that conversion is a
key map, and carry logical axis names for the sharding rules of `lm2_jax.train.mesh`.
"""

from __future__ import annotations

import math

import flax.linen as nn
import jax
import jax.numpy as jnp

from lm2_jax.kernels import cpu_attention
from lm2_jax.model.config import ModelConfig
from lm2_jax.typing import Array

# A finite "minus infinity": a fully masked row gives a uniform softmax, never NaN.
NEG_INF = -1e30

# [B, T, D] activations with D replicated (the residual stream's sharding), pinned at the projections as a
# workaround for an XLA SPMD partitioner miscompile (jaxlib 0.12.0.1; Shardy and GSPMD alike; a single
# jitted `x @ w` reproduces it). A dot whose input is [batch on ('data', 'fsdp'), contraction on 'tensor'],
# whose weight is [contraction on 'tensor', output on 'fsdp'] and whose output is asked to be [batch on
# ('data', 'fsdp'), output on 'tensor'] gets a spurious collective-permute that swaps the batch shards
# (data 0, fsdp 1) and (data 1, fsdp 0): with data, fsdp and tensor all > 1, those rows come back computed
# from other examples. Under our rules that dot is o_proj / down_proj in the forward pass, and the input
# gradient of every [D on 'fsdp', X on 'tensor'] weight in the backward pass. The memory's [B, X, D]
# tensors carry D on 'tensor' (the 'mem_embed' rule and the head reshapes) and sharding propagation
# spreads that onto such dots (2x2x2 mesh: loss off by 0.06 after 3 steps). A constraint right at the dot
# pins its output (forward) and, through the constraint's transpose, that dot's own input gradient
# (backward) to D replicated, which XLA partitions correctly (all-reduce over 'tensor'). Each use of an
# input needs its own constraint: one constraint before a fan-out only pins the sum of the gradients.
TOKEN_AXES = ("activation_batch", "activation_length", "activation_embed")


def param_with_axes(module: nn.Module, name: str, init, shape, axes, dtype):
  """Declares a parameter whose logical axis names feed the sharding rules."""
  return module.param(name, nn.with_logical_partitioning(init, axes), shape, dtype)


def normal_init(cfg: ModelConfig):
  return nn.initializers.normal(stddev=cfg.init_std)


class Einsum(nn.Module):
  """A weight applied by an einsum; its parameter is `kernel` (Hugging Face-like key paths).

  Attributes:
    cfg: the model config (init std, dtypes).
    shape: the kernel shape. axes: its logical axis names. eqn: "<input>,<kernel>-><output>".
  """

  cfg: ModelConfig
  shape: tuple[int, ...]
  axes: tuple[str, ...]
  eqn: str

  @nn.compact
  def __call__(self, x: Array, eqn: str | None = None, kernel_shape: tuple[int, ...] | None = None
               ) -> Array:
    """x times the kernel by `eqn` (default: the module's), the kernel reshaped to `kernel_shape` first
    when given (e.g. [D, D] as [D, Nm, H] to apply it per memory head)."""
    kernel = param_with_axes(self, "kernel", normal_init(self.cfg), self.shape, self.axes,
                             self.cfg.weight_dtype).astype(self.cfg.compute_dtype)
    if kernel_shape is not None:
      kernel = kernel.reshape(kernel_shape)
    return dense_einsum(eqn or self.eqn, x, kernel)


def dense_einsum(eqn: str, x: Array, kernel: Array) -> Array:
  """`jnp.einsum(eqn, x, kernel)` for a projection "<lead><in>,<in><out>-><lead><out>", as one
  [prod(lead), prod(in)] x [prod(in), prod(out)] matmul between reshapes; other equations as einsum.

  Why: with two or more lead axes ([B, T, D] activations) XLA's CPU backend computes the weight gradient
  (a contraction over B and T) from a transposed copy of the activation gradient, written by a slow
  strided pass: a [32, 256, 128] -> 384 SwiGLU MLP's forward and backward takes ~1.5x as long as einsums
  over [B, T, .] as with 2D matmuls (bench/bench_layouts.py). The reshapes keep a sharded lead axis major,
  so the shardings carry over; accelerators see the same dot.
  """
  inputs, out = eqn.split("->")
  xs, ks = inputs.split(",")
  lead = (len(xs) + len(out) - len(ks)) // 2  # xs = lead + in, ks = in + out', out = lead + out'
  n_in = len(xs) - lead
  if (lead < 1 or n_in < 1 or xs[:lead] != out[:lead] or ks[:n_in] != xs[lead:]
      or ks[n_in:] != out[lead:]):
    return jnp.einsum(eqn, x, kernel)
  lead_shape, in_size = x.shape[:lead], math.prod(x.shape[lead:])
  out_shape = kernel.shape[n_in:]
  y = jnp.dot(x.reshape(-1, in_size), kernel.reshape(in_size, -1))
  return y.reshape(*lead_shape, *out_shape)


def constrain(x: Array, axes: tuple) -> Array:
  """Activation sharding constraint; a no-op outside a mesh with logical rules."""
  return nn.with_logical_constraint(x, axes)


class RMSNorm(nn.Module):
  """Root-mean-square norm with a learned scale, computed in float32 (as Llama does)."""

  cfg: ModelConfig

  @nn.compact
  def __call__(self, x: Array) -> Array:
    scale = param_with_axes(self, "scale", nn.initializers.ones, (x.shape[-1],), ("norm",),
                            self.cfg.weight_dtype)
    x32 = x.astype(jnp.float32)
    y = x32 * jax.lax.rsqrt(jnp.mean(x32 * x32, axis=-1, keepdims=True) + self.cfg.norm_eps)
    scale = scale.astype(jnp.float32).reshape((1,) * (x.ndim - 1) + (-1,))
    return (y * scale).astype(self.cfg.compute_dtype)


def rope_frequencies(cfg: ModelConfig, head_dim: int) -> Array:
  """Inverse frequencies [H/2] of RoPE, with Llama-3.1+ frequency scaling when configured.

  The llama3 rule: wavelengths shorter than original_max / high_freq_factor keep their frequency, those
  longer than original_max / low_freq_factor are divided by the factor, and those between interpolate.
  """
  inv_freq = 1.0 / (cfg.rope_theta ** (jnp.arange(0, head_dim, 2, dtype=jnp.float32) / head_dim))
  if cfg.rope_scaling_factor is None:
    return inv_freq
  factor, old = cfg.rope_scaling_factor, cfg.rope_original_max_position
  wavelen = 2 * jnp.pi / inv_freq
  smooth = (old / wavelen - cfg.rope_low_freq_factor) / (
      cfg.rope_high_freq_factor - cfg.rope_low_freq_factor)
  blended = (1 - smooth) * inv_freq / factor + smooth * inv_freq
  scaled = jnp.where(wavelen > old / cfg.rope_low_freq_factor, inv_freq / factor, blended)
  return jnp.where(wavelen < old / cfg.rope_high_freq_factor, inv_freq, scaled)


def rope(x: Array, positions: Array, inv_freq: Array) -> Array:
  """Rotary embedding in the rotate-half convention (Hugging Face Llama's).

  Args:
    x: [B, T, N, H] queries or keys.
    positions: [T] or [B, T] integer positions.
    inv_freq: [H/2] inverse frequencies (`rope_frequencies`).
  Returns:
    x rotated, same shape and dtype.
  """
  h = x.shape[-1]
  pos = jnp.asarray(positions, jnp.float32)
  if pos.ndim == 1:
    pos = pos[None, :]
  angles = pos[:, :, None] * inv_freq[None, None, :]  # [B|1, T, H/2]
  cos = jnp.concatenate([jnp.cos(angles)] * 2, axis=-1)[:, :, None, :]
  sin = jnp.concatenate([jnp.sin(angles)] * 2, axis=-1)[:, :, None, :]
  x32 = x.astype(jnp.float32)
  x1, x2 = x32[..., : h // 2], x32[..., h // 2:]
  rotated = jnp.concatenate([-x2, x1], axis=-1)
  return (x32 * cos + rotated * sin).astype(x.dtype)


# Self-attention over a segment of at least this many tokens is computed in CAUSAL_CHUNKS query chunks,
# each against the keys up to its own end: the keys after it are masked for every query in the chunk, so
# skipping them saves 1 - (n + 1) / 2n of the score and softmax work (3/8 with 4 chunks), as PyTorch's
# causal flash kernel does. Below it the whole [T, T] block is cheaper than the extra ops.
CAUSAL_CHUNK_MIN_LENGTH = 128
CAUSAL_CHUNKS = 4


def attend(q: Array, k: Array, v: Array, q_pos: Array, k_pos: Array, k_valid: Array) -> Array:
  """Causal grouped-query attention of queries over keys, softmax in float32.

  Args:
    q: [B, T, N, H] (already rotated). k, v: [B, S, K, H].
    q_pos: [T] query positions; k_pos: [S] key positions (a key is visible when k_pos <= q_pos).
    k_valid: [B, S] false for padding keys and empty cache slots.
  Returns:
    [B, T, N, H] in q's dtype.
  """
  qh, kh, vh = _heads_major(q, k, v)
  return _tokens_major(_attend_heads(qh, kh, vh, _mask_bias(q_pos, k_pos, k_valid)))


def _heads_major(q: Array, k: Array, v: Array) -> tuple[Array, Array, Array]:
  """q [B, T, N, H] -> scaled [B, K, G, T, H]; k, v [B, S, K, H] -> [B, K, S, H].

  The score and value products are batched over (B, K[, G]); with those axes leading and T, S, H
  trailing both are plain batched matmuls, where on the token-major layout XLA transposed each
  [B, K, G, T, S] score tensor (on CPU within noise, bench/bench_layouts.py; the v5e-256 Llama-1.2B
  compile: 9.13 -> 8.82 GiB a chip, est. 1.56 -> 1.49 s a step, docs/profile.md). The
  scale goes on q ([T, N, H] values) rather than on the scores ([N, T, S])."""
  b, t, n, h = q.shape
  kh = k.shape[2]
  qg = (q * jnp.asarray(1.0 / h**0.5, q.dtype)).reshape(b, t, kh, n // kh, h)
  return jnp.transpose(qg, (0, 2, 3, 1, 4)), jnp.swapaxes(k, 1, 2), jnp.swapaxes(v, 1, 2)


def _tokens_major(out: Array) -> Array:
  """[B, K, G, T, H] -> [B, T, N, H] (inverse of `_heads_major` for q)."""
  b, kh, g, t, h = out.shape
  return jnp.transpose(out, (0, 3, 1, 2, 4)).reshape(b, t, kh * g, h)


def _mask_bias(q_pos: Array, k_pos: Array, k_valid: Array) -> Array:
  """[B, T, S] float32: 0 where key s is visible to query t, NEG_INF elsewhere.

  The mask as an additive bias: its backward passes the gradient through unchanged, where a select
  would keep a boolean [B, K, G, T, S] residual for it."""
  visible = (k_pos[None, :] <= q_pos[:, None])[None] & k_valid[:, None, :]
  return jnp.where(visible, 0.0, NEG_INF).astype(jnp.float32)


def _attend_heads(qh: Array, kh: Array, vh: Array, bias: Array) -> Array:
  """softmax(q k^T + bias) v on the heads-major layout: qh [B, K, G, T, H], kh, vh [B, K, S, H],
  bias [B, T, S] -> [B, K, G, T, H]."""
  scores = jnp.einsum("BKGTH,BKSH->BKGTS", qh, kh, preferred_element_type=jnp.float32)
  probs = jax.nn.softmax(scores + bias[:, None, None], axis=-1).astype(vh.dtype)
  return jnp.einsum("BKGTS,BKSH->BKGTH", probs, vh)


def causal_self_attend(q: Array, k: Array, v: Array, positions: Array, valid: Array,
                       kernel: str = "xla") -> Array:
  """`attend` of a segment over its own keys, in query chunks that skip the keys after them.

  Exact for positions that increase along T (a segment's arange): every key after a chunk's last query
  is invisible to the whole chunk. kernel="auto" runs the fused CPU kernel
  (`lm2_jax.kernels.cpu_attention`) where it applies; a query with no visible key (one whose own key is
  padding and every earlier key too) then gets zeros where XLA's path averages the masked values.
  """
  if kernel == "auto" and cpu_attention.applies(q, k):
    return cpu_attention.causal_attention(q, k, v, valid).astype(q.dtype)
  t = q.shape[1]
  if t < CAUSAL_CHUNK_MIN_LENGTH or t % CAUSAL_CHUNKS:
    return attend(q, k, v, positions, positions, valid)
  c = t // CAUSAL_CHUNKS
  qh, kh, vh = _heads_major(q, k, v)
  outs = [_attend_heads(qh[:, :, :, i:i + c], kh[:, :, :i + c], vh[:, :, :i + c],
                        _mask_bias(positions[i:i + c], positions[:i + c], valid[:, :i + c]))
          for i in range(0, t, c)]
  return _tokens_major(jnp.concatenate(outs, axis=3))


class Attention(nn.Module):
  """Grouped-query causal self-attention with RoPE, over the current segment (or a given KV cache)."""

  cfg: ModelConfig

  def setup(self):
    cfg = self.cfg
    d, n, k, h = cfg.d_model, cfg.num_heads, cfg.num_kv_heads, cfg.head_dim
    self.q_proj = Einsum(cfg, (d, n, h), ("embed", "heads", "head_dim"), "BTD,DNH->BTNH")
    self.k_proj = Einsum(cfg, (d, k, h), ("embed", "kv_heads", "head_dim"), "BTD,DKH->BTKH")
    self.v_proj = Einsum(cfg, (d, k, h), ("embed", "kv_heads", "head_dim"), "BTD,DKH->BTKH")
    self.o_proj = Einsum(cfg, (n, h, d), ("heads", "head_dim", "embed"), "BTNH,NHD->BTD")

  def project_kv(self, h: Array, positions: Array) -> tuple[Array, Array]:
    """Rotated keys and values [B, T, K, H] of the normalised inputs h [B, T, D]."""
    return rope(self.k_proj(h), positions, self._inv_freq()), self.v_proj(h)

  def _inv_freq(self) -> Array:
    return rope_frequencies(self.cfg, self.cfg.head_dim)

  def __call__(self, h: Array, positions: Array, valid: Array, kv=None, kv_pos=None,
               kv_valid=None) -> Array:
    """Self-attention output [B, T, D].

    Args:
      h: [B, T, D] normalised block input. positions: [T] RoPE positions. valid: [B, T] real tokens.
      kv, kv_pos, kv_valid: keys/values [B, S, K, H] to attend over instead of h's own (decoding);
        they must already contain this call's tokens.
    """
    q = constrain(rope(self.q_proj(h), positions, self._inv_freq()),
                  ("activation_batch", "activation_length", "activation_heads", None))
    if kv is None:
      k, v = self.project_kv(h, positions)
      out = causal_self_attend(q, k, v, positions, valid, self.cfg.attention_kernel)
    else:
      out = attend(q, kv[0], kv[1], positions, kv_pos, kv_valid)
    return constrain(self.o_proj(out), TOKEN_AXES)  # the XLA workaround: see TOKEN_AXES


class MLP(nn.Module):
  """SwiGLU feed-forward: down(silu(gate(x)) * up(x))."""

  cfg: ModelConfig

  @nn.compact
  def __call__(self, x: Array) -> Array:
    cfg = self.cfg
    d, f = cfg.d_model, cfg.mlp_dim
    gate = Einsum(cfg, (d, f), ("embed", "mlp"), "BTD,DF->BTF", name="gate_proj")(x)
    up = Einsum(cfg, (d, f), ("embed", "mlp"), "BTD,DF->BTF", name="up_proj")(x)
    hidden = constrain(nn.silu(gate) * up, ("activation_batch", "activation_length", "activation_mlp"))
    out = Einsum(cfg, (f, d), ("mlp", "embed"), "BTF,FD->BTD", name="down_proj")(hidden)
    return constrain(out, TOKEN_AXES)  # the XLA workaround: see TOKEN_AXES
