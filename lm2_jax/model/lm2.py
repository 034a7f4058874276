"""LM2: a Llama decoder whose blocks own a gated memory, run as a scan over segments (DESIGN.md §2).

A sequence of C*T tokens is cut into C segments of T tokens. The memory is the carry of an `nn.scan` over
segments: every block reads the memory as it stood at the segment's start and the segment's write gives
the next segment's memory. So a token only sees memory built from earlier segments.

    logits, memory = LM2(cfg).apply(variables, tokens)                  # tokens int32 [B, C*T]
    logits, memory = LM2(cfg).apply(variables, more, memory=memory)     # continue the stream
    stats, memory = LM2(cfg).apply(variables, tokens, targets, loss_mask, method=LM2.loss)

`loss` computes per-row cross-entropy sums inside the segment scan, so [B, C*T, V] logits never exist.
With `unroll_segments` >= C it runs the C segments as straight-line code instead (same function): a scan's
backward pass keeps each segment's saved activations in [C, ...] loop buffers, and on CPU writing,
copying and slicing those cost more than the recompute they save (docs/profile.md, session 8).
With `memory_kind: rmt` the same scan carries RMT memory tokens instead (`lm2_jax.model.rmt`).
"""

from __future__ import annotations

from typing import NamedTuple

import flax.linen as nn
import jax
import jax.numpy as jnp

from lm2_jax.model import rmt
from lm2_jax.model.block import SegmentContext, block_class
from lm2_jax.model.config import ModelConfig
from lm2_jax.model.layers import Einsum, RMSNorm, constrain, normal_init
from lm2_jax.model.memory import MEMORY_AXES, initial_bank
from lm2_jax.typing import Array

LOGIT_AXES = ("activation_batch", "activation_length", "activation_vocab")


class LossStats(NamedTuple):
  """Per-row sums over the loss-masked positions, float32 [B] each.

  Attributes:
    nll_sum: summed negative log-likelihood of the targets.
    weight_sum: summed loss mask (how many target tokens count).
    correct_sum: summed mask where argmax(logits) == target.
  """

  nll_sum: Array
  weight_sum: Array
  correct_sum: Array


def _layer_stack(cfg: ModelConfig, n: int, has_memory: bool):
  """n blocks whose parameters are stacked on a leading 'layers' axis, run with nn.scan."""
  return nn.scan(
      block_class(cfg),
      variable_axes={"params": 0, "intermediates": 0},
      split_rngs={"params": True},
      in_axes=(0, nn.broadcast),
      length=n,
      metadata_params={nn.PARTITION_NAME: "layers"},
  )(cfg, has_memory)


