"""Sharded train steps on 8 fake CPU devices match one device; accumulation matches a full batch
(token-weighted, with a loss mask that differs across micro-batches)."""

import jax
import numpy as np
import optax
import pytest

from lm2_jax.model import LM2, ModelConfig
from lm2_jax.train import config as config_lib
from lm2_jax.train import mesh as mesh_lib
from lm2_jax.train import optimizer as opt_lib
from lm2_jax.train import state as state_lib
from lm2_jax.train import step as step_lib
from test_train_evaluate import C, T, TINY_MODEL, CountingSource

BATCH = 8


def run_steps(mesh_cfg: config_lib.MeshConfig, steps: int = 3, micro_batches: int = 1, **model_kw):
  """Losses of `steps` train steps of the tiny model (with `model_kw` overrides) on `mesh_cfg`, and the
  final params on the host."""
  train_cfg = config_lib.TrainConfig(steps=10, batch_size=BATCH, micro_batches=micro_batches,
                                     learning_rate=1e-2, warmup_steps=1)
  model = LM2(ModelConfig.from_dict({**TINY_MODEL, **model_kw}))
  mesh = mesh_lib.make_mesh(mesh_cfg)
  tx, schedule = opt_lib.make_optimizer(train_cfg), opt_lib.make_schedule(train_cfg)
  init_shape = (mesh.shape["data"] * mesh.shape["fsdp"], C * T)
  abstract, shardings = state_lib.abstract_state(model, tx, mesh, init_shape, seed=0)
  state, _ = state_lib.init_state(model, tx, mesh, init_shape, seed=0)
  batch_spec = step_lib.abstract_batch(BATCH, C * T, C, mesh)
  compiled = step_lib.compile_train_step(
      step_lib.make_train_step(model, tx, schedule, micro_batches, mesh), shardings, abstract,
      batch_spec, mesh)
  source = CountingSource(BATCH * steps)
  losses = []
  for s in range(steps):
    rows = [source[i] for i in range(s * BATCH, (s + 1) * BATCH)]
    batch = {k: np.stack([r[k] for r in rows]) for k in step_lib.MODEL_KEYS}
    state, metrics = compiled(state, mesh_lib.global_batch(batch, mesh))
    losses.append(float(metrics["loss"]))
  # The state keeps the shardings the rules asked for (e.g. embed over fsdp).
  for leaf, sharding in zip(jax.tree.leaves(state), jax.tree.leaves(shardings)):
    assert leaf.sharding.is_equivalent_to(sharding, leaf.ndim)
  return np.asarray(losses), jax.device_get(state.params)


@pytest.fixture(scope="module")
def single_device():
  return run_steps(config_lib.MeshConfig(data=1, num_devices=1))


@pytest.mark.slow
@pytest.mark.parametrize("shape", [
    (8, 1, 1), (1, 1, 8), (2, 2, 1), (1, 2, 2),
    # data, fsdp and tensor all > 1: needs the XLA workaround described at lm2_jax.model.layers.TOKEN_AXES.
    (2, 2, 2),
])
def test_sharded_steps_match_one_device(single_device, shape):
  assert jax.device_count() == 8
  losses, params = run_steps(config_lib.MeshConfig(*shape, num_devices=int(np.prod(shape))))
  ref_losses, ref_params = single_device
  assert ref_losses[-1] < ref_losses[0]  # the steps really train, so a match is not trivial
  np.testing.assert_allclose(losses, ref_losses, rtol=2e-5)
  for a, b in zip(jax.tree.leaves(params), jax.tree.leaves(ref_params)):
    np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-5)


# small.yaml's fast paths: the memory's products folded into the slots, the segments unrolled.
FAST_PATHS = dict(memory_product_order="slot_first", unroll_segments=C)


@pytest.mark.slow
@pytest.mark.parametrize("shape", [(1, 1, 8), (2, 2, 2)])
def test_sharded_fast_paths_match_one_device(shape):
  """The slot-first products' [B, D, Nm, M] maps and the unrolled segments under data, fsdp and tensor
  sharding: the same losses and parameters as on one device."""
  ref_losses, ref_params = run_steps(config_lib.MeshConfig(data=1, num_devices=1), **FAST_PATHS)
  losses, params = run_steps(config_lib.MeshConfig(*shape, num_devices=int(np.prod(shape))),
                             **FAST_PATHS)
  assert ref_losses[-1] < ref_losses[0]
  np.testing.assert_allclose(losses, ref_losses, rtol=2e-5)
  for a, b in zip(jax.tree.leaves(params), jax.tree.leaves(ref_params)):
    np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-5)


