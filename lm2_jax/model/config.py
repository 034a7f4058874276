"""The frozen, typed model configuration (DESIGN.md §2 knobs), loadable from YAML with overrides."""

from __future__ import annotations

import dataclasses
import os
from typing import Any

import jax.numpy as jnp
import yaml

_CHOICES = {
    "memory_kind": ("lm2", "rmt"),
    "memory_init": ("identity", "learned", "zeros"),
    "memory_flow": ("chained", "per_block"),
    "memory_write": ("tokens", "slots", "keyed", "delta"),
    "memory_keys": ("content", "address", "both"),
    "attention": ("segment", "full"),
    "remat": ("none", "full", "dots"),
    "attention_kernel": ("auto", "xla"),
    "memory_product_order": ("auto", "token_first", "slot_first"),
    "dtype": ("float32", "bfloat16", "float16"),
    "param_dtype": ("float32", "bfloat16"),
}


@dataclasses.dataclass(frozen=True)
class ModelConfig:
  """Every architectural choice of an LM2 model (or of its memory-less Llama baseline).

  Attributes:
    vocab_size: V. d_model: D. num_layers: L. num_heads: N. num_kv_heads: K (grouped-query attention).
    mlp_dim: F, the SwiGLU hidden width. rope_theta, norm_eps: as in Llama.
    rope_scaling_factor, rope_low_freq_factor, rope_high_freq_factor, rope_original_max_position:
      Llama-3.1+ RoPE frequency scaling ("rope_type: llama3"); None = plain RoPE.
    tie_embeddings: the LM head reuses the embedding table.
    segment_length: T, tokens per segment; inputs are C*T tokens.
    use_memory: false gives a plain Llama with no memory parameters at all.
    memory_kind: "lm2" (a gated memory bank in the first `memory_layers` blocks) or "rmt" (the Recurrent
      Memory Transformer baseline, `lm2_jax.model.rmt`: `num_slots` memory tokens read at each segment's
      start and written at its end, their final hidden states the carry; the bank's init is
      `memory_init`, and the LM2 memory module's knobs are unused).
    memory_layers: memory in the first k blocks (paper Fig. 5); None = every block.
    num_slots: M. memory_heads: Nm heads of the memory cross-attention (width D / Nm).
    read_topk: keep the k largest read scores per query (None = dense read).
    output_gate, input_gate, forget_gate: false replaces that gate by the constant 1.
    forget_bias_init: initial forget-gate bias (+1: remember by default).
    memory_norm: RMS-normalise the bank's rows before its key/value projections, so slot keys are as
      distinct and as large as token queries whatever the bank's scale (identity rows have norm 1).
    memory_score_scale: multiplies the token-slot scores (an inverse temperature). Small random
      projections give near-uniform read and write attention at init, so every slot stores the same
      average; a larger scale makes slots attend differently from the first step.
    memory_keys: what the key projection sees: "content" (the bank; DESIGN.md §2), "address" (a learned
      per-slot address [M, D] that writes never change: a slot is found by where it is, its content is
      only the value) or "both" (address + content).
    memory_write: how a segment is written into the bank. "tokens" (each slot attends over the
      segment's tokens; DESIGN.md §2), "slots" (each token routes over the slots with the read's softmax;
      a slot changes with its routed mass) or "keyed" (content-addressed: token by token, a token
      overwrites the slot whose key matches its own, else the emptiest slot; docs/design.md) or "delta"
      (the bank as a fast-weight matrix from M address dims to D values, each token rewriting what is
      stored at its learned address with the gated update; model/delta.py). The
      legacy key `write_softmax` is read as `memory_write`.
    memory_match_threshold: "keyed" write: the cosine between a token's key and a slot's key above
      which the token rewrites that slot instead of taking the emptiest one.
    memory_match_center: "keyed" write: compare keys after subtracting the segment's mean token key
      (the component every token shares, which at init puts a whole segment into one slot).
    memory_write_gate: "keyed" write: a learned per-token scalar write strength s_t in (0, 1) scales
      the token's rewrite, so a token can leave the bank as it is (e.g. the "." after a fact).
    memory_init: "identity" (rows of the identity, needs M <= D), "learned" or "zeros".
    memory_flow: "chained" (one bank, writes chained through the blocks) or "per_block".
    bptt_segments: stop gradients through the memory carry every k segments (0 = full BPTT).
    attention: "segment" (causal inside each segment; RoPE restarts per segment) or "full" (causal over
      the whole input; the long-context baseline, memory-less only).
    scan_layers: run the layers with nn.scan (compile time independent of depth) or unrolled.
    unroll_segments: `LM2.loss` over at most this many segments runs them as straight-line code, not
      as a scan over segments (0: always scan). Faster on CPU: the backward pass's saved activations
      are not stacked into [C, ...] loop buffers; compile time grows with the segments unrolled.
    remat: "none", "full" (recompute each block) or "dots" (save matmul outputs).
    attention_kernel: "auto" runs a segment's causal self-attention with the fused CPU kernel
      (`lm2_jax.kernels.cpu_attention`) when tracing for the CPU backend, float32, a head dim that is a
      multiple of 16, and one device; "xla" always uses XLA's ops (`layers.causal_self_attend`).
    memory_product_order: the order of the memory's products, one function either way (`Memory`'s
      docstring): "token_first" projects every token (h Wq, h Wu, e W_out: T D^2 a segment);
      "slot_first" folds each weight into the M slots first (Wq k^T, a_w h then Wu, v W_out: M D^2 a
      segment, then Nm M D a token); "auto" takes the one with fewer FLOPs for the call's T tokens.
    dtype: compute dtype; param_dtype: parameter dtype. The memory bank is float32 regardless.
    init_std: standard deviation of the normal initialiser of every matrix.
  """

  vocab_size: int = 260
  d_model: int = 128
  num_layers: int = 4
  num_heads: int = 4
  num_kv_heads: int = 2
  mlp_dim: int = 512
  rope_theta: float = 10000.0
  rope_scaling_factor: float | None = None
  rope_low_freq_factor: float = 1.0
  rope_high_freq_factor: float = 4.0
  rope_original_max_position: int = 8192
  norm_eps: float = 1e-5
  tie_embeddings: bool = True
  segment_length: int = 64
  use_memory: bool = True
  memory_kind: str = "lm2"
  memory_layers: int | None = None
  num_slots: int = 16
  memory_heads: int = 1
  read_topk: int | None = None
  output_gate: bool = True
  input_gate: bool = True
  forget_gate: bool = True
  forget_bias_init: float = 1.0
  memory_norm: bool = False
  memory_write: str = "tokens"
  memory_match_threshold: float = 0.5
  memory_match_center: bool = False
  memory_write_gate: bool = False
  memory_score_scale: float = 1.0
  memory_keys: str = "content"
  memory_init: str = "identity"
  memory_flow: str = "chained"
  bptt_segments: int = 0
  attention: str = "segment"
  scan_layers: bool = False
  unroll_segments: int = 0
  remat: str = "none"
  attention_kernel: str = "auto"
  memory_product_order: str = "auto"
  dtype: str = "float32"
  param_dtype: str = "float32"
  init_std: float = 0.02

  def __post_init__(self):
    for f in dataclasses.fields(self):
      _check_type(f.name, getattr(self, f.name), f.type)
    positive = ("vocab_size", "d_model", "num_layers", "num_heads", "num_kv_heads", "mlp_dim",
                "segment_length", "num_slots", "memory_heads")
    for name in positive:
      if getattr(self, name) <= 0:
        raise ValueError(f"ModelConfig.{name} must be > 0, got {getattr(self, name)}")
    for name, allowed in _CHOICES.items():
      if getattr(self, name) not in allowed:
        raise ValueError(f"ModelConfig.{name} must be one of {allowed}, got {getattr(self, name)!r}")
    if self.d_model % self.num_heads:
      raise ValueError(f"ModelConfig.num_heads={self.num_heads} must divide d_model={self.d_model}")
    if self.num_heads % self.num_kv_heads:
      raise ValueError(
          f"ModelConfig.num_kv_heads={self.num_kv_heads} must divide num_heads={self.num_heads}")
    if (self.d_model // self.num_heads) % 2:
      raise ValueError(f"head dim d_model/num_heads={self.d_model // self.num_heads} must be even "
                       "(RoPE rotates pairs); change ModelConfig.num_heads or d_model")
    if self.rope_scaling_factor is not None and (
        self.rope_scaling_factor <= 0 or self.rope_high_freq_factor <= self.rope_low_freq_factor):
      raise ValueError("ModelConfig.rope_scaling_factor must be > 0 and rope_high_freq_factor > "
                       "rope_low_freq_factor")
    if self.memory_score_scale <= 0:
      raise ValueError(f"ModelConfig.memory_score_scale must be > 0, got {self.memory_score_scale}")
    if not -1.0 <= self.memory_match_threshold <= 1.0:
      raise ValueError("ModelConfig.memory_match_threshold is a cosine: it must be in [-1, 1], got "
                       f"{self.memory_match_threshold}")
    for name in ("bptt_segments", "unroll_segments"):
      if getattr(self, name) < 0:
        raise ValueError(f"ModelConfig.{name} must be >= 0, got {getattr(self, name)}")
    if self.use_memory:
      if self.d_model % self.memory_heads:
        raise ValueError(
            f"ModelConfig.memory_heads={self.memory_heads} must divide d_model={self.d_model}")
      if self.memory_init == "identity" and self.num_slots > self.d_model:
        raise ValueError(
            f"ModelConfig.memory_init='identity' needs num_slots <= d_model, got num_slots="
            f"{self.num_slots} > d_model={self.d_model}; use memory_init 'learned' or fewer slots")
      if self.memory_layers is not None and not 1 <= self.memory_layers <= self.num_layers:
        raise ValueError(f"ModelConfig.memory_layers must be in [1, num_layers={self.num_layers}] "
                         f"(or null for all), got {self.memory_layers}")
      if self.read_topk is not None and not 1 <= self.read_topk <= self.num_slots:
        raise ValueError(f"ModelConfig.read_topk must be in [1, num_slots={self.num_slots}] "
                         f"(or null for a dense read), got {self.read_topk}")
      if self.memory_write == "keyed" and (self.memory_keys != "content" or
                                            self.memory_init != "zeros"):
        raise ValueError("ModelConfig.memory_write='keyed' finds a new key's slot as the emptiest one "
                         "and matches the slots' content keys: it needs memory_init: zeros and "
                         f"memory_keys: content, got {self.memory_init!r} and {self.memory_keys!r}")
      if self.memory_write == "delta" and self.memory_kind == "lm2":  # RMT has no LM2 bank
        clashes = {"memory_init": (self.memory_init, "zeros"), "memory_keys": (self.memory_keys, "content"),
                   "memory_norm": (self.memory_norm, False), "memory_heads": (self.memory_heads, 1),
                   "read_topk": (self.read_topk, None),
                   "memory_score_scale": (self.memory_score_scale, 1.0)}
        bad = {k: v for k, (v, want) in clashes.items() if v != want}
        if bad:
          raise ValueError("ModelConfig.memory_write='delta' reads and writes by learned addresses "
                           "into a zero bank; these options belong to the attention read and must be "
                           "memory_init: zeros, memory_keys: content, memory_norm: false, memory_heads: 1, "
                           f"read_topk: null, memory_score_scale: 1.0; got {bad}")
      if self.memory_write != "keyed" and (self.memory_match_center or self.memory_write_gate):
        raise ValueError("ModelConfig.memory_match_center and memory_write_gate are options of "
                         f"memory_write: keyed, got memory_write={self.memory_write!r}")
      if self.memory_write == "keyed" and self.memory_match_threshold <= 0:
        raise ValueError("ModelConfig.memory_match_threshold must be > 0 with memory_write='keyed' "
                         "(an empty slot's key has cosine 0 with every token)")
      if self.memory_kind == "rmt" and (self.memory_flow != "chained" or self.memory_layers is not None):
        raise ValueError("ModelConfig.memory_kind='rmt' carries one [B, M, D] set of memory tokens through "
                         "the whole stack: it needs memory_flow: chained and memory_layers: null, got "
                         f"{self.memory_flow!r} and {self.memory_layers!r}")
      if self.attention == "full":
        raise ValueError("ModelConfig.attention='full' is the memory-less long-context baseline: "
                         "set use_memory: false, or use attention: segment with memory")

  # Derived properties.
  @property
  def head_dim(self) -> int:
    return self.d_model // self.num_heads

  @property
  def num_memory_layers(self) -> int:
    """How many of the first blocks hold an LM2 memory module (0 without memory, and with RMT)."""
    if not self.use_memory or self.memory_kind == "rmt":
      return 0
    return self.num_layers if self.memory_layers is None else self.memory_layers

  @property
  def num_memory_tokens(self) -> int:
    """m, the RMT memory tokens read and written around each segment (0 unless memory_kind is rmt)."""
    return self.num_slots if self.use_memory and self.memory_kind == "rmt" else 0

  @property
  def memory_head_dim(self) -> int:
    return self.d_model // self.memory_heads

  @property
  def compute_dtype(self):
    return jnp.dtype(self.dtype)

  @property
  def weight_dtype(self):
    return jnp.dtype(self.param_dtype)

  # Construction.
  @classmethod
  def from_dict(cls, values: dict[str, Any], **overrides) -> "ModelConfig":
    """Builds a config from a mapping; unknown keys are an error naming them."""
    merged = {**(values or {}), **overrides}
    if "write_softmax" in merged:  # the knob's name before the keyed write existed
      if "memory_write" in merged:
        raise ValueError("give memory_write only (write_softmax is its old name)")
      merged["memory_write"] = merged.pop("write_softmax")
    known = {f.name for f in dataclasses.fields(cls)}
    unknown = sorted(set(merged) - known)
    if unknown:
      raise ValueError(f"unknown ModelConfig key(s) {unknown}; valid keys: {sorted(known)}")
    return cls(**merged)

  @classmethod
  def from_yaml(cls, path: str | os.PathLike, **overrides) -> "ModelConfig":
    """Reads a YAML mapping of ModelConfig fields; keyword overrides win."""
    try:
      with open(path) as f:
        values = yaml.safe_load(f) or {}
    except FileNotFoundError:
      raise FileNotFoundError(f"model config file not found: {path}") from None
    if not isinstance(values, dict):
      raise ValueError(f"{path}: a model config must be a YAML mapping, got {type(values).__name__}")
    try:
      return cls.from_dict(values, **overrides)
    except (TypeError, ValueError) as e:
      raise ValueError(f"{path}: {e}") from None

  def to_dict(self) -> dict[str, Any]:
    return dataclasses.asdict(self)

  def replace(self, **changes) -> "ModelConfig":
    return dataclasses.replace(self, **changes)


def _check_type(name: str, value: Any, annotation: str) -> None:
  """Checks a field against its (string) annotation: int, float, bool, str, or `X | None`."""
  options = [a.strip() for a in str(annotation).split("|")]
  if value is None:
    if "None" in options:
      return
    raise TypeError(f"ModelConfig.{name} must not be null")
  ok = False
  for opt in options:
    if opt == "bool":
      ok |= isinstance(value, bool)
    elif opt == "int":
      ok |= isinstance(value, int) and not isinstance(value, bool)
    elif opt == "float":
      ok |= isinstance(value, (int, float)) and not isinstance(value, bool)
    elif opt == "str":
      ok |= isinstance(value, str)
  if not ok:
    raise TypeError(f"ModelConfig.{name} must be {annotation}, got {value!r} "
                    f"({type(value).__name__})")
