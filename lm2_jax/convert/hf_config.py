"""Hugging Face Llama `config.json` <-> `ModelConfig`.

Only what both sides can express is mapped: a Llama with SiLU SwiGLU MLP, no biases, head dim
`hidden_size / num_attention_heads`, and RoPE either plain or with Llama-3.1+ "llama3" frequency
scaling (factor, low/high_freq_factor, original_max_position_embeddings -> ModelConfig.rope_scaling_*).
Other RoPE types (linear, dynamic, yarn, ...) have no ModelConfig fields and are refused rather than
silently dropped, since dropping them changes the model's outputs. Both the transformers 4 layout
(`rope_theta`, `rope_scaling`) and the transformers 5 layout (`rope_parameters`) are read, and both are
written. An exported config also carries the full LM2 config under `LM2_KEY`, so that lm2_jax -> HF ->
lm2_jax restores every knob (memory settings, segment length) exactly.
"""

from __future__ import annotations

import dataclasses
import json
import os
import pathlib
from typing import Any

from lm2_jax.model.config import ModelConfig

CONFIG_FILE = "config.json"
LM2_KEY = "lm2_jax_config"
DEFAULT_SEGMENT_LENGTH = 2048
_ARCHITECTURE = "LlamaForCausalLM"
# ModelConfig fields fixed by the checkpoint's tensors: an override must not contradict them.
_ARCHITECTURE_FIELDS = ("vocab_size", "d_model", "num_layers", "num_heads", "num_kv_heads",
                        "mlp_dim", "tie_embeddings")
_PARAM_DTYPES = {"float32": "float32", "bfloat16": "bfloat16", "float16": "float32"}
_LLAMA3 = "llama3"
# HF llama3 rope key -> ModelConfig field.
_LLAMA3_KEYS = {"factor": "rope_scaling_factor", "low_freq_factor": "rope_low_freq_factor",
                "high_freq_factor": "rope_high_freq_factor",
                "original_max_position_embeddings": "rope_original_max_position"}


def read_hf_config(hf_dir: str | os.PathLike) -> dict[str, Any]:
  """Reads `config.json` of a Hugging Face model directory, with errors that say what is wrong."""
  hf_dir = pathlib.Path(hf_dir)
  path = hf_dir / CONFIG_FILE
  if not hf_dir.is_dir():
    raise FileNotFoundError(f"Hugging Face model directory not found: {hf_dir}")
  if not path.is_file():
    raise FileNotFoundError(f"{hf_dir}: no {CONFIG_FILE}; expected a directory written by "
                            "transformers' save_pretrained (config.json + *.safetensors)")
  try:
    config = json.loads(path.read_text())
  except json.JSONDecodeError as e:
    raise ValueError(f"{path}: not valid JSON: {e}") from None
  if not isinstance(config, dict):
    raise ValueError(f"{path}: expected a JSON object, got {type(config).__name__}")
  return config


