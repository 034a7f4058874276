"""The delta-rule memory (`memory_write: delta`, lm2_jax/model/delta.py): its equations against an
independent NumPy replay, the lookup it exists for (a reassigned key is overwritten and read back), its
gradients and config checks. Causality, scan == loop and decode == forward: tests/test_memory_invariants.py."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from lm2_jax.model.memory import Memory
from model_utils import (first_memory_block_grads, init_memory_module, key_value_row,
                         lookup_gate_params, max_abs_diff, sigmoid, tiny_config)

DELTA = dict(memory_write="delta", memory_init="zeros", memory_heads=1, memory_norm=False)


def _unit(x):
  return x / np.sqrt(np.sum(x * x, axis=-1, keepdims=True) + 1e-6)


def reference_delta(h, bank, valid, p):
  """Read (from the bank at the segment's start) and write, replayed in NumPy one token at a time.

  h [B, T, D], bank [B, M, D], valid [B, T]; p: the Memory parameters as NumPy arrays.
  Returns (read [B, T, D], new bank [B, M, D]).
  """
  q = _unit(h @ p["read_addr"]["kernel"])
  e = np.einsum("btm,bmd->btd", q, bank) @ p["value"]["kernel"]
  read = sigmoid(e @ p["out_gate"]["kernel"]) * e
  u = h @ p["update"]["kernel"]
  content = sigmoid(u @ p["in_gate"]["kernel"] + p["in_gate"]["bias"]) * np.tanh(u)
  forget = sigmoid(u @ p["forget_gate"]["kernel"] + p["forget_gate"]["bias"])
  a = _unit(h @ p["write_addr"]["kernel"])
  bank = np.array(bank, np.float64)
  for b in range(h.shape[0]):
    for t in range(h.shape[1]):
      if valid[b, t]:
        old = a[b, t] @ bank[b]
        bank[b] += np.outer(a[b, t], forget[b, t] * old + content[b, t] - old)
  return read, bank


def test_delta_read_and_write_match_the_numpy_replay():
  cfg = tiny_config(**DELTA, init_std=0.3)
  b, t, m, d = 2, cfg.segment_length, cfg.num_slots, cfg.d_model
  rng = np.random.default_rng(0)
  h = rng.normal(size=(b, t, d)).astype(np.float32)
  bank = rng.normal(size=(b, m, d)).astype(np.float32)
  valid = np.ones((b, t), bool)
  valid[0, 0] = valid[1, 3] = valid[1, -1] = False
  mem, variables = init_memory_module(cfg, jnp.asarray(h), jnp.asarray(bank), jnp.asarray(valid))
  params = jax.tree.map(np.asarray, variables["params"])
  read, new_bank = mem.apply(variables, h, bank, bank, valid)
  want_read, want_bank = reference_delta(h, bank, valid, params)
  assert max_abs_diff(read, want_read) <= 1e-5
  assert max_abs_diff(new_bank, want_bank) <= 1e-5
  assert max_abs_diff(new_bank, bank) > 0.1, "nothing was written"


def _lookup_memory(cfg):
  """Hand-set parameters: a token's key is dims 0..7 (its address), its value dims 8..15
  (lookup_gate_params for the rest, so a write replaces what is stored at its address)."""
  d, m = cfg.d_model, cfg.num_slots
  addr = np.zeros((d, m), np.float32)
  addr[np.arange(m), np.arange(m)] = 1.0
  params = {"read_addr": {"kernel": addr}, "write_addr": {"kernel": addr}, **lookup_gate_params(d)}
  return Memory(cfg), {"params": params}


def test_a_reassigned_key_is_overwritten_and_read_back():
  cfg = tiny_config(**DELTA)
  d, m, t = cfg.d_model, cfg.num_slots, cfg.segment_length
  assert m == 8
  mem, variables = _lookup_memory(cfg)
  h = np.zeros((1, t, d), np.float32)
  for i, (k, v) in enumerate([(1, 1), (2, 2), (1, 3), (3, 4)]):   # k1 reassigned; (k3, v4) is padding
    h[0, i] = key_value_row(k, v, d)
  valid = np.zeros((1, t), bool)
  valid[0, :3] = True
  empty = np.zeros((1, m, d), np.float32)
  _, bank = mem.apply(variables, h, empty, empty, valid)
  bank = np.asarray(bank)[0]
  np.testing.assert_allclose(bank[1, 8:16], np.tanh(3 * np.eye(8)[3]), atol=1e-5)   # k1 -> v3 only
  np.testing.assert_allclose(bank[2, 8:16], np.tanh(3 * np.eye(8)[2]), atol=1e-5)   # k2 untouched
  assert np.all(bank[3] == 0), "the padding token wrote"
  query = np.zeros((1, t, d), np.float32)
  query[0, 0, 1] = 1.0
  query[0, 1, 2] = 1.0
  read, _ = mem.apply(variables, query, bank[None], bank[None], np.ones((1, t), bool))
  values = np.asarray(read)[0, :2, 8:16]
  assert list(values.argmax(-1)) == [3, 2] and values[0, 3] > 0.4 and abs(values[0, 1]) < 1e-4


def test_delta_write_passes_gradients_to_its_parameters():
  cfg = tiny_config(**DELTA, memory_flow="per_block")
  grads = first_memory_block_grads(cfg)
  assert set(grads) == {"read_addr", "write_addr", "value", "update", "out_gate", "in_gate",
                        "forget_gate"}
  for name, g in grads.items():
    assert float(jnp.abs(g["kernel"]).max()) > 0, name


def test_delta_refuses_options_of_the_attention_read():
  with pytest.raises(ValueError, match="memory_norm"):
    tiny_config(**{**DELTA, "memory_norm": True})
  with pytest.raises(ValueError, match="memory_init"):
    tiny_config(**{**DELTA, "memory_init": "identity"})
