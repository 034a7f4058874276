"""Conversion between the unrolled (`block_{i}`) and scanned (`memory_blocks`/`blocks`) param layouts.

Scanned layers stack each block's parameters on a leading axis: the first `num_memory_layers` blocks in
`memory_blocks`, the rest in `blocks`. Converters and tests work on the unrolled layout and use these two
functions, so the layout is defined in one place.
"""

from __future__ import annotations

import flax.linen as nn
import jax
import jax.numpy as jnp

from lm2_jax.model.config import ModelConfig


def _groups(cfg: ModelConfig):
  """(stack name, first layer, number of layers) of each scanned stack."""
  k, n = cfg.num_memory_layers, cfg.num_layers
  return [(name, first, size) for name, first, size in
          (("memory_blocks", 0, k), ("blocks", k, n - k)) if size]


def unstack_layers(params: dict, cfg: ModelConfig) -> dict:
  """Scanned layout -> unrolled layout (`block_{i}` entries); other entries are kept as they are."""
  params = nn.unbox(params)
  out = {k: v for k, v in params.items() if k not in ("memory_blocks", "blocks")}
  for name, first, size in _groups(cfg):
    if name not in params:
      raise KeyError(f"scanned params lack '{name}' (is this the unrolled layout already?)")
    for j in range(size):
      out[f"block_{first + j}"] = jax.tree.map(lambda x, j=j: x[j], params[name])
  return out


def stack_layers(params: dict, cfg: ModelConfig) -> dict:
  """Unrolled layout -> scanned layout (`memory_blocks` / `blocks` with a leading layer axis)."""
  params = nn.unbox(params)
  out = {k: v for k, v in params.items() if not k.startswith("block_")}
  for name, first, size in _groups(cfg):
    layers = [params[f"block_{first + j}"] for j in range(size)]
    out[name] = jax.tree.map(lambda *xs: jnp.stack(xs), *layers)
  return out
