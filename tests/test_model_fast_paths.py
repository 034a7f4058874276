"""The faster computations of the train step (issue 15) give what the plain ones give.

- Chunked causal self-attention (segments of >= CAUSAL_CHUNK_MIN_LENGTH tokens skip the keys after
  each query chunk) == causal attention in NumPy, values and gradients.
- Projections run as one 2D matmul between reshapes (`layers.dense_einsum`) == their einsum, values and
  gradients, and really lower to a 2D dot.
- A memory-less model runs its independent segments as one step over B*C rows instead of a scan;
  its logits and per-row loss sums are those of each segment run on its own.
- `unroll_segments`: the loss over straight-line segments == the loss over the scan, values and
  gradients, and really has no loop; with the `intermediates` collection it keeps the scan's layout.
- `memory_product_order`: slot-first == token-first, loss and gradients, for every write that shares
  the read's scores; `auto` takes the order with fewer FLOPs.
(The memory's equations in both orders against NumPy: tests/test_memory_reference.py.)
"""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from lm2_jax.model import LM2
from lm2_jax.model.config import ModelConfig
from lm2_jax.model.memory import Memory
from model_utils import F32_TOL, init_model, tiny_config


def _numpy_attention(q, k, v, valid):
  """Causal grouped-query attention in NumPy float64, padding keys masked."""
  t, h = q.shape[1], q.shape[3]
  rep = q.shape[2] // k.shape[2]
  k, v = np.repeat(k, rep, axis=2), np.repeat(v, rep, axis=2)
  scores = np.einsum("btnh,bsnh->bnts", q, k) / np.sqrt(h)
  visible = np.tril(np.ones((t, t), bool))[None] & valid[:, None, :]
  scores = np.where(visible[:, None], scores, -np.inf)
  probs = np.exp(scores - scores.max(-1, keepdims=True))
  probs /= probs.sum(-1, keepdims=True)
  return np.einsum("bnts,bsnh->btnh", probs, v)


def test_chunked_causal_attention_matches_reference_values_and_gradients():
  from lm2_jax.model import layers

  t = 2 * layers.CAUSAL_CHUNK_MIN_LENGTH
  rng = np.random.default_rng(0)
  q = rng.normal(size=(2, t, 4, 8)).astype(np.float32)
  k, v = (rng.normal(size=(2, t, 2, 8)).astype(np.float32) for _ in range(2))
  valid = np.ones((2, t), bool)
  valid[1, 5:40] = False                                  # padding inside a row
  pos = jnp.arange(t)
  out = layers.causal_self_attend(q, k, v, pos, valid)
  ref = _numpy_attention(q.astype(np.float64), k.astype(np.float64), v.astype(np.float64), valid)
  np.testing.assert_allclose(np.asarray(out)[valid], ref[valid], atol=2e-5)

  def grads(fn):
    return jax.grad(lambda q, k, v: jnp.sum(jnp.sin(fn(q, k, v)) * valid[:, :, None, None]),
                    (0, 1, 2))(q, k, v)
  chunked = grads(lambda q, k, v: layers.causal_self_attend(q, k, v, pos, valid))
  whole = grads(lambda q, k, v: layers.attend(q, k, v, pos, pos, valid))
  for a, b in zip(chunked, whole):
    assert float(jnp.max(jnp.abs(b))) > 1e-3
    np.testing.assert_allclose(np.asarray(a), np.asarray(b), atol=2e-5)


def test_memoryless_segments_folded_into_rows_equal_each_segment_alone():
  cfg = tiny_config(use_memory=False)
  t = cfg.segment_length
  model, variables, tokens = init_model(cfg, batch=3, segments=4)
  valid = jnp.ones(tokens.shape, bool).at[1, t + 2:2 * t].set(False)
  targets = jnp.roll(tokens, -1, axis=1)
  mask = jax.random.uniform(jax.random.key(5), tokens.shape)
  logits, _ = model.apply(variables, tokens, valid=valid)
  stats, _ = model.apply(variables, tokens, targets, mask, valid=valid, method="loss")
  nll = np.zeros(3)
  for c in range(4):
    part = slice(c * t, (c + 1) * t)
    alone, _ = model.apply(variables, tokens[:, part], valid=valid[:, part])
    np.testing.assert_allclose(np.asarray(logits[:, part]), np.asarray(alone), atol=F32_TOL)
    log_probs = jax.nn.log_softmax(alone, axis=-1)
    picked = jnp.take_along_axis(log_probs, targets[:, part, None], axis=-1)[..., 0]
    nll -= np.asarray(jnp.sum(picked * mask[:, part], axis=1))
  np.testing.assert_allclose(np.asarray(stats.nll_sum), nll, rtol=1e-5)
  np.testing.assert_allclose(np.asarray(stats.weight_sum), np.asarray(mask.sum(1)), rtol=1e-6)