def model_config_from_hf(config: dict[str, Any], source: str = CONFIG_FILE,
                         **overrides) -> ModelConfig:
  """Builds the ModelConfig of a Hugging Face Llama config (a parsed config.json).

  Args:
    config: the parsed config.json.
    source: where it came from, for error messages.
    **overrides: ModelConfig fields to set (e.g. `segment_length`, `use_memory`, `scan_layers`).
      Fields fixed by the weights (vocab_size, d_model, ...) may only be restated, not changed.

  Returns:
    The ModelConfig. Defaults beyond the HF config: `use_memory` False, `segment_length` 2048,
    `param_dtype` the checkpoint's dtype (float16 becomes float32), or, for a config exported by
    lm2_jax, the full config stored under `LM2_KEY`.
  """
  _check_llama(config, source)
  hidden = _require(config, "hidden_size", source)
  heads = _require(config, "num_attention_heads", source)
  head_dim = config.get("head_dim")
  if head_dim is not None and head_dim * heads != hidden:
    raise ValueError(f"{source}: head_dim={head_dim} x num_attention_heads={heads} != hidden_size="
                     f"{hidden}; lm2_jax's attention needs head dim = hidden_size / num_heads")
  derived = {
      "vocab_size": _require(config, "vocab_size", source),
      "d_model": hidden,
      "num_layers": _require(config, "num_hidden_layers", source),
      "num_heads": heads,
      "num_kv_heads": config.get("num_key_value_heads") or heads,
      "mlp_dim": _require(config, "intermediate_size", source),
      **_rope_fields(config, source),
      "norm_eps": float(config.get("rms_norm_eps", 1e-6)),
      "tie_embeddings": bool(config.get("tie_word_embeddings", False)),
  }
  stored = config.get(LM2_KEY)
  if stored is not None:
    base = {**stored, **derived}
  else:
    base = {**derived, "use_memory": False, "segment_length": DEFAULT_SEGMENT_LENGTH}
    dtype = config.get("dtype", config.get("torch_dtype"))
    if dtype in _PARAM_DTYPES:
      base["param_dtype"] = _PARAM_DTYPES[dtype]
  for name in _ARCHITECTURE_FIELDS:
    if name in overrides and overrides[name] != derived[name]:
      raise ValueError(f"{source}: override {name}={overrides[name]!r} contradicts the checkpoint "
                       f"({name}={derived[name]!r}); the weights fix this field, drop the override")
  try:
    return ModelConfig.from_dict(base, **overrides)
  except (TypeError, ValueError) as e:
    raise ValueError(f"{source}: {e}") from None


def hf_config_from_model(cfg: ModelConfig) -> dict[str, Any]:
  """The transformers `LlamaConfig` dict of `cfg`'s backbone, plus the full LM2 config."""
  return {
      "architectures": [_ARCHITECTURE],
      "model_type": "llama",
      "vocab_size": cfg.vocab_size,
      "hidden_size": cfg.d_model,
      "intermediate_size": cfg.mlp_dim,
      "num_hidden_layers": cfg.num_layers,
      "num_attention_heads": cfg.num_heads,
      "num_key_value_heads": cfg.num_kv_heads,
      "head_dim": cfg.head_dim,
      "hidden_act": "silu",
      "rms_norm_eps": cfg.norm_eps,
      **_hf_rope(cfg),
      "tie_word_embeddings": cfg.tie_embeddings,
      "attention_bias": False,
      "mlp_bias": False,
      "torch_dtype": cfg.param_dtype,
      LM2_KEY: dataclasses.asdict(cfg),
  }


def _check_llama(config: dict[str, Any], source: str) -> None:
  architectures = config.get("architectures") or []
  model_type = config.get("model_type")
  if _ARCHITECTURE not in architectures and model_type != "llama":
    raise ValueError(f"{source}: not a Llama model (architectures={architectures}, model_type="
                     f"{model_type!r}); only {_ARCHITECTURE} checkpoints can be converted")
  if config.get("hidden_act", "silu") != "silu":
    raise ValueError(f"{source}: hidden_act={config['hidden_act']!r}; lm2_jax's MLP is SwiGLU (silu)")
  for key in ("attention_bias", "mlp_bias"):
    if config.get(key):
      raise ValueError(f"{source}: {key}=true; lm2_jax's Llama layers have no biases")


