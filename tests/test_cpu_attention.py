"""The fused CPU attention kernel (lm2_jax/kernels): equal to XLA's attention in values and gradients,
used by the model exactly where it applies, and built once per machine."""

import dataclasses
import os

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from lm2_jax.kernels import build, cpu_attention
from lm2_jax.model import LM2, ModelConfig, layers


def _operands(b, t, s, n, k, h, seed=0):
  keys = jax.random.split(jax.random.PRNGKey(seed), 4)
  q = jax.random.normal(keys[0], (b, t, n, h))
  kk = jax.random.normal(keys[1], (b, s, k, h))
  v = jax.random.normal(keys[2], (b, s, k, h))
  r = jax.random.normal(keys[3], (b, t, n, h))
  return q, kk, v, r


def _reference(q, k, v, valid):
  t, s = q.shape[1], k.shape[1]
  return layers.attend(q, k, v, jnp.arange(s - t, s), jnp.arange(s), valid)


def _seen(valid, t):
  """[B, T] whether query t sees at least one key (s <= t + S - T and valid)."""
  s = valid.shape[1]
  causal = jnp.arange(s)[None, :] <= jnp.arange(s - t, s)[:, None]
  return jnp.any(causal[None] & valid[:, None, :], axis=-1)


def _values_and_grads(fn, q, k, v, r, rows):
  def loss(q, k, v):
    return jnp.sum(jnp.where(rows[:, :, None, None], fn(q, k, v) * r, 0.0))
  return fn(q, k, v), jax.grad(loss, argnums=(0, 1, 2))(q, k, v)


@pytest.mark.parametrize("b,t,s,n,k,h,pad", [
    (2, 256, 256, 4, 4, 32, 0),    # four full query blocks, multi-head
    (2, 100, 100, 6, 2, 32, 7),    # grouped heads, a partial block, padded keys
    (1, 40, 72, 4, 1, 48, 3),      # more keys than queries (a cache prefix), one KV head, H = 3 vectors
    (3, 17, 17, 2, 2, 16, 0),      # a single partial block
])
def test_kernel_equals_xla_attention(b, t, s, n, k, h, pad):
  q, kk, v, r = _operands(b, t, s, n, k, h)
  valid = jnp.ones((b, s), bool)
  if pad:
    valid = valid.at[:, s - pad:].set(False).at[0, 3].set(False)
  rows = _seen(valid, t)
  ref, ref_grads = _values_and_grads(lambda q, k, v: _reference(q, k, v, valid), q, kk, v, r, rows)
  out, grads = _values_and_grads(lambda q, k, v: cpu_attention.causal_attention(q, k, v, valid),
                                 q, kk, v, r, rows)
  mask = rows[:, :, None, None]
  np.testing.assert_allclose(np.where(mask, out, 0), np.where(mask, ref, 0), atol=2e-6, rtol=1e-5)
  for name, got, want in zip("qkv", grads, ref_grads):
    np.testing.assert_allclose(got, want, atol=1e-5, rtol=1e-4, err_msg=f"d{name}")


def test_query_without_visible_keys_gets_zeros_and_no_gradient():
  q, k, v, r = _operands(2, 80, 80, 2, 2, 16, seed=1)
  valid = jnp.ones((2, 80), bool).at[0, :5].set(False)  # row 0's first five queries see nothing
  out, (dq, dk, dv) = _values_and_grads(lambda q, k, v: cpu_attention.causal_attention(q, k, v, valid),
                                        q, k, v, r, jnp.ones((2, 80), bool))
  assert np.all(np.asarray(out[0, :5]) == 0.0)
  assert np.all(np.asarray(dq[0, :5]) == 0.0)
  assert np.all(np.abs(np.asarray(out[0, 5:])) > 0.0)
  assert all(np.isfinite(np.asarray(g)).all() for g in (dq, dk, dv))
  # Padding keys receive no gradient; visible ones do.
  assert np.all(np.asarray(dk[0, :5]) == 0.0) and np.all(np.asarray(dv[0, :5]) == 0.0)
  assert np.all(np.abs(np.asarray(dv[0, 5:])).sum(axis=-1) > 0.0)


def test_saved_log_sum_exp_is_that_of_the_visible_scores():
  q, k, v, _ = _operands(2, 70, 70, 4, 2, 16, seed=2)
  valid = jnp.ones((2, 70), bool).at[0, :3].set(False).at[1, 40:].set(False)
  _, lse = cpu_attention._forward(q, k, v, valid)  # pylint: disable=protected-access
  scores = jnp.einsum("BTKGH,BSKH->BKGTS", q.reshape(2, 70, 2, 2, 16), k) / 4.0
  visible = (jnp.arange(70)[None, :] <= jnp.arange(70)[:, None])[None] & valid[:, None, :]
  want = jax.nn.logsumexp(jnp.where(visible[:, None, None], scores, -jnp.inf), axis=-1)
  want = want.reshape(2, 4, 70)  # [B, N, T], N = K * G
  np.testing.assert_allclose(lse[0, :, 3:], want[0, :, 3:], rtol=1e-6, atol=1e-6)
  np.testing.assert_allclose(lse[1], want[1], rtol=1e-6, atol=1e-6)
  assert np.all(np.asarray(lse[0, :, :3]) == np.inf)  # no visible key


def test_kernel_rejects_a_head_dim_off_the_vector_width():
  q, k, v, _ = _operands(1, 8, 8, 2, 2, 8)
  with pytest.raises(Exception, match="multiple of 16"):
    jax.block_until_ready(cpu_attention.causal_attention(q, k, v, jnp.ones((1, 8), bool)))


