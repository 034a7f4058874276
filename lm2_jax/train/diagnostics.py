"""Per-block memory diagnostics of held-out batches, computed from what the memory module sows.

`lm2_jax.model.memory.Memory` sows into the `intermediates` collection, per block and segment:
`read_attention` [B, Nm, T, M] (the read's weights over the M memory rows; the delta write's unit read
address [B, 1, T, M]), `write_routes` [B, Nm, T, M] (`slots`: each token's route, zero on padding; `keyed`:
the rewritten slot, one-hot times the write strength; `delta`: the unit write address [B, 1, T, M]; not
sown by the `tokens` write) and `input_gate_mean` / `forget_gate_mean` [B]. The segment scan stacks each
on a leading C axis; the scanned layer stack (`memory_blocks`) adds an L_mem axis after it; unrolled
blocks are `block_{i}`. Reading them changes nothing the model computes.

Per memory block i (`block{i}`), each a mean over the held-out rows:

  read_entropy         H(w) / log M of the read weights w over the M rows (normalised to sum 1; the delta
                       read's weights are its squared unit address q_t^2), over real tokens and memory
                       heads: 0 = each token reads one row, 1 = uniform over all M.
  answer_read_entropy  the same over the scored positions (loss mask > 0: the answer of a QA row).
  write_slots          exp(H(w)) of a segment's summed write weights w over the M rows (the routes of
                       `slots` / `keyed`, the squared unit addresses of `delta`), per row, segment with a
                       real token and memory head: how many rows a segment effectively writes to (1..M).
                       Absent for `memory_write: tokens`, which rewrites every slot each segment.
  input_gate, forget_gate  the sown gate means, over (row, segment with a real token).

The eval step returns, per block and name, per-row sums and weights [B] (`row_sums`), so batches
aggregate exactly (`evaluate.evaluate` divides the totals).

`write_information` is the training side (`train.memory_aux_weight`): the mutual information between a
segment's real tokens and the rows they write to, differentiable, from the same sown `write_routes`.
"""

from __future__ import annotations

import math

import jax.numpy as jnp
from jax.scipy.special import xlogy

from lm2_jax.model.config import ModelConfig
from lm2_jax.typing import Array, PyTree

GATES = {"input_gate_mean": "input_gate", "forget_gate_mean": "forget_gate"}


def available(cfg: ModelConfig) -> bool:
  """Whether the model has LM2 memory blocks that sow diagnostics (not without memory, not RMT)."""
  return cfg.num_memory_layers > 0


def block_arrays(intermediates: PyTree, cfg: ModelConfig) -> list[dict[str, Array]]:
  """Per memory block, its sown arrays {name: [C, B, ...]}, from `apply(..., mutable=["intermediates"])`.

  Args:
    intermediates: the `intermediates` collection of a segment-scanned call (`LM2.loss` / `__call__`).
    cfg: the model's config (says which layout: `memory_blocks` stack or `block_{i}`).
  """
  out = []
  for i in range(cfg.num_memory_layers):
    if cfg.scan_layers:
      sown = intermediates.get("memory_blocks", {}).get("memory", {})
      out.append({name: value[0][:, i] for name, value in sown.items()})   # [C, L_mem, B, ...] -> [C, B, ...]
    else:
      sown = intermediates.get(f"block_{i}", {}).get("memory", {})
      out.append({name: value[0] for name, value in sown.items()})
  return out


def _distribution(w: Array) -> tuple[Array, Array]:
  """(w normalised over its last axis, its total), float32; a zero total stays zero."""
  w = jnp.maximum(w.astype(jnp.float32), 0.0)   # keyed routes: one-hot + soft - soft rounds to -1e-8
  total = jnp.sum(w, axis=-1, keepdims=True)
  return w / jnp.where(total > 0, total, 1.0), total[..., 0]


def _entropy(p: Array) -> Array:
  """H(p) over the last axis, divided by log of its size (0 for a size of 1)."""
  m = p.shape[-1]
  h = -jnp.sum(xlogy(p, p), axis=-1)
  return h / math.log(m) if m > 1 else h


