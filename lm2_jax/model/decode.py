"""Streaming inference and incremental decoding: a KV cache for the current segment plus the memory.

Full segments run through the jitted segment forward (`LM2.__call__` on T tokens with the carried
memory), so a context of C segments costs C segment steps and constant device memory. Tokens of an
unfinished segment run through `LM2.decode` against a KV cache; when the segment fills, the memory is
written from it (one segment forward over its T tokens) and the cache restarts (DESIGN.md §2). The
host tracks the position in the segment, so every jitted call has static shapes. With RMT
(`memory_kind: rmt`) each layer's cache holds m + T entries: the read memory tokens' keys and values
(`rmt.read_cache`, filled when a segment's first token arrives) and then the segment's.
"""

from __future__ import annotations

import dataclasses

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from lm2_jax.model.config import ModelConfig
from lm2_jax.model.layout import unstack_layers
from lm2_jax.model import rmt
from lm2_jax.model.lm2 import LM2
from lm2_jax.typing import Array


@dataclasses.dataclass
class DecodeState:
  """Where a batch of streams stands.

  Attributes:
    memory: the carry at the current segment's start (None without memory).
    cache: per layer (keys, values) [B, T, K, H] of the current segment ([B, m+T, K, H] with RMT: the
      read memory tokens first).
    tokens: int32 [B, T] tokens of the current segment so far (the write needs them).
    valid: bool [B, T] real tokens among them.
    bound: int32 [B, T] their bound tokens (-1: none; `LM2.__call__`'s bound channel).
    length: how many tokens the current segment holds (host int, equal across the batch).
    position: tokens consumed since the start of the stream.
  """

  memory: Array | None
  cache: tuple
  tokens: Array
  valid: Array
  bound: Array
  length: int = 0
  position: int = 0


