"""The faster computations of the train step (issue 15) give what the plain ones give.

- Chunked causal self-attention (segments of >= CAUSAL_CHUNK_MIN_LENGTH tokens skip the keys after
  each query chunk) == causal attention in NumPy, values and gradients.
- Projections run as one 2D matmul between reshapes (`layers.dense_einsum`) == their einsum, values and
  gradients, and really lower to a 2D dot.
- A memory-less model runs its independent segments as one step over B*C rows instead of a scan;
  its logits and per-row loss sums are those of each segment run on its own.
"""

import jax
import jax.numpy as jnp
import numpy as np

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