class LM2(nn.Module):
  """The LM2 language model (or, with `use_memory: false`, a plain Llama).

  Attributes:
    cfg: the model configuration.
  """

  cfg: ModelConfig

  def setup(self):
    cfg = self.cfg
    self.embed = nn.Embed(
        cfg.vocab_size, cfg.d_model, dtype=cfg.compute_dtype, param_dtype=cfg.weight_dtype,
        embedding_init=nn.with_logical_partitioning(normal_init(cfg), ("vocab", "embed")))
    k, n = cfg.num_memory_layers, cfg.num_layers
    if cfg.scan_layers:
      self.memory_blocks = _layer_stack(cfg, k, True) if k else None
      self.blocks = _layer_stack(cfg, n - k, False) if n > k else None
    else:
      block = block_class(cfg)
      # Named block_{i}: the key map to Hugging Face's model.layers.{i}.
      for i in range(n):
        setattr(self, f"block_{i}", block(cfg, i < k))
    self.final_norm = RMSNorm(cfg)
    if not cfg.tie_embeddings:
      self.lm_head = Einsum(cfg, (cfg.d_model, cfg.vocab_size), ("embed", "vocab"), "BTD,DV->BTV")
    if cfg.use_memory and cfg.memory_init == "learned":
      self.memory_init = self.param(
          "memory_init", nn.with_logical_partitioning(nn.initializers.orthogonal(), ("slots", "embed")),
          (cfg.num_slots, cfg.d_model), cfg.weight_dtype)

  # Public API.
  def __call__(self, tokens: Array | None = None, memory: Array | None = None,
               resets: Array | None = None, valid: Array | None = None, *,
               inputs_embeds: Array | None = None, bound: Array | None = None):
    """Logits of every position and the memory after the last segment.

    Args:
      tokens: int32 [B, C*T] (or None with `inputs_embeds`).
      memory: the carry to start from (`init_memory` / a previous call's return); None = initial.
      resets: bool [B, C]: restart a row's memory at a segment (a document starts there).
      valid: bool [B, C*T]: real tokens (default all); padding is neither attended to nor written.
      inputs_embeds: [B, C*T, D] input embeddings instead of tokens (soft prompts; gradient tests).
      bound: int32 [B, C*T]: a token id whose embedding is added to each position's input, -1 for none
        (the bound, or oracle, channel of the recall test beds: `data.bind`).
    Returns:
      (logits float32 [B, C*T, V], memory: float32 [B, M, D] or [L_mem, B, M, D], None without memory).
    """
    memory, xs = self._prepare(tokens, inputs_embeds, memory, resets, valid, bound)
    c, b = xs["reset"].shape
    scan = nn.scan(_logits_body, variable_broadcast="params", split_rngs={"params": False},
                   variable_axes={"intermediates": 0})
    memory, logits = scan(self, memory, self._fold(xs))
    logits = self._unfold(logits, c, b)                 # [C, B, T, V]
    t, v = logits.shape[-2:]
    return jnp.swapaxes(logits, 0, 1).reshape(b, c * t, v), memory

  def loss(self, tokens: Array | None, targets: Array, loss_mask: Array, memory: Array | None = None,
           resets: Array | None = None, valid: Array | None = None, *,
           inputs_embeds: Array | None = None, bound: Array | None = None):
    """Per-row loss sums computed segment by segment (no [B, C*T, V] logits).

    Args:
      tokens, memory, resets, valid, inputs_embeds, bound: as in `__call__`.
      targets: int32 [B, C*T] next-token targets. loss_mask: [B, C*T] weights (0 = ignore).
    Returns:
      (LossStats of float32 [B] sums, the memory after the last segment).
    """
    memory, xs = self._prepare(tokens, inputs_embeds, memory, resets, valid, bound)
    xs["targets"] = self._segments(targets)
    xs["loss_mask"] = self._segments(loss_mask.astype(jnp.float32))
    c, b = xs["reset"].shape
    xs = self._fold(xs)
    if xs["reset"].shape[0] <= self.cfg.unroll_segments and not self.is_mutable_collection(
        "intermediates"):
      # Straight-line segments: nothing is stacked into [C, ...] loop buffers (module docstring).
      per_segment = []
      for i in range(xs["reset"].shape[0]):
        memory, segment_stats = _loss_body(self, memory, jax.tree.map(lambda x, i=i: x[i], xs))
        per_segment.append(segment_stats)
      stats = tuple(jnp.stack(s) for s in zip(*per_segment))
    else:
      scan = nn.scan(_loss_body, variable_broadcast="params", split_rngs={"params": False},
                     variable_axes={"intermediates": 0})
      memory, stats = scan(self, memory, xs)
    return LossStats(*(self._unfold(s, c, b).sum(axis=0) for s in stats)), memory

  def initial_memory(self, batch_size: int) -> Array | None:
    """The initial carry of this model (uses the learned init when there is one)."""
    if not self.cfg.use_memory:
      return None
    bank = jnp.broadcast_to(self._initial_bank(), (batch_size, self.cfg.num_slots, self.cfg.d_model))
    if self.cfg.memory_flow == "per_block":
      bank = jnp.broadcast_to(bank, (self.cfg.num_memory_layers, *bank.shape))
    return bank

  def decode(self, tokens: Array, memory: Array | None, cache: tuple, cache_valid: Array,
             index: Array, bound: Array | None = None):
    """Runs n tokens of the current segment against per-layer KV caches (incremental decoding).

    Needs the unrolled layout (`scan_layers: false`); `lm2_jax.model.decode.Decoder` converts.

    Args:
      tokens: int32 [B, n] at segment positions index..index+n-1.
      memory: the carry at the segment's start (read only; the write happens when the segment closes).
      cache: per layer a (keys, values) pair [B, T, K, H] ([B, m+T, K, H] with RMT, the first m filled
        by `rmt.read_cache`).
      cache_valid: [B, T] real tokens of the segment in the cache including these n.
      index: int32 scalar segment position of the first token.
      bound: int32 [B, n] or None: as in `__call__`.
    Returns:
      (logits float32 [B, n, V], the updated caches).
    """
    cfg = self.cfg
    if cfg.scan_layers:
      raise ValueError("LM2.decode needs scan_layers=false; use lm2_jax.model.decode.Decoder")
    x = self._embed(tokens, None, bound)
    m = cfg.num_memory_tokens
    if m:
      # RMT: the read tokens fill cache entries 0..m-1 (`rmt.read_cache`); segment position i is m + i.
      index = index + m
      cache_valid = jnp.concatenate([jnp.ones((x.shape[0], m), bool), cache_valid], axis=1)
    new_cache = []
    for i in range(cfg.num_layers):
      bank = None
      if i < cfg.num_memory_layers:
        bank = memory if cfg.memory_flow == "chained" else memory[i]
      x, layer_cache = getattr(self, f"block_{i}").decode(x, bank, cache[i], cache_valid, index)
      new_cache.append(layer_cache)
    return self._logits(self.final_norm(x)), tuple(new_cache)

  # Internals.
  def _initial_bank(self) -> Array:
    learned = self.memory_init if self.cfg.memory_init == "learned" else None
    return initial_bank(self.cfg, learned)

  def _segment_length(self, seq_len: int) -> int:
    return seq_len if self.cfg.attention == "full" else self.cfg.segment_length

  def _segments(self, x: Array) -> Array:
    """[B, C*T, ...] -> [C, B, T, ...] (the scan axis first)."""
    b, s = x.shape[:2]
    t = self._segment_length(s)
    return jnp.swapaxes(x.reshape(b, s // t, t, *x.shape[2:]), 0, 1)

  def _embed(self, tokens, inputs_embeds, bound):
    """Input embeddings [B, S, D]: of the tokens (or given), plus the bound tokens' where bound >= 0."""
    if (tokens is None) == (inputs_embeds is None):
      raise ValueError("pass exactly one of tokens and inputs_embeds")
    x = self.embed(tokens) if inputs_embeds is None else inputs_embeds.astype(self.cfg.compute_dtype)
    if bound is not None:
      if bound.shape != x.shape[:2]:
        raise ValueError(f"bound must be int [B, S] = {x.shape[:2]}, got shape {bound.shape}")
      extra = self.embed(jnp.maximum(bound, 0))
      x = x + jnp.where((bound >= 0)[..., None], extra, jnp.zeros_like(extra))
    return x

  def _folds(self, c: int) -> bool:
    return not self.cfg.use_memory and c > 1

  def _fold(self, xs: dict) -> dict:
    """Without memory the segments are independent: [C, B, T, ...] -> [1, B*C, T, ...], one segment
    step over B*C rows, so there is no loop to carry and stack per-segment activations through (on CPU
    that stacking cost a quarter of the step). Row b*C + c keeps each row's segments on the devices
    that hold the row. With memory the scan over segments stays."""
    c, b = xs["reset"].shape
    if not self._folds(c):
      return xs
    return {k: (jnp.zeros((1,), x.dtype) if k == "index"
                else jnp.swapaxes(x, 0, 1).reshape(1, b * c, *x.shape[2:])) for k, x in xs.items()}

  def _unfold(self, y: Array, c: int, b: int) -> Array:
    """The scan's stacked output back to [C, B, ...] (inverse of `_fold`)."""
    if not self._folds(c):
      return y
    return jnp.swapaxes(y.reshape(b, c, *y.shape[2:]), 0, 1)

  def _prepare(self, tokens, inputs_embeds, memory, resets, valid, bound=None):
    cfg = self.cfg
    x = self._embed(tokens, inputs_embeds, bound)
    b, s = x.shape[:2]
    t = self._segment_length(s)
    if s == 0 or s % t:
      raise ValueError(
          f"sequence length {s} is not a positive multiple of segment_length={t}: pad the input to a "
          f"multiple of {t} tokens and mark the padding with valid=False")
    c = s // t
    if valid is None:
      valid = jnp.ones((b, s), bool)
    if resets is None or not cfg.use_memory:
      # Without memory a reset changes nothing; a full-attention model gets the data's per-segment
      # flags [B, C_data] while it runs the whole input as one segment.
      resets = jnp.zeros((b, c), bool)
    if resets.shape != (b, c):
      raise ValueError(f"resets must be bool [B, C] = {(b, c)}, got shape {resets.shape}")
    if memory is None:
      memory = self.initial_memory(b)
    xs = {"x": self._segments(x), "valid": self._segments(valid.astype(bool)),
          "reset": jnp.swapaxes(resets.astype(bool), 0, 1), "index": jnp.arange(c)}
    return memory, xs

  def _run_segment(self, memory, xs):
    """One segment through all blocks: (memory at its start, inputs) -> (memory after it, hidden)."""
    cfg = self.cfg
    if cfg.use_memory:
      fresh = self._initial_bank()
      reset = xs["reset"][:, None, None] if cfg.memory_flow == "chained" else xs["reset"][None, :, None,
                                                                                          None]
      memory = jnp.where(reset, fresh, memory)
      if cfg.bptt_segments:
        cut = (xs["index"] > 0) & (xs["index"] % cfg.bptt_segments == 0)
        memory = jnp.where(cut, jax.lax.stop_gradient(memory), memory)
      memory = constrain(memory, MEMORY_AXES if memory.ndim == 3 else (None, *MEMORY_AXES))
    if cfg.num_memory_tokens:
      return rmt.run_segment(self, memory, xs)
    t = xs["x"].shape[1]
    x, memory = self._blocks(xs["x"], memory, xs["valid"], jnp.arange(t))
    return memory, self.final_norm(x)

  def _blocks(self, x, memory, valid, positions):
    cfg = self.cfg
    chained = cfg.use_memory and cfg.memory_flow == "chained"
    shared = SegmentContext(memory if chained else None, valid, positions)
    carry = (x, memory if chained else None)
    banks = memory if cfg.use_memory and not chained else None  # [L_mem, B, M, D]
    k = cfg.num_memory_layers
    if cfg.scan_layers:
      if self.memory_blocks is not None:
        carry, banks = self.memory_blocks(carry, banks, shared)
      if self.blocks is not None:
        carry, _ = self.blocks(carry, None, shared)
    else:
      new_banks = []
      for i in range(cfg.num_layers):
        bank = banks[i] if banks is not None and i < k else None
        carry, bank = getattr(self, f"block_{i}")(carry, bank, shared)
        if bank is not None:
          new_banks.append(bank)
      if banks is not None:
        banks = jnp.stack(new_banks)
    x, chain = carry
    return x, (chain if chained else banks)

  def _logits(self, h: Array) -> Array:
    if self.cfg.tie_embeddings:
      # On [B*T, D] rows: the weight gradient is then one 2D matmul (see layers.dense_einsum).
      logits = self.embed.attend(h.reshape(-1, h.shape[-1])).reshape(*h.shape[:-1], -1)
    else:
      logits = self.lm_head(h)
    return constrain(logits.astype(jnp.float32), LOGIT_AXES)


def _logits_body(mdl: LM2, memory, xs):
  memory, h = mdl._run_segment(memory, xs)
  return memory, mdl._logits(h)


def _loss_body(mdl: LM2, memory, xs):
  memory, h = mdl._run_segment(memory, xs)
  logits = mdl._logits(h)                               # [B, T, V] float32
  targets, mask = xs["targets"], xs["loss_mask"]
  log_probs = jax.nn.log_softmax(logits, axis=-1)
  nll = -jnp.take_along_axis(log_probs, targets[..., None], axis=-1)[..., 0]
  correct = (jnp.argmax(logits, axis=-1) == targets).astype(jnp.float32)
  stats = ((nll * mask).sum(-1), mask.sum(-1), (correct * mask).sum(-1))
  return memory, stats