# Every projection equation of the model (layers.py, memory.py, lm2.py) and one that is not a projection.
PROJECTIONS = [("BTD,DNH->BTNH", (2, 3, 8), (8, 2, 4)), ("BTNH,NHD->BTD", (2, 3, 2, 4), (2, 4, 8)),
               ("BTD,DF->BTF", (2, 3, 8), (8, 6)), ("BMD,DE->BME", (2, 5, 8), (8, 8)),
               ("BTD,DV->BTV", (2, 3, 8), (8, 11))]


def test_dense_einsum_equals_einsum_values_and_gradients():
  from lm2_jax.model.layers import dense_einsum

  rng = np.random.default_rng(0)
  for eqn, xs, ks in PROJECTIONS + [("BTD,BSD->BTS", (2, 3, 8), (2, 4, 8))]:
    x, k = rng.normal(size=xs).astype(np.float32), rng.normal(size=ks).astype(np.float32)
    np.testing.assert_allclose(dense_einsum(eqn, x, k), np.einsum(eqn, x, k), rtol=1e-5, atol=1e-5)
    loss = lambda f: (lambda x, k: jnp.sum(jnp.sin(f(eqn, x, k))))
    for a, b in zip(jax.grad(loss(dense_einsum), (0, 1))(x, k), jax.grad(loss(jnp.einsum), (0, 1))(x, k)):
      np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-5)


def test_dense_einsum_projections_lower_to_2d_matmuls():
  from lm2_jax.model.layers import dense_einsum

  for eqn, xs, ks in PROJECTIONS:
    jaxpr = jax.make_jaxpr(lambda x, k: dense_einsum(eqn, x, k))(jnp.zeros(xs), jnp.zeros(ks))
    dots = [e for e in jaxpr.eqns if e.primitive.name == "dot_general"]
    assert len(dots) == 1 and [v.aval.ndim for v in dots[0].invars] == [2, 2], (eqn, jaxpr)


def _loss_and_grads(cfg, variables, tokens):
  """(per-row nll sums, final memory, parameter gradients of the summed nll) of `LM2(cfg).loss`."""
  targets = jnp.roll(tokens, -1, axis=1)
  mask = jax.random.uniform(jax.random.key(5), tokens.shape)
  valid = jnp.ones(tokens.shape, bool).at[1, 3:6].set(False)     # padding inside row 1

  def loss(params):
    stats, memory = LM2(cfg).apply({"params": params}, tokens, targets, mask, valid=valid, method="loss")
    return jnp.sum(stats.nll_sum), (stats.nll_sum, memory)

  (_, (nll, memory)), grads = jax.value_and_grad(loss, has_aux=True)(variables["params"])
  return nll, memory, grads


def _assert_same_loss_and_grads(cfg_a, cfg_b, segments):
  """Two configs of one function: equal loss, final memory and gradients. Returns (tokens, a's nll)."""
  _, variables, tokens = init_model(cfg_a, segments=segments)
  nll_a, mem_a, grads_a = _loss_and_grads(cfg_a, variables, tokens)
  nll_b, mem_b, grads_b = _loss_and_grads(cfg_b, variables, tokens)
  np.testing.assert_allclose(nll_b, nll_a, rtol=1e-6)
  np.testing.assert_allclose(mem_b, mem_a, atol=F32_TOL)
  for x, y in zip(jax.tree.leaves(grads_a), jax.tree.leaves(grads_b)):
    np.testing.assert_allclose(np.asarray(y), np.asarray(x), atol=F32_TOL, rtol=F32_TOL)
  return tokens, nll_a


@pytest.mark.parametrize("remat", ["none", "dots"])
@pytest.mark.parametrize("flow", ["chained", "per_block"])
def test_unrolled_segments_equal_the_segment_scan(flow, remat):
  scanned = tiny_config(memory_flow=flow, remat=remat)
  tokens, nll_s = _assert_same_loss_and_grads(scanned, scanned.replace(unroll_segments=4), segments=4)
  # Not vacuous: the memory carries across the segments, so dropping it moves the loss.
  no_memory = scanned.replace(use_memory=False)
  nll_n, _, _ = _loss_and_grads(no_memory, init_model(no_memory, segments=4)[1], tokens)
  assert np.abs(np.asarray(nll_n) - np.asarray(nll_s)).max() > 1e-3