def _rope_fields(config: dict[str, Any], source: str) -> dict[str, Any]:
  """The ModelConfig RoPE fields of either config layout: plain RoPE or "llama3" scaling only.

  transformers 5 lets a non-empty `rope_scaling` win over `rope_parameters`; when a config carries both
  (as lm2_jax's exports do, for transformers 4 and 5) they must agree, since which one applies depends
  on the reader's version.
  """
  scaling = config.get("rope_scaling") or {}
  params = config.get("rope_parameters") or {}
  for key, value in (("rope_scaling", scaling), ("rope_parameters", params)):
    if not isinstance(value, dict):
      raise ValueError(f"{source}: {key} must be a JSON object, got {value!r}")
  kinds = {key: value.get("rope_type", value.get("type", "default"))
           for key, value in (("rope_scaling", scaling), ("rope_parameters", params)) if value}
  for key, kind in kinds.items():
    if kind not in ("default", _LLAMA3):
      raise ValueError(f"{source}: {key} has rope_type {kind!r}, which lm2_jax cannot express (only "
                       f"plain RoPE and Llama-3.1 {_LLAMA3!r} scaling); dropping it would change the "
                       "model's outputs")
  partial = params.get("partial_rotary_factor", config.get("partial_rotary_factor", 1.0))
  if partial != 1.0:
    raise ValueError(f"{source}: partial_rotary_factor={partial!r}; lm2_jax rotates the whole head")
  theta = params.get("rope_theta", scaling.get("rope_theta", config.get("rope_theta", 10000.0)))
  if not isinstance(theta, (int, float)) or isinstance(theta, bool) or theta <= 0:
    raise ValueError(f"{source}: rope_theta must be a positive number, got {theta!r}")
  fields = {"rope_theta": float(theta), "rope_scaling_factor": None}
  scaled = {key: _llama3_fields(value, key, config, source)
            for key, value in (("rope_scaling", scaling), ("rope_parameters", params))
            if kinds.get(key) == _LLAMA3}
  if len(kinds) == 2 and (len(set(kinds.values())) == 2 or (
      len(scaled) == 2 and scaled["rope_scaling"] != scaled["rope_parameters"])):
    raise ValueError(f"{source}: rope_scaling {scaling} and rope_parameters {params} describe "
                     "different RoPE; which one applies depends on the transformers version, so "
                     "remove the stale one")
  if scaled:
    fields.update(scaled.get("rope_scaling") or scaled["rope_parameters"])
  return fields


def _llama3_fields(rope: dict[str, Any], key: str, config: dict[str, Any],
                   source: str) -> dict[str, Any]:
  """ModelConfig fields of one llama3 rope dict; a missing original_max_position_embeddings falls
  back to the config's top-level one, then max_position_embeddings, as transformers 5 does."""
  fields = {}
  for hf_key, field in _LLAMA3_KEYS.items():
    value = rope.get(hf_key)
    if value is None and hf_key == "original_max_position_embeddings":
      value = config.get(hf_key, config.get("max_position_embeddings"))
    if value is None:
      raise ValueError(f"{source}: {key} with rope_type {_LLAMA3!r} lacks {hf_key!r}")
    wanted = int if hf_key == "original_max_position_embeddings" else (int, float)
    if not isinstance(value, wanted) or isinstance(value, bool) or value <= 0:
      raise ValueError(f"{source}: {key}[{hf_key!r}] must be a positive number, got {value!r}")
    fields[field] = value if hf_key == "original_max_position_embeddings" else float(value)
  return fields


def _hf_rope(cfg: ModelConfig) -> dict[str, Any]:
  """config.json RoPE keys of `cfg` in both spellings: transformers 4 reads rope_theta (+ rope_scaling),
  transformers 5 reads rope_parameters (and lets rope_scaling win, so the two always agree)."""
  out = {"rope_theta": cfg.rope_theta, "max_position_embeddings": cfg.segment_length}
  if cfg.rope_scaling_factor is None:
    out["rope_parameters"] = {"rope_type": "default", "rope_theta": cfg.rope_theta}
    return out
  scaling = {"rope_type": _LLAMA3}
  for hf_key, field in _LLAMA3_KEYS.items():
    scaling[hf_key] = getattr(cfg, field)
  out["rope_scaling"] = scaling
  out["rope_parameters"] = {**scaling, "rope_theta": cfg.rope_theta}
  # The context the scaling stretches to; transformers warns unless it exceeds the original one.
  out["max_position_embeddings"] = max(cfg.segment_length, int(
      cfg.rope_original_max_position * cfg.rope_scaling_factor))
  return out


def _require(config: dict[str, Any], key: str, source: str) -> int:
  value = config.get(key)
  if not isinstance(value, int) or isinstance(value, bool) or value <= 0:
    raise ValueError(f"{source}: key {key!r} must be a positive integer, got {value!r}")
  return value
