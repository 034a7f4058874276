"""The device mesh (data, fsdp, tensor) and the one table mapping logical axis names onto it.

Parameters and activations carry logical names (set by the model with `nn.with_logical_partitioning` and
`nn.with_logical_constraint`); `LOGICAL_AXIS_RULES` is the only place that decides which mesh axis shards
each of them (DESIGN.md §4). Axes are `AxisType.Auto`: linen's sharding constraints need them.
"""

from __future__ import annotations

import math

import flax.linen as nn
import jax
import numpy as np
from jax.sharding import Mesh, NamedSharding, PartitionSpec

from lm2_jax.train.config import ConfigError, MeshConfig

MESH_AXES = ("data", "fsdp", "tensor")
BATCH_AXES = ("data", "fsdp")

# Logical name -> mesh axes. Shape comments name the parameters that carry each axis.
LOGICAL_AXIS_RULES: tuple[tuple[str, str | tuple[str, ...] | None], ...] = (
    # Parameters.
    ("embed", "fsdp"),           # D of every [D, ...] / [..., D] matrix and the [V, D] embedding
    ("vocab", "tensor"),         # V of the embedding [V, D] and the unembedding [D, V]
    ("heads", "tensor"),         # N of the query / output projections [D, N, H], [N, H, D]
    ("kv_heads", "tensor"),      # K of the key / value projections [D, K, H]
    ("mlp", "tensor"),           # F of the SwiGLU matrices [D, F], [F, D]
    ("mem_heads", "tensor"),     # Nm of the memory projections [D, Nm, H]
    ("mem_embed", "tensor"),     # D of the memory gates / update projections [D, D]
    ("head_dim", None),          # H
    ("mem_head_dim", None),      # H of memory heads
    ("slots", None),             # M of the learned memory init [M, D]
    ("layers", None),            # L of scanned layer stacks
    ("norm", None),              # D of RMSNorm scales [D]
    # Activations.
    ("activation_batch", BATCH_AXES),
    ("activation_heads", "tensor"),
    ("activation_kv_heads", "tensor"),
    ("activation_mlp", "tensor"),
    ("activation_vocab", "tensor"),
    ("activation_length", None),
    ("activation_embed", None),
    ("activation_slots", None),
)


def mesh_shape(cfg: MeshConfig, num_devices: int) -> tuple[int, int, int]:
  """Resolves the -1 axis of `cfg` against `num_devices`; raises ConfigError if they do not fit."""
  sizes = [cfg.data, cfg.fsdp, cfg.tensor]
  free = [i for i, s in enumerate(sizes) if s == -1]
  if len(free) > 1:
    raise ConfigError(f"mesh: at most one axis may be -1, got data={cfg.data} fsdp={cfg.fsdp} "
                      f"tensor={cfg.tensor}")
  fixed = math.prod(s for s in sizes if s != -1)
  if free:
    if num_devices % fixed:
      raise ConfigError(f"mesh: {num_devices} devices are not divisible by the fixed axes' product "
                        f"{fixed} (data={cfg.data} fsdp={cfg.fsdp} tensor={cfg.tensor})")
    sizes[free[0]] = num_devices // fixed
  elif fixed != num_devices:
    raise ConfigError(f"mesh: data*fsdp*tensor = {fixed} but {num_devices} devices are available; "
                      "set one axis to -1 or match the device count")
  return tuple(sizes)


def make_mesh(cfg: MeshConfig, devices: list | None = None) -> Mesh:
  """A (data, fsdp, tensor) mesh of Auto axes over `devices` (default: all devices of all processes,
  or the first `cfg.num_devices`)."""
  if devices is None:
    devices = list(jax.devices())
    if cfg.num_devices:
      if cfg.num_devices > len(devices):
        raise ConfigError(f"mesh.num_devices={cfg.num_devices} but only {len(devices)} devices exist")
      devices = devices[:cfg.num_devices]
  devices = list(devices)
  shape = mesh_shape(cfg, len(devices))
  if devices == list(jax.devices()):
    return jax.make_mesh(shape, MESH_AXES, axis_types=(jax.sharding.AxisType.Auto,) * 3)
  return Mesh(np.asarray(devices).reshape(shape), MESH_AXES,
              axis_types=(jax.sharding.AxisType.Auto,) * 3)


def logical_shardings(logical_specs, mesh: Mesh):
  """Maps a tree of logical PartitionSpecs (from `nn.get_partition_spec`) to NamedShardings."""
  return nn.logical_to_mesh_sharding(logical_specs, mesh, LOGICAL_AXIS_RULES)


def batch_sharding(mesh: Mesh) -> NamedSharding:
  """Rows split over (data, fsdp), everything else replicated; used for every batch array."""
  return NamedSharding(mesh, PartitionSpec(BATCH_AXES))


def replicated(mesh: Mesh) -> NamedSharding:
  return NamedSharding(mesh, PartitionSpec())


def global_batch(local_batch: dict, mesh: Mesh) -> dict:
  """Builds global arrays from this process's rows (multi-host ready; one process = the whole batch)."""
  sharding = batch_sharding(mesh)
  return {k: jax.make_array_from_process_local_data(sharding, np.asarray(v))
          for k, v in local_batch.items()}
