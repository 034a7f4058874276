"""RMT, the Recurrent Memory Transformer baseline (Bulatov et al. 2022), on the LM2 backbone.

`memory_kind: rmt` keeps every block a plain Llama block and carries m = `num_slots` memory tokens from
segment to segment instead of an LM2 bank. Each segment of T tokens runs as one extended segment:

    [ read memory (m) | segment tokens (T) | write memory (m) ]       RoPE positions 0 .. T+2m-1

- Read tokens: the carry [B, m, D] (float32, cast to the compute dtype); the first segment's carry is the
  bank of `memory_init` (`learned`: the [m, D] parameter `memory_init`, RMT's memory embeddings), and a
  reset restarts a row there, as for LM2 (`LM2._run_segment`).
- Write tokens: their inputs are the same carry. RMT places the memory at both ends of the segment, so no
  second set of embeddings exists and the write tokens start from what the read tokens start from.
- Attention is causal over the whole extended segment: a segment token sees the read memory and the tokens
  before it, a write token sees everything. Padding (`valid=False`) is masked as a key; memory tokens are
  always valid.
- The next carry is the final hidden state of the write tokens after the final norm (the LM head's input,
  which is what Hugging Face reports as the last hidden state), in float32: a norm-bounded state, so a
  stream 16x longer than training does not grow it. A segment without a real token leaves the carry as
  it was, as LM2's write does (the harness pads batches with such segments).
- Logits, hence the loss, exist only at the segment tokens.

Causality holds by construction: segment s reads only the carry written by segments < s, and within the
extended segment the mask is causal. Positions: RoPE is relative, so only the offsets matter. The read
tokens sit m..1 positions before the first segment token and the write tokens right after the last; a
token's distance to the read memory is its index in the segment + m. Unlike LM2, where only the relative
positions of real tokens count, RMT's logits therefore change when padding moves a segment's real tokens
within the segment (the memory tokens' positions are fixed).

Decoding (`lm2_jax.model.decode.Decoder`): the read tokens never see a segment token, so their keys and
values at every layer depend on the carry alone; `read_cache` fills the first m entries of each layer's
[B, m+T, K, H] cache with them when a segment starts, and the segment's tokens then decode at cache index
and position m + i (`LM2.decode`).

The backbone's parameters are those of the Llama baseline, so a Hugging Face warm start loads unchanged;
the only new parameter is `memory_init` (with `memory_init: learned`).
"""

from __future__ import annotations

import jax.numpy as jnp

from lm2_jax.model.block import RESIDUAL_AXES, SegmentContext
from lm2_jax.model.layers import constrain
from lm2_jax.model.memory import MEMORY_AXES
from lm2_jax.typing import Array


def run_segment(mdl, memory: Array, xs: dict) -> tuple[Array, Array]:
  """One extended segment through the backbone.

  Args:
    mdl: the bound LM2 module (`memory_kind: rmt`).
    memory: the carry [B, m, D] float32, already reset / cut for this segment.
    xs: the segment's inputs: "x" [B, T, D] embeddings, "valid" [B, T] real tokens.
  Returns:
    (the next carry [B, m, D] float32, final-normed hidden states [B, T, D] of the segment tokens).
  """
  cfg = mdl.cfg
  m, (b, t) = cfg.num_memory_tokens, xs["x"].shape[:2]
  tokens = memory.astype(cfg.compute_dtype)
  x = constrain(jnp.concatenate([tokens, xs["x"], tokens], axis=1), RESIDUAL_AXES)  # [B, T+2m, D]
  always = jnp.ones((b, m), bool)
  valid = jnp.concatenate([always, xs["valid"], always], axis=1)
  h, _ = mdl._blocks(x, None, valid, jnp.arange(t + 2 * m))
  h = mdl.final_norm(h)
  written = constrain(h[:, m + t:].astype(jnp.float32), MEMORY_AXES)
  any_valid = jnp.any(xs["valid"], axis=1)[:, None, None]
  return jnp.where(any_valid, written, memory), h[:, m:m + t]


def read_cache(mdl, memory: Array, cache: tuple) -> tuple:
  """Each layer's cache with its first m entries holding the read tokens' keys and values.

  Args:
    mdl: the bound LM2 module (`memory_kind: rmt`, unrolled layout).
    memory: the carry [B, m, D] at the segment's start.
    cache: per layer (keys, values) [B, m+T, K, H].
  Returns:
    The caches, entries m.. unchanged.
  """
  cfg = mdl.cfg
  m = cfg.num_memory_tokens
  x = memory.astype(cfg.compute_dtype)
  positions = jnp.arange(m)
  shared = SegmentContext(None, jnp.ones(x.shape[:2], bool), positions)
  out = []
  for i, (keys, values) in enumerate(cache):
    block = getattr(mdl, f"block_{i}")
    k, v = block.attn.project_kv(block.attn_norm(x), positions)   # [B, m, K, H]
    out.append((keys.at[:, :m].set(k.astype(keys.dtype)), values.at[:, :m].set(v.astype(values.dtype))))
    (x, _), _ = block((x, None), None, shared)
  return tuple(out)
