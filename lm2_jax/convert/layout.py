"""Where each per-layer parameter lives in the model's tree, for unrolled and scanned layouts.

The converters speak the unrolled layout (`block_{i}/attn/q_proj/kernel`, one array per layer), which is
the one that maps onto Hugging Face names. With `scan_layers: true` the model stacks layers on a new
axis. Rather than re-deriving that layout, `plan_layout` asks `lm2_jax.model.stack_layers` itself: it
stacks a tree of tiny id arrays (one per unrolled parameter) and reads back which unrolled parameter
sits at which index of which stacked parameter. Converters then fill or slice one stacked parameter at a
time, so neither layout is ever materialised twice.
"""

from __future__ import annotations

import dataclasses

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
from flax import traverse_util

from lm2_jax.model import LM2, ModelConfig

Path = tuple[str, ...]


@dataclasses.dataclass(frozen=True)
class Target:
  """One parameter of the model's own tree, and the unrolled parameters it is made of.

  Attributes:
    shape: its shape; dtype: its dtype (the model's param dtype).
    parts: the unrolled paths it holds, in layer order (one path when not stacked).
    axis: the stacking axis (None when the parameter is not stacked).
  """

  shape: tuple[int, ...]
  dtype: np.dtype
  parts: tuple[Path, ...]
  axis: int | None


@dataclasses.dataclass(frozen=True)
class Layout:
  """The model's parameters (`targets`, by path in its own tree) in terms of unrolled parameters.

  Attributes:
    targets: model path -> Target.
    unrolled: unrolled path -> jax.ShapeDtypeStruct of that per-layer parameter.
    where: unrolled path -> (model path, index along the stacking axis or None).
  """

  targets: dict[Path, Target]
  unrolled: dict[Path, jax.ShapeDtypeStruct]
  where: dict[Path, tuple[Path, int | None]]


def abstract_params(cfg: ModelConfig) -> dict[Path, jax.ShapeDtypeStruct]:
  """Flat {path: ShapeDtypeStruct} of the unboxed params of `LM2(cfg)`, without allocating them."""
  tokens = jax.ShapeDtypeStruct((1, cfg.segment_length), jnp.int32)
  variables = jax.eval_shape(LM2(cfg).init, jax.random.key(0), tokens)
  return traverse_util.flatten_dict(nn.meta.unbox(variables)["params"])


def plan_layout(cfg: ModelConfig) -> Layout:
  """The Layout of `LM2(cfg)`'s parameters (identity when `cfg.scan_layers` is false)."""
  targets_abs = abstract_params(cfg)
  if not cfg.scan_layers:
    targets = {p: Target(tuple(s.shape), np.dtype(s.dtype), (p,), None)
               for p, s in targets_abs.items()}
    return Layout(targets, dict(targets_abs), {p: (p, None) for p in targets_abs})

  from lm2_jax.model import stack_layers  # pylint: disable=import-outside-toplevel

  unrolled = abstract_params(cfg.replace(scan_layers=False))
  order = sorted(unrolled)
  ids = {p: np.full((1,) * len(unrolled[p].shape), i, np.int32) for i, p in enumerate(order)}
  stacked = traverse_util.flatten_dict(
      stack_layers(traverse_util.unflatten_dict(ids), cfg))
  if set(stacked) != set(targets_abs):
    raise RuntimeError(f"lm2_jax.model.stack_layers gives paths {sorted(stacked)}, but the scanned "
                       f"model has {sorted(targets_abs)}; the layouts disagree")
  targets, where = {}, {}
  for path, id_array in stacked.items():
    parts = tuple(order[int(i)] for i in np.asarray(id_array).reshape(-1))
    shape = tuple(targets_abs[path].shape)
    axis = _stack_axis(shape, tuple(unrolled[parts[0]].shape), len(parts))
    if axis is None and len(parts) != 1:
      raise RuntimeError(f"cannot locate the layer axis of {'/'.join(path)} {shape}")
    targets[path] = Target(shape, np.dtype(targets_abs[path].dtype), parts, axis)
    for index, part in enumerate(parts):
      where[part] = (path, None if axis is None else index)
  return Layout(targets, unrolled, where)


def _stack_axis(stacked: tuple[int, ...], single: tuple[int, ...], count: int) -> int | None:
  """The axis a of `stacked` such that removing it leaves `single` and stacked[a] == count."""
  if stacked == single:
    return None
  for a in range(len(stacked)):
    if stacked[a] == count and stacked[:a] + stacked[a + 1:] == single:
      return a
  return None


def gather(target: Target, fetch) -> np.ndarray:
  """Assembles one model parameter on the host, calling `fetch(unrolled path)` per part.

  The result is 64-byte aligned, which lets `jax.device_put(..., may_alias=True)` adopt it on a CPU
  device instead of copying it (one buffer per parameter instead of two at the peak).
  """
  out = aligned_empty(target.shape, target.dtype)
  if target.axis is None:
    out[...] = fetch(target.parts[0])
    return out
  view = np.moveaxis(out, target.axis, 0)
  for index, part in enumerate(target.parts):
    view[index] = fetch(part)
  return out


def aligned_empty(shape: tuple[int, ...], dtype: np.dtype, alignment: int = 64) -> np.ndarray:
  """np.empty whose data pointer is a multiple of `alignment` bytes (XLA's zero-copy requirement)."""
  dtype = np.dtype(dtype)
  nbytes = int(np.prod(shape, dtype=np.int64)) * dtype.itemsize
  raw = np.empty(nbytes + alignment, np.uint8)
  offset = (-raw.ctypes.data) % alignment
  return raw[offset:offset + nbytes].view(dtype).reshape(shape)


def part_of(array, target: Target, index: int | None) -> np.ndarray:
  """The host copy of one unrolled parameter, sliced out of a model parameter (a jax array)."""
  if index is None:
    return np.asarray(jax.device_get(array))
  return np.asarray(jax.device_get(array[(slice(None),) * target.axis + (index,)]))
