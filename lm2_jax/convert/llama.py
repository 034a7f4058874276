"""Hugging Face Llama checkpoints <-> LM2 variables.

    cfg, variables = load_hf_llama(hf_dir, segment_length=2048, scan_layers=True)
    logits, _ = LM2(cfg).apply(variables, tokens)
    save_hf_llama(cfg, variables, out_dir)          # config.json + model*.safetensors (+ memory)

The key map (HF tensor name -> unrolled lm2_jax path, and the reshape between them):

    model.embed_tokens.weight                  [V, D]    embed/embedding                    [V, D]
    model.layers.{i}.input_layernorm.weight    [D]       block_{i}/attn_norm/scale          [D]
    model.layers.{i}.self_attn.q_proj.weight   [N*H, D]  block_{i}/attn/q_proj/kernel       [D, N, H]
    model.layers.{i}.self_attn.{k,v}_proj.weight [K*H, D] block_{i}/attn/{k,v}_proj/kernel  [D, K, H]
    model.layers.{i}.self_attn.o_proj.weight   [D, N*H]  block_{i}/attn/o_proj/kernel       [N, H, D]
    model.layers.{i}.post_attention_layernorm.weight     block_{i}/mlp_norm/scale           [D]
    model.layers.{i}.mlp.{gate,up}_proj.weight [F, D]    block_{i}/mlp/{gate,up}_proj/kernel [D, F]
    model.layers.{i}.mlp.down_proj.weight      [D, F]    block_{i}/mlp/down_proj/kernel     [F, D]
    model.norm.weight                          [D]       final_norm/scale                   [D]
    lm_head.weight                             [V, D]    lm_head/kernel                     [D, V]

Both use the rotate-half RoPE convention, so q/k need no permutation. Memory parameters have no HF name:
they are exported to `lm2_memory.safetensors` (named by unrolled path) and, on import with `use_memory`,
read from there or freshly initialised. Import reads one tensor at a time and puts it on its device
(or sharding) before reading the next.
"""

from __future__ import annotations

import json
import logging
import os
import pathlib
import shutil
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
from flax import traverse_util

from lm2_jax.convert import hf_config, layout
from lm2_jax.convert.safetensors_io import SafetensorsCheckpoint, write_safetensors
from lm2_jax.model import LM2, ModelConfig

Path = tuple[str, ...]
MEMORY_FILE = "lm2_memory.safetensors"
MEMORY_INDEX = "lm2_memory.safetensors.index.json"
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json",
                   "tokenizer.model")
# Tensors some exporters write that carry no information for lm2_jax.
_IGNORED_SUFFIXES = (".rotary_emb.inv_freq",)

# kind -> (HF shape of an lm2 kernel shape, lm2 array of an HF array, HF array of an lm2 array).
_KINDS = {
    "copy": (lambda s: s, lambda w, s: w, lambda k: k),
    "transpose": (lambda s: s[::-1], lambda w, s: w.T, lambda k: k.T),
    # q/k/v: [N*H, D] <-> [D, N, H].
    "heads_out": (lambda s: (s[1] * s[2], s[0]), lambda w, s: w.T.reshape(s),
                  lambda k: k.reshape(k.shape[0], -1).T),
    # o: [D, N*H] <-> [N, H, D].
    "heads_in": (lambda s: (s[2], s[0] * s[1]), lambda w, s: w.T.reshape(s),
                 lambda k: k.reshape(-1, k.shape[-1]).T),
}
_LAYER_KEYS = (
    ("input_layernorm", ("attn_norm", "scale"), "copy"),
    ("self_attn.q_proj", ("attn", "q_proj", "kernel"), "heads_out"),
    ("self_attn.k_proj", ("attn", "k_proj", "kernel"), "heads_out"),
    ("self_attn.v_proj", ("attn", "v_proj", "kernel"), "heads_out"),
    ("self_attn.o_proj", ("attn", "o_proj", "kernel"), "heads_in"),
    ("post_attention_layernorm", ("mlp_norm", "scale"), "copy"),
    ("mlp.gate_proj", ("mlp", "gate_proj", "kernel"), "transpose"),
    ("mlp.up_proj", ("mlp", "up_proj", "kernel"), "transpose"),
    ("mlp.down_proj", ("mlp", "down_proj", "kernel"), "transpose"),
)


