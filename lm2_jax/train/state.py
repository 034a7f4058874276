"""The train state and its sharded initialisation (no full copy of the state on one device).

`init_state` follows eval_shape -> logical specs -> shardings -> jitted init: the abstract state carries
the model's logical axis names (`nn.LogicallyPartitioned` boxes, also inside the AdamW moments, which
mirror the parameters), `LOGICAL_AXIS_RULES` turns them into NamedShardings, and a jit with those
out_shardings materialises every array directly in its shards.
"""

from __future__ import annotations

import math
from typing import Callable

import flax.linen as nn
import flax.struct
import jax
import jax.numpy as jnp
import optax
from jax.sharding import Mesh, NamedSharding, PartitionSpec

from lm2_jax.train import mesh as mesh_lib
from lm2_jax.typing import Array, PyTree


@flax.struct.dataclass
class TrainState:
  """Everything a step reads and writes; the checkpoint saves exactly this.

  Attributes:
    step: optimizer steps taken, int32 scalar.
    params: model parameters (float32), unboxed.
    opt_state: optax state of `make_optimizer`.
    rng: raw uint32[2] key; split every step for the model's stochastic streams (`dropout`).
  """

  step: Array
  params: PyTree
  opt_state: PyTree
  rng: Array


def _init_fn(model: nn.Module, tx: optax.GradientTransformation, tokens_shape: tuple[int, int],
             seed: int) -> Callable[[], TrainState]:
  def init() -> TrainState:
    key = jax.random.PRNGKey(seed)
    init_key, step_key = jax.random.split(key)
    variables = model.init(init_key, jnp.zeros(tokens_shape, jnp.int32))
    params = variables["params"]
    return TrainState(step=jnp.zeros((), jnp.int32), params=params, opt_state=tx.init(params),
                      rng=step_key)
  return init


def _fit(sharding: NamedSharding, shape: tuple[int, ...]) -> NamedSharding:
  """Drops mesh axes from dimensions they do not divide (e.g. 2 kv heads on tensor=4): replicated."""
  spec = list(sharding.spec) + [None] * (len(shape) - len(sharding.spec))
  for i, axes in enumerate(spec):
    if axes is None:
      continue
    names = (axes,) if isinstance(axes, str) else tuple(axes)
    if shape[i] % math.prod(sharding.mesh.shape[a] for a in names):
      spec[i] = None
  return NamedSharding(sharding.mesh, PartitionSpec(*spec))


def state_shardings(abstract_boxed_state: TrainState, mesh: Mesh) -> TrainState:
  """NamedShardings of every state leaf, from the logical names in an abstract boxed state."""
  specs = nn.get_partition_spec(abstract_boxed_state)
  shardings = mesh_lib.logical_shardings(specs, mesh)
  return jax.tree.map(lambda x, s: _fit(s, x.shape), nn.unbox(abstract_boxed_state), shardings)


def abstract_state(model: nn.Module, tx: optax.GradientTransformation, mesh: Mesh,
                   tokens_shape: tuple[int, int], seed: int) -> tuple[TrainState, TrainState]:
  """(abstract unboxed state with shardings, shardings) without allocating anything.

  The abstract state (ShapeDtypeStructs carrying their NamedSharding) is the restore target of a
  checkpoint on this mesh, whatever mesh the checkpoint was written on.
  """
  with jax.set_mesh(mesh), nn.logical_axis_rules(mesh_lib.LOGICAL_AXIS_RULES):
    boxed = jax.eval_shape(_init_fn(model, tx, tokens_shape, seed))
  shardings = state_shardings(boxed, mesh)
  unboxed = nn.unbox(boxed)
  abstract = jax.tree.map(lambda x, s: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=s),
                          unboxed, shardings)
  return abstract, shardings


def init_state(model: nn.Module, tx: optax.GradientTransformation, mesh: Mesh,
               tokens_shape: tuple[int, int], seed: int) -> tuple[TrainState, TrainState]:
  """A fresh train state, materialised in shards; returns (state, shardings).

  Args:
    model: the flax module; `model.init(key, tokens)` must return {"params": ...} with logical boxes.
    tx: the optimizer.
    mesh: the device mesh.
    tokens_shape: [B, C*T] of a batch (only shapes matter; B can be 1 per data shard).
    seed: TrainConfig.seed.
  """
  _, shardings = abstract_state(model, tx, mesh, tokens_shape, seed)
  init = _init_fn(model, tx, tokens_shape, seed)
  with jax.set_mesh(mesh), nn.logical_axis_rules(mesh_lib.LOGICAL_AXIS_RULES):
    state = jax.jit(lambda: nn.unbox(init()), out_shardings=shardings)()
  return state, shardings


def param_count(params: PyTree) -> int:
  return sum(int(x.size) for x in jax.tree.leaves(params))
