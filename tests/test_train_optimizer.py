"""Optimizer: warm-up + cosine schedule, and weight decay on matrices only."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from lm2_jax.model import LM2, ModelConfig
from lm2_jax.train import config as config_lib
from lm2_jax.train import optimizer as opt_lib
from test_train_evaluate import TINY_MODEL


def test_schedule_warms_up_then_decays_to_the_floor():
  cfg = config_lib.TrainConfig(steps=110, learning_rate=1.0, warmup_steps=10, min_lr_ratio=0.1)
  lr = opt_lib.make_schedule(cfg)
  assert float(lr(0)) == 0.0
  assert float(lr(5)) == pytest.approx(0.5)
  assert float(lr(10)) == pytest.approx(1.0)
  assert float(lr(60)) == pytest.approx(0.55, abs=1e-6)  # cosine midpoint between 1.0 and 0.1
  assert float(lr(110)) == pytest.approx(0.1)
  assert float(lr(500)) == pytest.approx(0.1)


def test_decay_mask_covers_matrices_but_not_norms_biases_or_memory_init():
  model = LM2(ModelConfig.from_dict(dict(TINY_MODEL, memory_init="learned")))
  params = jax.eval_shape(lambda: model.init(jax.random.key(0), jnp.zeros((1, 32), jnp.int32)))
  mask = opt_lib.decay_mask(params["params"])
  flat = {jax.tree_util.keystr(k): v for k, v in jax.tree_util.tree_leaves_with_path(mask)}
  assert any("memory_init" in k for k in flat) and not any(v for k, v in flat.items()
                                                           if "memory_init" in k)
  assert not any(v for k, v in flat.items() if "scale" in k or "bias" in k)
  assert all(v for k, v in flat.items() if "kernel" in k or "embedding" in k)


def test_weight_decay_shrinks_matrices_only():
  cfg = config_lib.TrainConfig(learning_rate=0.1, warmup_steps=0, steps=10, weight_decay=0.5,
                               clip_norm=1.0)
  tx = opt_lib.make_optimizer(cfg)
  params = {"dense": {"kernel": jnp.ones((2, 2)), "bias": jnp.ones((2,))},
            "memory_init": jnp.ones((2, 2)), "norm": {"scale": jnp.ones((2,))}}
  grads = jax.tree.map(jnp.zeros_like, params)
  updates, _ = tx.update(grads, tx.init(params), params)
  new = jax.tree.map(lambda p, u: p + u, params, updates)
  assert np.all(np.asarray(new["dense"]["kernel"]) < 1.0)
  for untouched in (new["dense"]["bias"], new["memory_init"], new["norm"]["scale"]):
    np.testing.assert_array_equal(np.asarray(untouched), 1.0)
