"""train.init_from (lm2_jax.train.warm_start): a run starts from a checkpoint's parameters.

A tiny imported Llama (the tied golden fixture) starts a run with memory, in the scanned layout on a
(2, 2, 2) mesh; its first step runs at learning rate 0 (the warm-up's first step), so the parameters
after it are exactly those the step started from.
"""

import pathlib

import jax
import numpy as np
import pytest
from flax import traverse_util

from lm2_jax.convert.__main__ import import_hf, restore_checkpoint
from lm2_jax.eval.checkpoints import CheckpointError
from lm2_jax.model import LM2, unstack_layers
from lm2_jax.train import checkpoint as ckpt_lib
from lm2_jax.train import mesh as mesh_lib
from lm2_jax.train import optimizer as opt_lib
from lm2_jax.train import state as state_lib
from lm2_jax.train import step as step_lib
from lm2_jax.train.config import CheckpointConfig, MeshConfig, TrainConfig
from lm2_jax.train.warm_start import WarmStartError, load_initial_params

TIED = pathlib.Path(__file__).parent / "fixtures" / "hf_tiny_llama_tied"
MEMORY = {"use_memory": True, "memory_layers": 1, "num_slots": 8, "memory_init": "learned"}
TRAIN = TrainConfig(steps=4, batch_size=4, warmup_steps=2, learning_rate=1e-2)
BATCH, LENGTH = 4, 16


def _is_memory(path):
  return path[0] == "memory_init" or "memory" in path[:2]


def _flat(params):
  return {k: np.asarray(v) for k, v in traverse_util.flatten_dict(params).items()}


def _init(cfg, mesh, seed=0):
  tx = opt_lib.make_optimizer(TRAIN)
  state, shardings = state_lib.init_state(LM2(cfg), tx, mesh, (BATCH, LENGTH), seed)
  return tx, state, shardings


def _one_step(cfg, tx, state, shardings, mesh):
  """One compiled train step, as train.loop runs it (explicit shardings, donated state)."""
  abstract, _ = state_lib.abstract_state(LM2(cfg), tx, mesh, (BATCH, LENGTH), TRAIN.seed)
  spec = step_lib.abstract_batch(BATCH, LENGTH, 1, mesh)
  step = step_lib.compile_train_step(
      step_lib.make_train_step(LM2(cfg), tx, opt_lib.make_schedule(TRAIN), 1, mesh), shardings,
      abstract, spec, mesh)
  ids = np.random.default_rng(0).integers(0, cfg.vocab_size, (BATCH, LENGTH + 1), dtype=np.int32)
  batch = {"inputs": ids[:, :-1], "targets": ids[:, 1:],
           "loss_mask": np.ones((BATCH, LENGTH), np.float32),
           "valid": np.ones((BATCH, LENGTH), bool), "resets": np.ones((BATCH, 1), bool)}
  return step(state, mesh_lib.global_batch(batch, mesh))


@pytest.fixture(scope="module")
def imported(tmp_path_factory):
  """(params checkpoint of the tied fixture, unrolled and memory-less; its config and params)."""
  ckpt = import_hf(str(TIED), str(tmp_path_factory.mktemp("import") / "ckpt"), ["segment_length=16"])
  cfg, variables = restore_checkpoint(ckpt)
  return ckpt, cfg, _flat(variables["params"])


def test_init_from_an_imported_llama_with_fresh_memory(imported, tmp_path):
  ckpt, llama_cfg, llama = imported
  cfg = llama_cfg.replace(scan_layers=True, **MEMORY)
  mesh = mesh_lib.make_mesh(MeshConfig(data=2, fsdp=2, tensor=2))
  tx, fresh, shardings = _init(cfg, mesh)
  fresh_flat = _flat(unstack_layers(fresh.params, cfg))
  params = load_initial_params(ckpt, cfg, fresh.params, shardings.params)
  wanted = traverse_util.flatten_dict(shardings.params)
  for path, array in traverse_util.flatten_dict(params).items():
    assert array.sharding.is_equivalent_to(wanted[path], array.ndim), path
    assert array.dtype == traverse_util.flatten_dict(fresh.params)[path].dtype, path

  state, metrics = _one_step(cfg, tx, fresh.replace(params=params), shardings, mesh)
  assert float(metrics["lr"]) == 0.0 and np.isfinite(float(metrics["loss"]))
  after = _flat(unstack_layers(state.params, cfg))
  memory = [p for p in after if _is_memory(p)]
  assert memory and sorted(set(after) - set(memory)) == sorted(llama)
  for path, value in after.items():
    expected = fresh_flat[path] if _is_memory(path) else llama[path]
    np.testing.assert_array_equal(value, expected, err_msg=str(path))

  # That run's checkpoint starts another run in the unrolled layout: memory now comes from it too.
  run_dir = tmp_path / "runs" / "warm"
  checkpointer = ckpt_lib.Checkpointer(run_dir / "checkpoints", CheckpointConfig(async_save=False))
  checkpointer.save(1, state, config={"model": cfg.to_dict()})
  checkpointer.close()
  unrolled = cfg.replace(scan_layers=False)
  single = mesh_lib.make_mesh(MeshConfig(data=1, num_devices=1))
  _, fresh2, shardings2 = _init(unrolled, single, seed=1)
  params2 = _flat(load_initial_params(run_dir, unrolled, fresh2.params, shardings2.params))
  assert sorted(params2) == sorted(after)
  for path, value in after.items():
    np.testing.assert_array_equal(params2[path], value, err_msg=str(path))


