"""The keyed (content-addressed) memory write: its equations against an independent NumPy replay, the
lookup it exists for (a reassigned key is overwritten and read back), its gradients and config checks.
Causality, scan == loop and decode == forward: tests/test_memory_invariants.py."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from lm2_jax.model.memory import Memory
from model_utils import (first_memory_block_grads, init_memory_module, key_value_row,
                         lookup_gate_params, max_abs_diff, sigmoid, tiny_config)

KEYED = dict(memory_write="keyed", memory_init="zeros")
# Both refinements of the keyed write on (memory_match_center, memory_write_gate).
REFINED = dict(memory_match_center=True, memory_write_gate=True, memory_norm=True)


def reference_keyed_write(h, bank, valid, p, cfg):
  """The keyed write replayed token by token in NumPy, every slot key recomputed at every token.

  h [B, T, D], bank [B, M, D], valid [B, T]; p: the Memory parameters as NumPy arrays. With
  `memory_match_center` keys are compared minus the segment's mean token key and only written slots
  match; with `memory_write_gate` each rewrite is scaled by the token's sigmoid(h w + b).
  """
  u = h @ p["update"]["kernel"]
  g_in = sigmoid(u @ p["in_gate"]["kernel"] + p["in_gate"]["bias"])
  g_f = sigmoid(u @ p["forget_gate"]["kernel"] + p["forget_gate"]["bias"])
  content = g_in * np.tanh(u)
  strength = np.ones(valid.shape)
  if cfg.memory_write_gate:
    strength = sigmoid(h @ p["write_strength"]["kernel"] + p["write_strength"]["bias"])
  wk = p["key"]["kernel"].reshape(cfg.d_model, -1)

  def raw_key(x):
    if cfg.memory_norm:
      ms = np.mean(x * x, axis=-1, keepdims=True)
      x = np.where(ms > 0, x / np.sqrt(ms + cfg.norm_eps), x)
    return x @ wk

  bank = np.array(bank, np.float64)
  slots = np.full(valid.shape, -1)
  for b in range(h.shape[0]):
    center = 0.0
    if cfg.memory_match_center:
      center = raw_key(content[b, valid[b]]).mean(axis=0)

    def unit_key(x):
      k = raw_key(x) - center
      return k / np.sqrt(np.sum(k * k, axis=-1, keepdims=True) + 1e-4)

    for t in range(h.shape[1]):
      if not valid[b, t]:
        continue
      match = unit_key(bank[b]) @ unit_key(content[b, t])
      filled = np.sum(bank[b] ** 2, axis=-1) > 0
      if cfg.memory_match_center:
        match = np.where(filled, match, -1.0)
      if match.max() > cfg.memory_match_threshold:
        s = int(np.argmax(match))
      else:
        s = int(np.argmin(np.sum(bank[b] ** 2, axis=-1)))
      new_row = g_f[b, t] * bank[b, s] + content[b, t]
      bank[b, s] += strength[b, t] * (new_row - bank[b, s])
      slots[b, t] = s
  return bank, slots


@pytest.mark.parametrize("memory_norm,options", [
    (False, {}), (True, {}),
    (True, dict(memory_match_center=True)),
    (False, dict(memory_write_gate=True)),
    (True, dict(memory_match_center=True, memory_write_gate=True)),
])
def test_keyed_write_matches_the_numpy_replay(memory_norm, options):
  cfg = tiny_config(**KEYED, **options, memory_norm=memory_norm, init_std=0.3)
  b, t, m, d = 2, cfg.segment_length, cfg.num_slots, cfg.d_model
  rng = np.random.default_rng(0)
  h = rng.normal(size=(b, t, d)).astype(np.float32)
  h[:, 5] = h[:, 1]                        # the same token again: its key matches the slot it took
  h[0, 6] = h[0, 2] * 1.5                  # a scaled copy: same key direction
  bank = np.zeros((b, m, d), np.float32)
  bank[:, :3] = rng.normal(size=(b, 3, d))  # three full slots, five empty
  valid = np.ones((b, t), bool)
  valid[0, 0] = valid[1, 7] = valid[1, 2] = False
  mem, variables = init_memory_module(cfg, jnp.asarray(h), jnp.asarray(bank), jnp.asarray(valid))
  params = jax.tree.map(np.asarray, variables["params"])
  # Slot 4 of row 1 holds (a tenth of) what token 3 would store: a key from an earlier segment.
  bank[1, 4] = 0.1 * reference_keyed_write(h[1:, 3:4], np.zeros((1, m, d)), valid[1:, 3:4], params,
                                           cfg)[0][0, 0]
  (_, new_bank), state = mem.apply(variables, h, bank, bank, valid, mutable=["intermediates"])
  want, slots = reference_keyed_write(h, bank, valid, params, cfg)
  assert max_abs_diff(new_bank, want) <= 1e-5
  # Both branches ran: a match (a repeated token went to its first slot) and fresh slots.
  assert slots[0, 5] == slots[0, 1] and slots[1, 5] == slots[1, 1] and slots[1, 3] == 4
  assert len(set(slots[0][valid[0]].tolist())) >= 4
  routes = np.asarray(state["intermediates"]["write_routes"][0])[:, 0]  # [B, T, M]
  np.testing.assert_array_equal(routes.argmax(-1)[valid], slots[valid])
  assert np.all(routes[~valid] == 0)


def _lookup_memory(cfg):
  """Hand-set parameters: keys are dims 0..7, values dims 8..15 (lookup_gate_params for the rest)."""
  d, nm, hd = cfg.d_model, cfg.memory_heads, cfg.memory_head_dim
  key = np.zeros((d, nm, hd), np.float32)
  key[np.arange(8), 0, np.arange(8)] = 1.0
  params = {"query": {"kernel": 40.0 * key}, "key": {"kernel": key}, **lookup_gate_params(d)}
  return Memory(cfg), {"params": params}


def test_a_reassigned_key_is_overwritten_and_read_back():
  cfg = tiny_config(**KEYED)
  d, m, t = cfg.d_model, cfg.num_slots, cfg.segment_length
  mem, variables = _lookup_memory(cfg)
  # One segment: k1 -> v1, k2 -> v2, k1 -> v3 (a reassignment), then k3 -> v4 as padding.
  h = np.zeros((1, t, d), np.float32)
  for i, (k, v) in enumerate([(1, 1), (2, 2), (1, 3), (3, 4)]):
    h[0, i] = key_value_row(k, v, d)
  valid = np.zeros((1, t), bool)
  valid[0, :3] = True
  empty = np.zeros((1, m, d), np.float32)
  _, bank = mem.apply(variables, h, empty, empty, valid)
  bank = np.asarray(bank)[0]
  full = np.flatnonzero(np.abs(bank).sum(-1) > 0)
  assert len(full) == 2, "k1's reassignment took a slot of its own, or the padding was written"
  k1_slot = full[np.argmax(bank[full, 1])]
  np.testing.assert_allclose(bank[k1_slot], np.tanh(3 * key_value_row(1, 3, d)), atol=1e-6)
  # The next segment asks for k1: the read returns v3 (the latest value), not v1.
  query = np.zeros((1, t, d), np.float32)
  query[0, 0, 1] = 1.0
  read, _ = mem.apply(variables, query, bank[None], bank[None], np.ones((1, t), bool))
  values = np.asarray(read)[0, 0, 8:16]
  assert int(np.argmax(values)) == 3 and values[3] > 0.4 and abs(values[1]) < 1e-3


def test_keyed_write_passes_gradients_to_its_gates():
  cfg = tiny_config(**KEYED, **REFINED, memory_flow="per_block")
  grads = first_memory_block_grads(cfg)
  for name in ("update", "in_gate", "forget_gate", "key", "query", "value", "write_strength"):
    assert float(jnp.abs(grads[name]["kernel"]).max()) > 0, name


def test_keyed_needs_a_zero_bank():
  with pytest.raises(ValueError, match="memory_init: zeros"):
    tiny_config(memory_write="keyed")
  with pytest.raises(ValueError, match="memory_match_threshold"):
    tiny_config(**KEYED, memory_match_threshold=0.0)
  with pytest.raises(ValueError, match="options of memory_write: keyed"):
    tiny_config(memory_write="slots", memory_write_gate=True)


def test_empty_slots_do_not_amplify_gradients():
  # An all-zero row through memory_norm had the gradient 1/sqrt(eps) ~ 300, and the keyed write's
  # routing gradient reaches every empty slot (the small model's gradient norm was ~3,000x too large).
  rng = np.random.default_rng(0)
  grads = {}
  for norm in (False, True):
    cfg = tiny_config(**KEYED, memory_norm=norm)
    h = jnp.asarray(rng.normal(size=(1, cfg.segment_length, cfg.d_model)), jnp.float32)
    bank = np.zeros((1, cfg.num_slots, cfg.d_model), np.float32)
    bank[:, :3] = rng.normal(size=(1, 3, cfg.d_model))
    valid = jnp.ones(h.shape[:2], bool)
    mem, variables = init_memory_module(cfg, h, jnp.asarray(bank), valid)

    def read_sum(b):
      read, _ = mem.apply(variables, h, b, b, valid)
      return jnp.sum(read)

    grads[norm] = np.abs(np.asarray(jax.grad(read_sum)(jnp.asarray(bank))))[0, 3:].max()
  assert 0 < grads[True] < 10 * grads[False]
