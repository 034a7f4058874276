"""Properties of the memory module: top-k read, bank normalisation, initialisations, diagnostics."""

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from lm2_jax.model import LM2, init_memory
from model_utils import init_model, max_abs_diff, tiny_config


def _read_attention(model, variables, tokens, **kw):
  (_, _), inter = model.apply(variables, tokens, mutable=["intermediates"], **kw)
  return inter["intermediates"]["block_0"]["memory"]["read_attention"][0]  # [C, B, Nm, T, M]


def test_topk_read_uses_exactly_k_slots():
  cfg = tiny_config(read_topk=3)
  model, variables, tokens = init_model(cfg, segments=2)
  probs = np.asarray(_read_attention(model, variables, tokens))
  assert probs.shape[-1] == cfg.num_slots
  np.testing.assert_allclose(probs.sum(-1), 1.0, rtol=1e-5)
  # Random scores have no ties: exactly k slots get weight.
  assert np.all((probs > 0).sum(-1) == 3)
  dense = np.asarray(_read_attention(LM2(cfg.replace(read_topk=None)), variables, tokens))
  assert np.all((dense > 0).sum(-1) == cfg.num_slots)


def test_memory_norm_makes_the_read_scale_free():
  cfg = tiny_config(memory_norm=True)
  model, variables, tokens = init_model(cfg, segments=1)
  mem = jax.random.normal(jax.random.key(2), init_memory(cfg, 2).shape)
  a, _ = model.apply(variables, tokens, memory=mem)
  b, _ = model.apply(variables, tokens, memory=7.0 * mem)
  assert max_abs_diff(a, b) <= 1e-4
  plain = LM2(cfg.replace(memory_norm=False))
  c, _ = plain.apply(variables, tokens, memory=mem)
  d, _ = plain.apply(variables, tokens, memory=7.0 * mem)
  assert max_abs_diff(c, d) > 1e-3


def test_initialisations():
  ident = init_memory(tiny_config(), 3)
  assert ident.shape == (3, 8, 32) and ident.dtype == jnp.float32
  np.testing.assert_array_equal(ident[1], np.eye(8, 32))
  assert float(jnp.abs(init_memory(tiny_config(memory_init="zeros"), 2)).max()) == 0.0
  assert init_memory(tiny_config(use_memory=False), 2) is None
  per_block = init_memory(tiny_config(memory_flow="per_block"), 2)
  assert per_block.shape == (2, 2, 8, 32)


def test_learned_init_is_trained_and_used():
  cfg = tiny_config(memory_init="learned")
  model, variables, tokens = init_model(cfg, segments=2)
  params = nn.unbox(variables["params"])
  learned = params["memory_init"]
  np.testing.assert_allclose(init_memory(cfg, 2, params=params)[0], learned)
  fresh = model.apply(variables, 2, method=LM2.initial_memory)
  np.testing.assert_allclose(fresh[1], learned)

  def loss(p):
    stats, _ = model.apply({"params": p}, tokens, tokens, jnp.ones(tokens.shape), method=LM2.loss)
    return stats.nll_sum.sum()

  grad = nn.unbox(jax.grad(loss)(variables["params"]))["memory_init"]
  assert float(jnp.abs(grad).max()) > 0


def test_forget_gate_statistics_are_reported():
  cfg = tiny_config(forget_bias_init=3.0)
  model, variables, tokens = init_model(cfg, segments=2)
  (_, _), inter = model.apply(variables, tokens, mutable=["intermediates"])
  g_f = np.asarray(inter["intermediates"]["block_0"]["memory"]["forget_gate_mean"][0])  # [C, B]
  assert g_f.shape == (2, 2)
  # Small random weights leave the gate near sigmoid(bias).
  np.testing.assert_allclose(g_f, 1 / (1 + np.exp(-3.0)), atol=0.02)


def test_address_keys_make_read_attention_independent_of_content():
  cfg = tiny_config(memory_keys="address")
  model, variables, tokens = init_model(cfg, segments=1)
  shape = init_memory(cfg, 2).shape
  a, b = (jax.random.normal(jax.random.key(k), shape) for k in (3, 4))
  attn_a = _read_attention(model, variables, tokens, memory=a)
  attn_b = _read_attention(model, variables, tokens, memory=b)
  assert max_abs_diff(attn_a, attn_b) == 0.0
  # ... but what is read still depends on the content; and content keys make the attention move too.
  assert max_abs_diff(model.apply(variables, tokens, memory=a)[0],
                      model.apply(variables, tokens, memory=b)[0]) > 1e-4
  content = LM2(cfg.replace(memory_keys="content"))
  assert max_abs_diff(_read_attention(content, variables, tokens, memory=a),
                      _read_attention(content, variables, tokens, memory=b)) > 1e-4


def test_slot_routed_write_reports_routes_of_real_tokens_only():
  cfg = tiny_config(write_softmax="slots")
  model, variables, tokens = init_model(cfg, segments=2)
  valid = np.ones(tokens.shape, bool)
  valid[0, cfg.segment_length - 3:] = False    # row 0: padding from 3 tokens before the end of segment 0
  (_, _), inter = model.apply(variables, tokens, valid=jnp.asarray(valid), mutable=["intermediates"])
  mem = inter["intermediates"]["block_0"]["memory"]
  routes = np.asarray(mem["write_routes"][0])                # [C, B, Nm, T, M]
  per_token = routes.sum(-1)                                 # [C, B, Nm, T]: 1 per real token, 0 on padding
  expect = valid.reshape(2, 2, cfg.segment_length)[..., None, :].swapaxes(0, 1)
  np.testing.assert_allclose(per_token, np.broadcast_to(expect, per_token.shape), atol=1e-5)
