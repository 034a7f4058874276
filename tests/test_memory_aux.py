"""`train.memory_aux_weight`: the write-information auxiliary loss. Its value against a NumPy recomputation
from the sown write routes (with padding), weight 0 == the plain loss, its gradient reaches the routing
parameters and not the output head, micro-batches agree, the config refusals, and the logged metric."""

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from lm2_jax.model import LM2
from lm2_jax.train import config as config_lib
from lm2_jax.train import metrics as metrics_lib
from lm2_jax.train import step as step_lib
from lm2_jax.train.loop import train
from lm2_jax.train.state import TrainState
from model_utils import tiny_config as tiny_model
from test_train_diagnostics import C, _batch, _params, _sown
from test_train_evaluate import TINY_MODEL, sources, tiny_config

WRITES = {
    # Sharper scores than the default: at init the default's routes are uniform to ~1e-6 nats.
    "slots-scanned": {"memory_write": "slots", "scan_layers": True, "memory_score_scale": 300.0},
    "keyed": {"memory_write": "keyed", "memory_init": "zeros"},
    "delta": {"memory_write": "delta", "memory_init": "zeros", "memory_heads": 1,
              "memory_flow": "per_block"},
}
# The write's routing parameters, by the end of their path.
ROUTING = {"slots-scanned": ("memory/query/kernel", "memory/key/kernel"), "keyed": ("memory/key/kernel",),
           "delta": ("memory/write_addr/kernel",)}


def _keep_gradients():
  """An 'optimizer' that leaves the parameters and keeps the step's gradient as its state, exactly."""
  return optax.GradientTransformation(
      init=lambda params: jax.tree.map(jnp.zeros_like, params),
      update=lambda grads, state, params=None: (jax.tree.map(jnp.zeros_like, grads), grads))


def _step(cfg, weight, micro_batches=1, params=None):
  """(gradients, metrics) of one train step at `weight` on `_batch(cfg)` (4 rows with padding)."""
  params = _params(cfg) if params is None else params
  tx = _keep_gradients()
  state = TrainState(step=jnp.zeros((), jnp.int32), params=params, opt_state=tx.init(params),
                     rng=jax.random.PRNGKey(0))
  aux = {} if weight is None else {"memory_aux_weight": weight}   # None: the step as it was without it
  step = step_lib.make_train_step(LM2(cfg), tx, optax.constant_schedule(1.0), micro_batches, **aux)
  new_state, metrics = jax.jit(step)(state, _batch(cfg))
  return new_state.opt_state, jax.device_get(metrics)


def _plogp(p):
  return np.where(p > 0, p * np.log(np.where(p > 0, p, 1.0)), 0.0)


def _numpy_aux(cfg):
  """memory_aux of `_batch(cfg)`: -(mean over blocks, rows, segments with a real token of the head-mean
  mutual information between the segment's real tokens and the rows they write to), one at a time."""
  batch, t = _batch(cfg), cfg.segment_length
  (_, _), state = LM2(cfg).apply({"params": _params(cfg)}, batch["inputs"], batch["targets"],
                                 batch["loss_mask"], resets=batch["resets"], valid=batch["valid"],
                                 method=LM2.loss, mutable=["intermediates"])
  terms = []
  for i in range(cfg.num_memory_layers):
    routes = _sown(state["intermediates"], cfg, i)["write_routes"].astype(np.float64)  # [C, B, Nm, T, M]
    for b in range(batch["inputs"].shape[0]):
      for c in range(C):
        real = batch["valid"][b, c * t:(c + 1) * t]
        if not real.any():
          continue
        heads = []
        for n in range(routes.shape[2]):
          w = routes[c, b, n][real]                                     # real tokens only [t', M]
          w = w * w if cfg.memory_write == "delta" else np.maximum(w, 0)
          p = w / w.sum(axis=1, keepdims=True)
          mean = p.mean(axis=0)
          heads.append(-_plogp(mean).sum() + _plogp(p).sum(axis=1).mean())
        terms.append(np.mean(heads))
  assert len(terms) == cfg.num_memory_layers * (4 * C - 1)             # row 0's segment 1 is all padding
  return -float(np.mean(terms))


@pytest.mark.parametrize("write", list(WRITES))
def test_the_aux_term_equals_a_numpy_computation_from_the_sown_routes(write):
  cfg = tiny_model(**WRITES[write])
  want = _numpy_aux(cfg)
  _, metrics = _step(cfg, 0.5)
  assert metrics["memory_aux"] == pytest.approx(want, rel=1e-5, abs=1e-6)
  assert want < -1e-2                           # not a vacuous zero: the writes carry information
  # Micro-batches (their real segments differ: row 0 has an all-padding one) report the same mean.
  _, micro = _step(cfg, 0.5, micro_batches=2)
  assert micro["memory_aux"] == pytest.approx(want, rel=1e-5, abs=1e-6)