def _loops(cfg, tokens, variables, **kw):
  """How many loops (scan / while) the traced loss has."""
  targets, mask = jnp.roll(tokens, -1, axis=1), jnp.ones(tokens.shape)
  jaxpr = jax.make_jaxpr(lambda p: LM2(cfg).apply({"params": p}, tokens, targets, mask, method="loss",
                                                   **kw))(variables["params"])
  return str(jaxpr).count("scan[") + str(jaxpr).count("while[")


def test_unroll_segments_is_a_ceiling_and_intermediates_keep_the_scan():
  cfg = tiny_config(memory_write="slots")        # no token scan inside a segment
  _, variables, tokens = init_model(cfg, segments=4)
  assert _loops(cfg, tokens, variables) == 1
  assert _loops(cfg.replace(unroll_segments=4), tokens, variables) == 0
  assert _loops(cfg.replace(unroll_segments=3), tokens, variables) == 1   # more segments than that
  # Diagnostics read the sown arrays as [C, B, ...]: the scan's layout, whatever `unroll_segments`.
  targets, mask = jnp.roll(tokens, -1, axis=1), jnp.ones(tokens.shape)
  _, state = LM2(cfg.replace(unroll_segments=4)).apply(
      variables, tokens, targets, mask, method="loss", mutable=["intermediates"])
  routes = state["intermediates"]["block_0"]["memory"]["write_routes"][0]
  assert routes.shape[:2] == (4, tokens.shape[0])


def test_negative_unroll_segments_is_refused():
  with pytest.raises(ValueError, match="unroll_segments must be >= 0"):
    tiny_config(unroll_segments=-1)


@pytest.mark.parametrize("write", ["tokens", "slots", "keyed"])
def test_slot_first_products_equal_token_first(write):
  keyed = dict(memory_init="zeros") if write == "keyed" else {}
  token_first = tiny_config(memory_write=write, memory_product_order="token_first", **keyed)
  _assert_same_loss_and_grads(token_first, token_first.replace(memory_product_order="slot_first"), 3)


def test_slot_first_does_fewer_flops_where_slots_are_few():
  """XLA's FLOP count of one memory read + write (D 64, M 4, T 32): slot-first < token-first / 2."""
  flops = {}
  for order in ("token_first", "slot_first"):
    cfg = tiny_config(d_model=64, num_slots=4, memory_heads=1, segment_length=32,
                      memory_product_order=order)
    h, bank = jnp.ones((2, 32, 64)), jnp.ones((2, 4, 64))
    valid = jnp.ones((2, 32), bool)
    variables = Memory(cfg).init(jax.random.key(0), h, bank, bank, valid)
    apply = jax.jit(lambda v, h, b: Memory(cfg).apply(v, h, b, b, valid))
    flops[order] = apply.lower(variables, h, bank).compile().cost_analysis()["flops"]
  assert flops["slot_first"] < 0.5 * flops["token_first"], flops


@pytest.mark.parametrize("dims, tokens, slot_first", [
    (dict(d_model=192, num_slots=16, memory_heads=1), 64, True),     # small.yaml's segment
    (dict(d_model=192, num_slots=16, memory_heads=1), 1, False),     # decoding one token
    (dict(d_model=2048, num_slots=2048, memory_heads=32), 2048, False),  # lm2-1.7b.yaml
    (dict(d_model=32, num_slots=8, memory_heads=2), 8, False),       # tiny.yaml
])
def test_auto_order_takes_the_one_with_fewer_flops(dims, tokens, slot_first):
  cfg = ModelConfig(**dims)
  assert Memory(cfg).slot_first(tokens) is slot_first
  token_cost = tokens * cfg.d_model ** 2 + tokens * cfg.num_slots * cfg.d_model
  slot_cost = cfg.num_slots * cfg.d_model ** 2 + tokens * cfg.memory_heads * cfg.num_slots * cfg.d_model
  assert (slot_cost < token_cost) is slot_first
  assert Memory(cfg.replace(memory_product_order="slot_first")).slot_first(tokens)
  assert not Memory(cfg.replace(memory_product_order="token_first")).slot_first(tokens)