def _tiny(**overrides):
  base = dict(vocab_size=64, d_model=64, num_layers=2, num_heads=4, num_kv_heads=2, mlp_dim=96,
              segment_length=32, num_slots=4)
  return ModelConfig(**{**base, **overrides})


@pytest.mark.parametrize("overrides,segments", [
    ({}, 3),                                                     # LM2 with memory, 3 segments
    ({"use_memory": False, "attention": "full", "segment_length": 160}, 1),  # full attention, 3 blocks
])
def test_model_runs_the_kernel_and_matches_xla(overrides, segments):
  cfg = _tiny(**overrides)
  seq = cfg.segment_length * segments
  rng = np.random.default_rng(0)
  tokens = jnp.asarray(rng.integers(0, cfg.vocab_size, (2, seq)), jnp.int32)
  valid = jnp.ones((2, seq), bool).at[1, seq - 9:].set(False)
  mask = valid.astype(jnp.float32)
  params = LM2(cfg).init(jax.random.PRNGKey(0), tokens[:, :cfg.segment_length])["params"]

  def loss_fn(c):
    def loss(p):
      stats, _ = LM2(c).apply({"params": p}, tokens, jnp.roll(tokens, -1, 1), mask, valid=valid,
                              method=LM2.loss)
      return jnp.sum(stats[0]) / jnp.sum(mask)
    return jax.jit(jax.value_and_grad(loss))

  xla_cfg = dataclasses.replace(cfg, attention_kernel="xla")
  hlo = {c.attention_kernel: loss_fn(c).lower(params).as_text() for c in (cfg, xla_cfg)}
  assert "lm2_causal_attention_fwd" in hlo["auto"] and "lm2_causal_attention_bwd" in hlo["auto"]
  assert "lm2_causal_attention" not in hlo["xla"]
  (got, got_g), (want, want_g) = loss_fn(cfg)(params), loss_fn(xla_cfg)(params)
  np.testing.assert_allclose(got, want, rtol=1e-6)
  for g, w in zip(jax.tree.leaves(got_g), jax.tree.leaves(want_g)):
    np.testing.assert_allclose(g, w, atol=2e-6, rtol=1e-4)


def test_kernel_applies_only_to_float32_vector_heads_on_one_device():
  q = jnp.zeros((1, 8, 2, 32))
  assert cpu_attention.applies(q, q)
  assert not cpu_attention.applies(q.astype(jnp.bfloat16), q)
  assert not cpu_attention.applies(q, q.astype(jnp.bfloat16))
  assert not cpu_attention.applies(jnp.zeros((1, 8, 2, 24)), jnp.zeros((1, 8, 2, 24)))
  mesh = jax.make_mesh((jax.device_count(),), ("data",))
  with jax.set_mesh(mesh):
    assert cpu_attention.applies(q, q) == (jax.device_count() == 1)


def test_build_is_cached_and_explains_a_missing_compiler(tmp_path, monkeypatch):
  monkeypatch.setenv(build.CACHE_ENV, str(tmp_path))
  path = build.library(cpu_attention.SOURCE)
  assert os.path.dirname(path) == str(tmp_path) and os.path.getsize(path) > 0
  stamp = os.stat(path).st_mtime_ns
  assert build.library(cpu_attention.SOURCE) == path and os.stat(path).st_mtime_ns == stamp
  assert [f for f in os.listdir(tmp_path)] == [os.path.basename(path)]  # no temporary files left
  monkeypatch.setenv("CXX", "no-such-compiler-lm2")
  with pytest.raises(build.BuildError, match="no-such-compiler-lm2"):
    build.library(cpu_attention.SOURCE)
  failing = tmp_path / "bin" / "failing-cxx"
  failing.parent.mkdir()
  failing.write_text("#!/bin/sh\necho 'cc1plus: fatal error' >&2\nexit 1\n")
  failing.chmod(0o755)
  monkeypatch.setenv("CXX", str(failing))
  with pytest.raises(build.BuildError, match="(?s)failing-cxx.*fatal error"):
    build.library(cpu_attention.SOURCE)
  assert [f for f in os.listdir(tmp_path) if f != "bin"] == [os.path.basename(path)]


@pytest.mark.parametrize("remat", ["full", "dots"])
def test_remat_keeps_the_kernel_outputs_instead_of_rerunning_it(remat):
  """Under remat the backward pass gets the forward kernel's outputs from the policy (one forward call
  per layer in the compiled step, not two) and the gradients are those of the model without remat."""
  cfg = _tiny(use_memory=False, attention="full", segment_length=128, remat=remat)
  tokens = jnp.asarray(np.random.default_rng(1).integers(0, cfg.vocab_size, (2, 128)), jnp.int32)
  mask = jnp.ones((2, 128), jnp.float32)
  params = LM2(cfg).init(jax.random.PRNGKey(0), tokens)["params"]

  def grad_fn(c):
    def loss(p):
      stats, _ = LM2(c).apply({"params": p}, tokens, jnp.roll(tokens, -1, 1), mask, method=LM2.loss)
      return jnp.sum(stats[0])
    return jax.jit(jax.grad(loss))

  compiled = grad_fn(cfg).lower(params).compile().as_text()
  assert compiled.count('custom_call_target="lm2_causal_attention_fwd') == cfg.num_layers
  assert compiled.count('custom_call_target="lm2_causal_attention_bwd') == cfg.num_layers
  for g, w in zip(jax.tree.leaves(grad_fn(cfg)(params)),
                  jax.tree.leaves(grad_fn(dataclasses.replace(cfg, remat="none"))(params))):
    np.testing.assert_allclose(g, w, atol=1e-6, rtol=1e-5)