def hf_key_map(cfg: ModelConfig) -> dict[str, tuple[Path, str]]:
  """HF tensor name -> (unrolled lm2_jax param path, reshape kind), in HF's usual order."""
  keys = {"model.embed_tokens.weight": (("embed", "embedding"), "copy")}
  for i in range(cfg.num_layers):
    for hf_name, path, kind in _LAYER_KEYS:
      keys[f"model.layers.{i}.{hf_name}.weight"] = ((f"block_{i}", *path), kind)
  keys["model.norm.weight"] = (("final_norm", "scale"), "copy")
  if not cfg.tie_embeddings:
    keys["lm_head.weight"] = (("lm_head", "kernel"), "transpose")
  return keys


def _memory_name(path: Path) -> str:
  return "/".join(path)


def load_hf_llama(hf_dir: str | os.PathLike, *, shardings=None, rng: jax.Array | int = 0,
                  **model_overrides) -> tuple[ModelConfig, dict[str, Any]]:
  """Loads a Hugging Face Llama directory as LM2 variables.

  Args:
    hf_dir: a `save_pretrained` directory: config.json and model.safetensors (or shards + index).
    shardings: where to put each parameter: None (default device), one `jax.sharding.Sharding` for
      all, or a pytree shaped like the returned variables with a Sharding per leaf.
    rng: seed or key for freshly initialised memory parameters (use_memory without a memory file).
    **model_overrides: ModelConfig fields (segment_length, use_memory, scan_layers, param_dtype, ...).

  Returns:
    (cfg, {"params": ...}) with unboxed parameters in `cfg.param_dtype`, accepted by
    `LM2(cfg).apply`.
  """
  hf_dir = pathlib.Path(hf_dir)
  source = str(hf_dir / hf_config.CONFIG_FILE)
  cfg = hf_config.model_config_from_hf(hf_config.read_hf_config(hf_dir), source, **model_overrides)
  plan = layout.plan_layout(cfg)
  key_map = hf_key_map(cfg)
  backbone = {path: (name, kind) for name, (path, kind) in key_map.items()}
  memory_paths = [p for p in plan.unrolled if p not in backbone]
  _check_model_names(cfg, plan, backbone, memory_paths)
  place = _placer(shardings, plan)
  for name in TOKENIZER_FILES[:1]:
    if (hf_dir / name).is_file():
      logging.info("%s: found %s (copy it along with the converted checkpoint)", hf_dir, name)

  params: dict[Path, jax.Array] = {}
  ckpt = SafetensorsCheckpoint(hf_dir)
  _check_tensors(ckpt, key_map, plan, cfg, hf_dir)

  def fetch_backbone(path: Path) -> np.ndarray:
    name, kind = backbone[path]
    return _KINDS[kind][1](ckpt.read(name), plan.unrolled[path].shape)

  # Largest first: each read and placement briefly needs about twice its tensor on top of what is
  # already loaded, so the big ones go while little else is resident (peak ~1.1x, not ~1.5x).
  for target_path, target in _largest_first(plan.targets):
    if target.parts[0] in backbone:
      params[target_path] = place(target_path, layout.gather(target, fetch_backbone))

  if memory_paths:
    params.update(_load_memory(cfg, plan, memory_paths, hf_dir, place, shardings, rng))
  elif _has_memory_file(hf_dir):
    logging.warning("%s: %s ignored (use_memory is false)", hf_dir, MEMORY_FILE)
  return cfg, {"params": traverse_util.unflatten_dict(params)}


def _largest_first(targets: dict[Path, layout.Target]) -> list[tuple[Path, layout.Target]]:
  return sorted(targets.items(), key=lambda item: -int(np.prod(item[1].shape)))


def _has_memory_file(hf_dir: pathlib.Path) -> bool:
  return (hf_dir / MEMORY_FILE).is_file() or (hf_dir / MEMORY_INDEX).is_file()