def _by_segment(x: Array, t: int) -> Array:
  """[B, C*T] -> [C, B, T] float32 (the sown arrays' layout)."""
  b, s = x.shape
  return jnp.swapaxes(x.reshape(b, s // t, t), 0, 1).astype(jnp.float32)


def _plogp(p: Array) -> Array:
  """p log p, 0 where p <= 0 with a zero gradient there (the keyed write's one-hot routes are exact zeros
  that its straight-through gradient reaches; xlogy's gradient is infinite there)."""
  positive = p > 0
  return jnp.where(positive, p * jnp.log(jnp.where(positive, p, 1.0)), 0.0)


def write_information_count(cfg: ModelConfig, valid: Array) -> Array:
  """How many terms `write_information` sums for `valid` [B, C*T]: memory blocks x (row, segment with a
  real token) pairs, float32; it depends on the batch alone, so micro-batches can share the whole batch's."""
  real = _by_segment(valid, cfg.segment_length)
  return cfg.num_memory_layers * jnp.sum(jnp.max(real, axis=-1))


def write_information(intermediates: PyTree, cfg: ModelConfig, valid: Array) -> Array:
  """Summed mutual information (nats) between a segment's real tokens and the memory rows they write to.

  Per memory block, row and segment with a real token: I = H(mean_t p_t) - mean_t H(p_t), with p_t a real
  token's write weights over the M rows (`write_routes` normalised to sum 1; the delta write's squared unit
  address) and t uniform over the segment's real tokens, averaged over memory heads. Large when the
  segment's writes spread over the rows while each token is decisive; 0 when every token writes the
  same distribution. Differentiable (the keyed write's through its straight-through routes).

  Args:
    intermediates: as in `block_arrays`; the blocks must sow `write_routes` (not `memory_write: tokens`).
    cfg: the model's config.
    valid: [B, C*T] real tokens.
  Returns:
    float32 scalar: the sum of I over blocks, rows and segments with a real token; divide by
    `write_information_count` for the mean.
  """
  real = _by_segment(valid, cfg.segment_length)                         # [C, B, T]
  tokens = jnp.maximum(jnp.sum(real, axis=-1), 1.0)[..., None]          # [C, B, 1]
  total = jnp.zeros((), jnp.float32)
  for sown in block_arrays(intermediates, cfg):
    routes = sown["write_routes"].astype(jnp.float32)                  # [C, B, Nm, T, M]
    w = routes * routes if cfg.memory_write == "delta" else routes
    mass = jnp.sum(w, axis=-1, keepdims=True)
    p = w / jnp.where(mass > 0, mass, 1.0)
    mean = jnp.einsum("CBNTM,CBT->CBNM", p, real) / tokens[..., None]
    spread = -jnp.sum(_plogp(mean), axis=-1)                             # [C, B, Nm]
    decisive = -jnp.einsum("CBNT,CBT->CBN", jnp.sum(_plogp(p), axis=-1), real) / tokens
    total += jnp.sum(jnp.mean(spread - decisive, axis=-1))                # segments without a token: 0
  return total


def row_sums(intermediates: PyTree, cfg: ModelConfig, valid: Array, loss_mask: Array
             ) -> dict[str, dict[str, tuple[Array, Array]]]:
  """Per block and diagnostic, per-row (sum, weight) float32 [B]; the diagnostic is sum / weight.

  Args:
    intermediates: as in `block_arrays`.
    cfg: the model's config.
    valid: [B, C*T] real tokens; loss_mask: [B, C*T] scored positions (> 0).
  Returns:
    {"block{i}": {name: (sum [B], weight [B])}} (module docstring for the names); {} without LM2 memory.
  """
  t = cfg.segment_length
  real = _by_segment(valid, t)
  scored = _by_segment(loss_mask > 0, t) * real
  has_real = (jnp.sum(real, axis=-1) > 0).astype(jnp.float32)          # [C, B]
  squared = cfg.memory_write == "delta"       # unit addresses: the weights are their squares

  out = {}
  for i, sown in enumerate(block_arrays(intermediates, cfg)):
    stats = {}
    if "read_attention" in sown:
      read = sown["read_attention"]                                     # [C, B, Nm, T, M]
      p, _ = _distribution(read * read if squared else read)
      h = _entropy(p)                                                   # [C, B, Nm, T]
      heads = h.shape[2]
      for name, mask in (("read_entropy", real), ("answer_read_entropy", scored)):
        stats[name] = (jnp.einsum("CBNT,CBT->B", h, mask), heads * jnp.sum(mask, axis=(0, 2)))
    if "write_routes" in sown:
      routes = sown["write_routes"]                                     # [C, B, Nm, T, M]
      w = routes * routes if squared else routes
      mass = jnp.einsum("CBNTM,CBT->CBNM", w, real)
      q, total = _distribution(mass)
      slots = jnp.exp(-jnp.sum(xlogy(q, q), axis=-1))                   # [C, B, Nm]
      written = (total > 0).astype(jnp.float32)
      stats["write_slots"] = (jnp.sum(slots * written, axis=(0, 2)), jnp.sum(written, axis=(0, 2)))
    for sown_name, name in GATES.items():
      if sown_name in sown:
        gate = sown[sown_name].astype(jnp.float32)                      # [C, B]
        stats[name] = (jnp.sum(gate * has_real, axis=0), jnp.sum(has_real, axis=0))
    out[f"block{i}"] = stats
  return out