def test_weight_zero_is_the_plain_loss_exactly():
  cfg = tiny_model(**WRITES["slots-scanned"])
  plain_grads, plain = _step(cfg, None)
  zero_grads, zero = _step(cfg, 0.0)
  assert "memory_aux" not in zero and sorted(zero) == sorted(plain)
  for k in plain:
    np.testing.assert_array_equal(zero[k], plain[k], err_msg=k)
  for a, b in zip(jax.tree.leaves(zero_grads), jax.tree.leaves(plain_grads)):
    np.testing.assert_array_equal(a, b)
  # ... and the plain loss is the token-weighted NLL of LM2.loss.
  batch = _batch(cfg)
  stats, _ = LM2(cfg).apply({"params": _params(cfg)}, batch["inputs"], batch["targets"], batch["loss_mask"],
                            resets=batch["resets"], valid=batch["valid"], method=LM2.loss)
  assert float(zero["loss"]) == pytest.approx(float(stats.nll_sum.sum() / stats.weight_sum.sum()), rel=1e-6)


@pytest.mark.parametrize("write", list(WRITES))
def test_the_aux_gradient_reaches_the_routing_parameters_and_not_the_final_norm(write):
  cfg = tiny_model(**WRITES[write])
  grads, losses = {}, {}
  for weight in (0.0, 0.5, 1.0):
    tree, metrics = _step(cfg, weight)
    grads[weight] = {"/".join(str(getattr(k, "key", k)) for k in path): np.asarray(g)
                     for path, g in jax.tree_util.tree_leaves_with_path(tree)}
    losses[weight] = float(metrics["loss"])
  assert losses[0.5] == pytest.approx(losses[0.0], rel=1e-6)    # the logged loss stays the NLL
  diff = {k: grads[1.0][k] - grads[0.0][k] for k in grads[0.0]}
  routing = [k for k in diff if k.endswith(ROUTING[write])]
  assert routing
  for k in routing:
    assert np.abs(diff[k]).max() > 1e-4, k
  for k in diff:   # linear in the weight
    np.testing.assert_allclose(grads[0.5][k] - grads[0.0][k], 0.5 * diff[k], atol=1e-6, err_msg=k)
  # The final norm comes after every write: the aux term does not reach it.
  assert np.abs(diff["final_norm/scale"]).max() < 1e-7
  if write == "keyed":
    return   # a straight-through gradient: not the derivative of the forward value
  # Its scale: along the aux gradient g, memory_aux changes at the rate |g|^2 (central difference).
  g = jax.tree.map(lambda a, b: a - b, *(_step(cfg, w)[0] for w in (1.0, 0.0)))
  norm2 = sum(float(np.sum(np.square(x))) for x in jax.tree.leaves(g))
  eps = 1e-3 / norm2
  def aux_at(sign):
    params = jax.tree.map(lambda p, d: p + sign * eps * d, _params(cfg), g)
    return float(_step(cfg, 1.0, params=params)[1]["memory_aux"])
  assert (aux_at(1) - aux_at(-1)) / (2 * eps) == pytest.approx(norm2, rel=0.03)


@pytest.mark.parametrize("model, match", [
    ({"memory_write": "tokens"}, "train.memory_aux_weight=0.1 needs per-token write weights .*"
                                 "model.memory_write=tokens"),
    ({"memory_kind": "rmt"}, "train.memory_aux_weight=0.1 .*model.memory_kind=rmt"),
    ({"use_memory": False}, "train.memory_aux_weight=0.1 .*no memory blocks"),
])
def test_models_without_write_weights_are_refused(tmp_path, model, match):
  cfg = tiny_config(tmp_path, model=dict(TINY_MODEL, **model), train={"memory_aux_weight": 0.1})
  with pytest.raises(config_lib.ConfigError, match=match):
    cfg.model_config()
  with pytest.raises(config_lib.ConfigError, match=match):
    train(cfg, sources=sources(), echo=lambda s: None)
  # Off, the same models train as before.
  off = tiny_config(tmp_path, model=dict(TINY_MODEL, **model))
  assert off.train.memory_aux_weight == 0.0 and off.model_config() is not None


def test_a_negative_weight_is_refused(tmp_path):
  cfg = tiny_config(tmp_path, model=dict(TINY_MODEL, memory_write="slots"),
                    train={"memory_aux_weight": -0.1})
  with pytest.raises(config_lib.ConfigError, match=r"train.memory_aux_weight=-0.1 must be >= 0"):
    train(cfg, sources=sources(), echo=lambda s: None)


def test_a_training_run_logs_the_aux_term(tmp_path):
  cfg = tiny_config(tmp_path, "aux", model=dict(TINY_MODEL, memory_write="slots"),
                    train={"steps": 3, "memory_aux_weight": 0.1}, checkpoint={"enabled": False},
                    logging={"memory_diagnostics": False})
  assert train(cfg, sources=sources(), echo=lambda s: None).status == "completed"
  rows = metrics_lib.read_metrics(tmp_path / "aux", "train")
  assert [r["step"] for r in rows] == [1, 2, 3]
  for row in rows:
    assert -np.log(8) <= row["memory_aux"] <= 0
  config_lib.save_config(cfg, tmp_path / "config.yaml")
  assert config_lib.load_config(tmp_path / "config.yaml").train.memory_aux_weight == 0.1