def _load_memory(cfg, plan, memory_paths, hf_dir, place, shardings, rng) -> dict[Path, jax.Array]:
  """Memory parameters: from the directory's memory file if there is one, else freshly initialised."""
  memory_set = set(memory_paths)
  memory_targets = {p: t for p, t in plan.targets.items() if t.parts[0] in memory_set}
  if not _has_memory_file(hf_dir):
    logging.info("%s: no %s; initialising the memory parameters", hf_dir, MEMORY_FILE)
    return _init_memory(cfg, list(memory_targets), shardings, rng)
  out = {}
  ckpt = SafetensorsCheckpoint(hf_dir, MEMORY_FILE, MEMORY_INDEX)
  expected = {_memory_name(p): p for p in memory_paths}
  _compare_names(set(ckpt.names), set(expected), hf_dir / MEMORY_FILE)
  for name, path in expected.items():
    _check_shape(ckpt, name, tuple(plan.unrolled[path].shape), hf_dir / MEMORY_FILE)
  for target_path, target in _largest_first(memory_targets):
    out[target_path] = place(target_path,
                             layout.gather(target, lambda p: ckpt.read(_memory_name(p))))
  return out


def _init_memory(cfg: ModelConfig, paths: list[Path], shardings, rng) -> dict[Path, jax.Array]:
  """Initialises only the memory parameters: the jitted init keeps just those outputs, so XLA drops
  the backbone's initialisers and the backbone is never allocated."""
  key = jax.random.key(rng) if isinstance(rng, int) else rng
  tokens = jnp.zeros((1, cfg.segment_length), jnp.int32)

  def init(key):
    flat = traverse_util.flatten_dict(nn.meta.unbox(LM2(cfg).init(key, tokens))["params"])
    return [flat[p] for p in paths]

  out_shardings = None
  if shardings is not None:
    out_shardings = [_sharding_of(shardings, p) for p in paths]
  return dict(zip(paths, jax.jit(init, out_shardings=out_shardings)(key)))


def _sharding_of(shardings, path: Path):
  if isinstance(shardings, jax.sharding.Sharding):
    return shardings
  flat = traverse_util.flatten_dict(nn.meta.unbox(shardings)["params"])
  if path not in flat:
    raise KeyError(f"shardings has no entry for params/{'/'.join(path)}")
  return flat[path]


def _placer(shardings, plan):
  """A function (model path, host array) -> jax.Array on the requested device or sharding."""
  if shardings is not None and not isinstance(shardings, jax.sharding.Sharding):
    flat = traverse_util.flatten_dict(nn.meta.unbox(shardings)["params"])
    missing = sorted("/".join(p) for p in plan.targets if p not in flat)
    if missing:
      raise KeyError(f"shardings lacks params/{missing[0]} (and {len(missing) - 1} more)")

  def place(path: Path, array: np.ndarray) -> jax.Array:
    # may_alias: a CPU device adopts the (aligned, never again written) host buffer without a copy.
    where = None if shardings is None else _sharding_of(shardings, path)
    return jax.device_put(array, where, may_alias=True)

  return place


def _check_model_names(cfg, plan, backbone, memory_paths) -> None:
  """Every backbone parameter of the model must have an HF name, and memory only with use_memory."""
  missing = sorted(set(backbone) - set(plan.unrolled))
  if missing:
    raise RuntimeError(f"the key map expects params/{'/'.join(missing[0])}, which LM2(cfg) does not "
                       "have; lm2_jax.convert.llama and lm2_jax.model disagree on names")
  stray = [p for p in memory_paths if not (p[0] == "memory_init" or "memory" in p[1:2])]
  if stray or (memory_paths and not cfg.use_memory):
    raise RuntimeError(f"params/{'/'.join((stray or memory_paths)[0])} has no Hugging Face name "
                       "and is not a memory parameter; extend lm2_jax.convert.llama.hf_key_map")


def _compare_names(found: set[str], expected: set[str], where) -> None:
  missing, extra = sorted(expected - found), sorted(found - expected)
  if missing:
    raise ValueError(f"{where}: missing tensor(s) {missing[:5]}"
                     f"{f' and {len(missing) - 5} more' if len(missing) > 5 else ''}")
  if extra:
    raise ValueError(f"{where}: unexpected tensor(s) {extra[:5]}"
                     f"{f' and {len(extra) - 5} more' if len(extra) > 5 else ''}; the config "
                     "does not describe them (wrong num_hidden_layers or tie_word_embeddings?)")


def _check_shape(ckpt: SafetensorsCheckpoint, name: str, expected: tuple[int, ...], where) -> None:
  found = ckpt.shape(name)
  if found != tuple(expected):
    raise ValueError(f"{where}: tensor {name!r} has shape {list(found)}, the config implies "
                     f"{list(expected)}")


