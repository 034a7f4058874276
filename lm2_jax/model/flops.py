"""Model FLOPs per token, counted from the config (for MFU), memory read and write included.

Convention: a multiply-add is 2 FLOPs; training = 3x forward (backward costs two forwards); attention
counts every key of the segment (T, or the whole sequence with `attention: full`; T + 2m with RMT's m
memory tokens) per query, as PaLM's MFU does; a rematerialised forward is not counted (MFU measures
useful work).
"""

from __future__ import annotations

from lm2_jax.model.config import ModelConfig


def forward_flops_per_token(cfg: ModelConfig, seq_len: int) -> float:
  """Forward FLOPs per token of a sequence of `seq_len` tokens."""
  d, f, v = cfg.d_model, cfg.mlp_dim, cfg.vocab_size
  n, kv, h = cfg.num_heads, cfg.num_kv_heads, cfg.head_dim
  t = seq_len if cfg.attention == "full" else cfg.segment_length
  projections = 2 * d * (n * h + 2 * kv * h) + 2 * n * h * d
  attention = 2 * 2 * n * h * t                         # scores + weighted values
  mlp = 2 * 3 * d * f
  per_layer = projections + attention + mlp
  head = 2 * d * v
  r = cfg.num_memory_tokens
  if r:
    # RMT: every block runs the T + 2m positions of the extended segment, each attending over all of
    # them; the head runs on the T segment tokens only. Counted per segment token.
    extended = t + 2 * r
    per_position = projections + 2 * 2 * n * h * extended + mlp
    return cfg.num_layers * per_position * extended / t + head
  m = cfg.num_slots
  # Per token: query, update and output-gate projections; read scores and values; write scores (shared
  # with the read) and the write aggregation. Per segment (divided by T): the bank's key and value
  # projections and the two gates over the M slots.
  gates_off = (not cfg.input_gate) + (not cfg.forget_gate)
  if cfg.memory_write == "delta":
    # Per token: update, value and output-gate projections, the gates, the read and write addresses,
    # the read (q^T mem) and the write (a^T mem, then the rank-1 update). Nothing per segment.
    memory_per_token = 2 * 3 * d * d + 2 * (2 - gates_off) * d * d + 2 * 2 * d * m + 2 * 3 * m * d
    memory_per_segment = 0
  elif cfg.memory_write == "keyed":
    # Per token: the gates run on the token's update, and its content's key, the rewritten slot's key
    # and the key match over M slots replace the shared write scores. Per segment: the bank's key and
    # value projections for the read and its keys for the write.
    memory_per_token = 2 * 3 * d * d + 2 * 2 * m * d + 2 * (2 - gates_off) * d * d + 2 * 2 * d * d \
        + 2 * m * d
    memory_per_segment = 2 * 3 * m * d * d
    memory_per_token += 2 * d * cfg.memory_write_gate  # the write strength h w_s
  else:
    memory_per_token = 2 * 3 * d * d + 2 * 2 * m * d + 2 * m * d
    memory_per_segment = 2 * (4 - gates_off) * m * d * d
  if not cfg.output_gate:
    memory_per_token -= 2 * d * d
  memory = memory_per_token + memory_per_segment / t
  return cfg.num_layers * per_layer + cfg.num_memory_layers * memory + head


def model_flops_per_token(cfg: ModelConfig, seq_len: int) -> float:
  """Training FLOPs per token (forward + backward)."""
  return 3.0 * forward_flops_per_token(cfg, seq_len)