def _one_sgd_step(batch: dict, micro_batches: int):
  """One compiled train step with SGD at learning rate 1 (so the update is minus the gradient):
  (model, params before it, update, metrics)."""
  model = LM2(ModelConfig.from_dict(TINY_MODEL))
  mesh = mesh_lib.make_mesh(config_lib.MeshConfig(data=1, num_devices=1))
  tx, schedule = optax.sgd(1.0), optax.constant_schedule(1.0)
  shape = (1, C * T)
  abstract, shardings = state_lib.abstract_state(model, tx, mesh, shape, seed=0)
  state, _ = state_lib.init_state(model, tx, mesh, shape, seed=0)
  before = jax.device_get(state.params)
  compiled = step_lib.compile_train_step(
      step_lib.make_train_step(model, tx, schedule, micro_batches, mesh), shardings, abstract,
      step_lib.abstract_batch(BATCH, C * T, C, mesh), mesh)
  state, metrics = compiled(state, mesh_lib.global_batch(batch, mesh))
  update = jax.tree.map(lambda a, b: np.asarray(a) - np.asarray(b), jax.device_get(state.params), before)
  return model, before, update, jax.device_get(metrics)


def test_gradient_accumulation_weights_micro_batches_by_their_tokens():
  """The step's loss is the token-weighted mean over the batch. With a loss mask whose weight differs
  across micro-batches (micro-batch a holds rows a, a+4: here 30, 12, 2 and 0 of their 64 target
  tokens count, at scattered positions), 4 micro-batches must give one full batch's loss and gradient,
  and both must equal an independent gradient of sum(masked NLL) / sum(mask); a mean of micro-batch
  means would weight micro-batch 2's two tokens like micro-batch 0's thirty."""
  source = CountingSource(BATCH)
  batch = {k: np.stack([source[i][k] for i in range(BATCH)]) for k in step_lib.MODEL_KEYS}
  rng = np.random.default_rng(0)
  keep = {0: 15, 1: 6, 2: 1, 3: 0}                     # per row, by micro-batch
  mask = np.zeros((BATCH, C * T), np.float32)
  for i in range(BATCH):
    mask[i, rng.choice(C * T, keep[i % 4], replace=False)] = 1.0
  batch["loss_mask"] = mask
  model, params, full_update, full_metrics = _one_sgd_step(batch, micro_batches=1)
  _, _, accum_update, accum_metrics = _one_sgd_step(batch, micro_batches=4)

  def loss(p):
    stats, _ = model.apply({"params": p}, batch["inputs"], batch["targets"], mask,
                           resets=batch["resets"], valid=batch["valid"], method=LM2.loss)
    return stats.nll_sum.sum() / stats.weight_sum.sum()

  value, grads = jax.value_and_grad(loss)(params)
  assert float(full_metrics["tokens"]) == float(accum_metrics["tokens"]) == mask.sum() == 44
  np.testing.assert_allclose(full_metrics["loss"], value, rtol=1e-5)
  np.testing.assert_allclose(accum_metrics["loss"], value, rtol=1e-5)
  for update in (full_update, accum_update):
    for u, g in zip(jax.tree.leaves(update), jax.tree.leaves(grads)):
      np.testing.assert_allclose(-u, g, rtol=1e-4, atol=1e-6)
  assert max(float(np.abs(g).max()) for g in jax.tree.leaves(grads)) > 1e-2


def test_fsdp_shards_embed_axis_and_fits_indivisible_dims():
  # eval_shape only: the rules put embed on fsdp; 2 kv heads on tensor=4 fall back to replicated.
  model = LM2(ModelConfig.from_dict(TINY_MODEL))
  cfg = config_lib.TrainConfig()
  mesh = mesh_lib.make_mesh(config_lib.MeshConfig(data=1, fsdp=2, tensor=4))
  _, shardings = state_lib.abstract_state(model, opt_lib.make_optimizer(cfg), mesh, (2, C * T), 0)
  embed = shardings.params["embed"]["embedding"].spec
  assert tuple(embed) == ("tensor", "fsdp")
  q_proj = shardings.params["block_0"]["attn"]["q_proj"]["kernel"].spec
  k_proj = shardings.params["block_0"]["attn"]["k_proj"]["kernel"].spec
  assert tuple(q_proj) == ("fsdp", "tensor", None)
  assert tuple(k_proj)[:2] == ("fsdp", None)
  mu = shardings.opt_state[1][0].mu["embed"]["embedding"].spec  # AdamW moments follow the params
  assert tuple(mu) == ("tensor", "fsdp")


def test_mesh_shape_resolution_and_errors():
  assert mesh_lib.mesh_shape(config_lib.MeshConfig(data=-1, fsdp=2, tensor=2), 8) == (2, 2, 2)
  assert mesh_lib.mesh_shape(config_lib.MeshConfig(data=1, fsdp=1, tensor=-1), 8) == (1, 1, 8)
  with pytest.raises(config_lib.ConfigError, match="not divisible"):
    mesh_lib.mesh_shape(config_lib.MeshConfig(data=-1, fsdp=3, tensor=1), 8)
  with pytest.raises(config_lib.ConfigError, match="at most one axis"):
    mesh_lib.mesh_shape(config_lib.MeshConfig(data=-1, fsdp=-1, tensor=1), 8)
  with pytest.raises(config_lib.ConfigError, match="8 devices"):
    mesh_lib.mesh_shape(config_lib.MeshConfig(data=2, fsdp=2, tensor=1), 8)