def _check_tensors(ckpt: SafetensorsCheckpoint, key_map, plan, cfg, hf_dir) -> None:
  """Names and shapes of the checkpoint against the config, before anything is read."""
  found = {n for n in ckpt.names if not n.endswith(_IGNORED_SUFFIXES)}
  if cfg.tie_embeddings:
    found.discard("lm_head.weight")  # some exporters also write the tied head; it is the embedding
  _compare_names(found, set(key_map), hf_dir)
  for name, (path, kind) in key_map.items():
    _check_shape(ckpt, name, _KINDS[kind][0](tuple(plan.unrolled[path].shape)), hf_dir)


def save_hf_llama(cfg: ModelConfig, variables: dict[str, Any], out_dir: str | os.PathLike, *,
                  tokenizer_dir: str | os.PathLike | None = None,
                  max_shard_bytes: int = 2 << 30) -> list[str]:
  """Writes LM2 variables as a Hugging Face Llama directory.

  The backbone goes to config.json + model*.safetensors, loadable by transformers'
  `LlamaForCausalLM.from_pretrained`; memory parameters (if any) go to `lm2_memory.safetensors`;
  config.json also records the full ModelConfig so `load_hf_llama` restores it exactly.

  Args:
    cfg: the model config of `variables`.
    variables: {"params": ...} as from `LM2(cfg).init` (boxed or not) or `load_hf_llama`.
    out_dir: the output directory (created if needed).
    tokenizer_dir: a directory whose tokenizer files (tokenizer.json, ...) are copied along.
    max_shard_bytes: the size at which a safetensors shard is closed.

  Returns:
    The names of the files written.
  """
  out_dir = pathlib.Path(out_dir)
  plan = layout.plan_layout(cfg)
  params = traverse_util.flatten_dict(nn.meta.unbox(variables)["params"])
  _check_params(params, plan)
  key_map = hf_key_map(cfg)
  backbone = {path for path, _ in key_map.values()}

  def unrolled(path: Path) -> np.ndarray:
    target_path, index = plan.where[path]
    return layout.part_of(params[target_path], plan.targets[target_path], index)

  def hf_tensors():
    for name, (path, kind) in key_map.items():
      yield name, _KINDS[kind][2](unrolled(path))

  written = write_safetensors(hf_tensors(), out_dir, max_shard_bytes)
  memory = [p for p in plan.unrolled if p not in backbone]
  if memory:
    written += write_safetensors(((_memory_name(p), unrolled(p)) for p in memory), out_dir,
                                 max_shard_bytes, MEMORY_FILE, MEMORY_INDEX)
  config = hf_config.hf_config_from_model(cfg)
  (out_dir / hf_config.CONFIG_FILE).write_text(json.dumps(config, indent=2) + "\n")
  written.append(hf_config.CONFIG_FILE)
  if tokenizer_dir is not None:
    written += copy_tokenizer(tokenizer_dir, out_dir)
  return written


def _check_params(params: dict[Path, Any], plan: layout.Layout) -> None:
  missing = sorted(set(plan.targets) - set(params))
  extra = sorted(set(params) - set(plan.targets))
  if missing or extra:
    bad = missing or extra
    raise ValueError(f"variables do not match the config: {'missing' if missing else 'unexpected'} "
                     f"params/{'/'.join(bad[0])} ({len(bad)} in all); check scan_layers/use_memory")
  for path, target in plan.targets.items():
    if tuple(params[path].shape) != target.shape:
      raise ValueError(f"params/{'/'.join(path)} has shape {list(params[path].shape)}, the config "
                       f"implies {list(target.shape)}")


def copy_tokenizer(src_dir: str | os.PathLike, dst_dir: str | os.PathLike) -> list[str]:
  """Copies the Hugging Face tokenizer files present in `src_dir`; returns their names."""
  copied = []
  for name in TOKENIZER_FILES:
    src = pathlib.Path(src_dir) / name
    if src.is_file():
      pathlib.Path(dst_dir).mkdir(parents=True, exist_ok=True)
      shutil.copyfile(src, pathlib.Path(dst_dir) / name)
      copied.append(name)
  return copied