class Decoder:
  """Jitted streaming forward and token-by-token decoding for one model's variables.

  Args:
    cfg: the model config (scanned or unrolled; decoding always runs the unrolled layout).
    variables: {"params": ...} of `LM2(cfg)`.
    max_length: the cache length of a `full`-attention model (its whole context); ignored otherwise.
  """

  def __init__(self, cfg: ModelConfig, variables, max_length: int | None = None):
    params = nn.unbox(variables["params"])
    if cfg.scan_layers:
      params = unstack_layers(params, cfg)
    self.cfg = cfg.replace(scan_layers=False, remat="none")
    self.model = LM2(self.cfg)
    self.variables = {"params": params}
    if self.cfg.attention == "full":
      if max_length is None:
        raise ValueError("a full-attention model decodes into a cache of max_length tokens: pass it")
      self.segment_length = max_length
    else:
      self.segment_length = self.cfg.segment_length
    self._segment = jax.jit(self._segment_fn)
    self._chunk = jax.jit(self._chunk_fn)
    self._read_cache = jax.jit(self._read_cache_fn)

  def _segment_fn(self, variables, tokens, memory, valid, bound):
    return self.model.apply(variables, tokens, memory=memory, valid=valid, bound=bound)

  def _chunk_fn(self, variables, tokens, memory, cache, cache_valid, index, bound):
    return self.model.apply(variables, tokens, memory, cache, cache_valid, index, bound,
                            method=LM2.decode)

  def _read_cache_fn(self, variables, memory, cache):
    return self.model.apply(variables, memory, cache, method=rmt.read_cache)

  def init_state(self, batch_size: int) -> DecodeState:
    """An empty stream: initial memory, empty cache."""
    cfg, t = self.cfg, self.segment_length
    memory = self.model.apply(self.variables, batch_size, method=LM2.initial_memory)
    shape = (batch_size, t + cfg.num_memory_tokens, cfg.num_kv_heads, cfg.head_dim)
    zeros = jnp.zeros(shape, cfg.compute_dtype)
    cache = tuple((zeros, zeros) for _ in range(cfg.num_layers))
    return DecodeState(memory, cache, jnp.zeros((batch_size, t), jnp.int32),
                       jnp.zeros((batch_size, t), bool), jnp.full((batch_size, t), -1, jnp.int32))

  def feed(self, state: DecodeState, tokens, valid=None, bound=None) -> tuple[Array, DecodeState]:
    """Consumes tokens [B, n] (any n; bound [B, n] optional); returns their logits [B, n, V] and the
    new state."""
    tokens = jnp.asarray(tokens, jnp.int32)
    valid = jnp.ones(tokens.shape, bool) if valid is None else jnp.asarray(valid, bool)
    bound = jnp.full(tokens.shape, -1, jnp.int32) if bound is None else jnp.asarray(bound, jnp.int32)
    t, n, done, outs = self.segment_length, tokens.shape[1], 0, []
    while done < n:
      if state.length == 0 and n - done >= t and self.cfg.attention == "segment":
        # A whole segment: one segment forward gives its logits and the next memory.
        logits, memory = self._segment(self.variables, tokens[:, done:done + t], state.memory,
                                       valid[:, done:done + t], bound[:, done:done + t])
        state = dataclasses.replace(state, memory=memory, position=state.position + t)
        outs.append(logits)
        done += t
        continue
      take = min(n - done, t - state.length)
      logits, state = self._feed_chunk(state, tokens[:, done:done + take], valid[:, done:done + take],
                                       bound[:, done:done + take])
      outs.append(logits)
      done += take
    return jnp.concatenate(outs, axis=1), state

  def _feed_chunk(self, state, tokens, valid, bound):
    i, n = state.length, tokens.shape[1]
    if i + n > self.segment_length:
      raise ValueError(f"the cache holds {self.segment_length} tokens; {i} + {n} do not fit")
    seg_tokens = state.tokens.at[:, i:i + n].set(tokens)
    seg_valid = state.valid.at[:, i:i + n].set(valid)
    seg_bound = state.bound.at[:, i:i + n].set(bound)
    cache = state.cache
    if i == 0 and self.cfg.num_memory_tokens:
      cache = self._read_cache(self.variables, state.memory, cache)
    logits, cache = self._chunk(self.variables, tokens, state.memory, cache, seg_valid,
                                jnp.int32(i), bound)
    state = dataclasses.replace(state, cache=cache, tokens=seg_tokens, valid=seg_valid,
                                bound=seg_bound, length=i + n, position=state.position + n)
    if state.length == self.segment_length and self.cfg.attention == "segment":
      state = self.close_segment(state)
    return logits, state

  def close_segment(self, state: DecodeState) -> DecodeState:
    """Writes the memory from the finished segment and empties the cache."""
    _, memory = self._segment(self.variables, state.tokens, state.memory, state.valid, state.bound)
    return dataclasses.replace(state, memory=memory, length=0,
                               tokens=jnp.zeros_like(state.tokens),
                               valid=jnp.zeros_like(state.valid),
                               bound=jnp.full_like(state.bound, -1))

  def generate(self, state: DecodeState, last_logits, max_new_tokens: int, *, eos_id: int | None = None,
               temperature: float = 0.0, top_k: int | None = None, top_p: float | None = None,
               rng=None) -> tuple[np.ndarray, DecodeState]:
    """Continues every stream from `last_logits` [B, V] (the logits after the prompt).

    Returns the generated tokens int32 [B, <= max_new_tokens] (EOS included; rows that stopped early
    are padded with eos_id) and the final state. Stops once every row has produced EOS.
    """
    rng = jax.random.key(0) if rng is None else rng
    b = last_logits.shape[0]
    finished = np.zeros((b,), bool)
    out = []
    logits = last_logits
    for _ in range(max_new_tokens):
      rng, key = jax.random.split(rng)
      token = np.asarray(sample_logits(logits, key, temperature, top_k, top_p))
      if eos_id is not None:
        token = np.where(finished, eos_id, token)
        finished |= token == eos_id
      out.append(token)
      if eos_id is not None and finished.all():
        break
      step_logits, state = self.feed(state, token[:, None])
      logits = step_logits[:, -1]
    return np.stack(out, axis=1).astype(np.int32), state


def sample_logits(logits: Array, rng, temperature: float = 0.0, top_k: int | None = None,
                  top_p: float | None = None) -> Array:
  """Next tokens [B] from logits [B, V]: greedy at temperature 0, else top-k / nucleus sampling."""
  if temperature <= 0.0:
    return jnp.argmax(logits, axis=-1)
  logits = logits.astype(jnp.float32) / temperature
  if top_k is not None:
    kth = jax.lax.top_k(logits, top_k)[0][:, -1:]
    logits = jnp.where(logits >= kth, logits, -jnp.inf)
  if top_p is not None:
    order = jnp.argsort(-logits, axis=-1)
    sorted_logits = jnp.take_along_axis(logits, order, axis=-1)
    cum = jnp.cumsum(jax.nn.softmax(sorted_logits, axis=-1), axis=-1)
    keep_sorted = (cum - jax.nn.softmax(sorted_logits, axis=-1)) < top_p  # always keeps the top token
    keep = jnp.zeros_like(keep_sorted).at[jnp.arange(logits.shape[0])[:, None], order].set(keep_sorted)
    logits = jnp.where(keep, logits, -jnp.inf)
  return jax.random.categorical(rng, logits, axis=-1)