def test_memory_missing_from_the_run_is_dropped_and_memory_layers_may_grow(imported, tmp_path):
  """A checkpoint with memory in block 0 starts a run with memory in blocks 0 and 1: block 0's
  memory is the checkpoint's, block 1's the fresh init; a memory-less run ignores the memory."""
  ckpt, llama_cfg, _ = imported
  single = mesh_lib.make_mesh(MeshConfig(data=1, num_devices=1))
  one = llama_cfg.replace(**MEMORY)
  _, source, shardings = _init(one, single, seed=2)
  params = jax.tree.map(lambda x: x + 0.5, load_initial_params(ckpt, one, source.params,
                                                              shardings.params))
  run_dir = tmp_path / "run"
  checkpointer = ckpt_lib.Checkpointer(run_dir / "checkpoints", CheckpointConfig(async_save=False))
  checkpointer.save(2, source.replace(params=params), config={"model": one.to_dict()})
  checkpointer.close()
  saved = _flat(params)

  two = one.replace(memory_layers=2, scan_layers=True)
  _, fresh, shardings = _init(two, single, seed=3)
  loaded = _flat(unstack_layers(load_initial_params(run_dir / "checkpoints" / "2", two,
                                                    fresh.params, shardings.params), two))
  fresh_flat = _flat(unstack_layers(fresh.params, two))
  for path, value in loaded.items():
    from_fresh = path[0] == "block_1" and _is_memory(path)
    np.testing.assert_array_equal(value, fresh_flat[path] if from_fresh else saved[path],
                                  err_msg=str(path))

  plain = llama_cfg
  _, fresh, shardings = _init(plain, single)
  loaded = _flat(load_initial_params(run_dir, plain, fresh.params, shardings.params))
  assert sorted(loaded) == sorted(p for p in saved if not _is_memory(p))
  for path, value in loaded.items():
    np.testing.assert_array_equal(value, saved[path], err_msg=str(path))


def test_mismatched_checkpoints_are_refused(imported, tmp_path):
  ckpt, llama_cfg, _ = imported
  # The shape checks come before init_params is read, so these calls need none.
  with pytest.raises(WarmStartError, match=r"model.d_model=128 but the checkpoint has 64; "
                                           r"model.mlp_dim=256 but the checkpoint has 128"):
    load_initial_params(ckpt, llama_cfg.replace(d_model=128, mlp_dim=256), {}, {})
  with pytest.raises(WarmStartError, match="model.tie_embeddings=False but the checkpoint has True"):
    load_initial_params(ckpt, llama_cfg.replace(tie_embeddings=False), {}, {})
  with pytest.raises(CheckpointError, match="does not exist"):
    load_initial_params(tmp_path / "nowhere", llama_cfg, {}, {})

  single = mesh_lib.make_mesh(MeshConfig(data=1, num_devices=1))
  eight = llama_cfg.replace(**MEMORY)
  _, state, _ = _init(eight, single)
  run_dir = tmp_path / "run"
  checkpointer = ckpt_lib.Checkpointer(run_dir / "checkpoints", CheckpointConfig(async_save=False))
  checkpointer.save(1, state, config={"model": eight.to_dict()})
  checkpointer.close()
  with pytest.raises(WarmStartError, match=r"memory parameter params/memory_init has shape \[8, 64\] "
                                           r"in the checkpoint, \[4, 64\] in this run; the memory"):
    load_initial_params(run_dir, eight.replace(num_slots=4), {}, {})


def test_init_params_must_be_the_models(imported):
  ckpt, llama_cfg, _ = imported
  with pytest.raises(WarmStartError, match="init_params lack params/"):
    load_initial_params(ckpt, llama_cfg, {"embed": {}}, {})

