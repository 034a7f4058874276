"""Properties of the memory module: top-k read, bank normalisation, initialisations, diagnostics."""

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from lm2_jax.model import LM2, init_memory
from lm2_jax.model.memory import Memory
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


def _memory_apply(cfg, params, h, read_bank, prev_bank, valid):
  """(read, new bank, sown intermediates) of block 0's Memory module on the given arrays."""
  (read, bank), state = Memory(cfg).apply({"params": params}, h, read_bank, prev_bank, valid,
                                          mutable=["intermediates"])
  return read, bank, state["intermediates"]


def _memory_inputs(cfg, seed=3):
  k = jax.random.split(jax.random.key(seed), 3)
  h = jax.random.normal(k[0], (2, cfg.segment_length, cfg.d_model))
  read_bank = jax.random.normal(k[1], (2, cfg.num_slots, cfg.d_model))
  prev_bank = jax.random.normal(k[2], (2, cfg.num_slots, cfg.d_model))
  valid = jnp.ones((2, cfg.segment_length), bool).at[1, :3].set(False)  # row 1: padding first
  return h, read_bank, prev_bank, valid


def test_forget_gate_mean_is_the_gate_the_bank_update_applies():
  """`tokens` write: mem' = g_in tanh(u) + g_f mem with gates of u alone, so the bank's response to its
  previous content is g_f itself; the reported forget_gate_mean must be that response's mean."""
  cfg = tiny_config(forget_bias_init=3.0)
  _, variables, _ = init_model(cfg, segments=1)
  params = nn.unbox(variables["params"])["block_0"]["memory"]
  h, read_bank, prev, valid = _memory_inputs(cfg)
  _, new, inter = _memory_apply(cfg, params, h, read_bank, prev, valid)
  delta = jax.random.normal(jax.random.key(9), prev.shape)
  _, moved, _ = _memory_apply(cfg, params, h, read_bank, prev + delta, valid)
  g_f = (moved - new) / delta                                 # [B, M, D], the applied forget gate
  assert float(jnp.std(g_f)) > 1e-4                           # a gate per slot and column, not a constant
  np.testing.assert_allclose(inter["forget_gate_mean"][0], jnp.mean(g_f, axis=(1, 2)), rtol=1e-3)
  # Small random weights leave the gate near sigmoid(bias).
  np.testing.assert_allclose(g_f, 1 / (1 + np.exp(-3.0)), atol=0.03)


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


def test_slot_write_routes_are_what_moves_the_bank():
  """`slots` write with the gates off: mem'_m = mem_m + (1 - exp(-mass_m)) tanh(u_m), u_m the routed
  tokens' mean of h Wu. The reported routes, fed to that equation, give the bank the module wrote; they
  are zero on padding (here before the real tokens) and sum to 1 over the slots on real tokens."""
  cfg = tiny_config(memory_write="slots", input_gate=False, forget_gate=False,
                    memory_score_scale=4.0)
  _, variables, _ = init_model(cfg, segments=1)
  params = nn.unbox(variables["params"])["block_0"]["memory"]
  params = dict(params, update={"kernel": 10.0 * params["update"]["kernel"]})  # tanh beyond its linear range
  h, read_bank, prev, valid = _memory_inputs(cfg)
  _, new, inter = _memory_apply(cfg, params, h, read_bank, prev, valid)
  routes = np.asarray(inter["write_routes"][0], np.float64)  # [B, Nm, T, M]
  np.testing.assert_allclose(routes.sum(-1), np.broadcast_to(np.asarray(valid)[:, None], routes.shape[:3]),
                             atol=1e-6)
  nm, hd = cfg.memory_heads, cfg.memory_head_dim
  hu = (np.asarray(h, np.float64) @ np.asarray(params["update"]["kernel"], np.float64)).reshape(
      2, cfg.segment_length, nm, hd)
  mass = routes.sum(2)                                       # [B, Nm, M]
  u = np.einsum("bntm,btnh->bmnh", routes, hu) / mass.swapaxes(1, 2)[..., None]
  step = (1 - np.exp(-mass)).swapaxes(1, 2)[..., None] * np.tanh(u)
  expected = np.asarray(prev, np.float64) + step.reshape(prev.shape)
  np.testing.assert_allclose(new, expected, atol=2e-5)
  assert np.abs(step).max() > 0.1
