"""Causality through gradients: position i's logits never depend on inputs at positions j > i."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from model_utils import init_model, tiny_config

SEGMENTS = 3


def _jacobian(cfg):
  """d(logits_i . r) / d(embedding_j): [S, S, D] for a batch of one."""
  model, variables, tokens = init_model(cfg, batch=1, segments=SEGMENTS)
  emb = model.apply(variables, tokens, method=lambda m, t: m.embed(t))
  r = jax.random.normal(jax.random.key(7), (cfg.vocab_size,))

  def f(e):
    logits, _ = model.apply(variables, inputs_embeds=e)
    return logits[0] @ r                                # [S]

  return np.asarray(jax.jacrev(f)(emb)[:, 0])           # [S, S, D]


@pytest.mark.parametrize("flow", ["chained", "per_block"])
@pytest.mark.parametrize("scan_layers", [False, True])
@pytest.mark.parametrize("topk", [None, 3])
def test_no_gradient_from_the_future(flow, scan_layers, topk):
  cfg = tiny_config(memory_flow=flow, scan_layers=scan_layers, read_topk=topk, segment_length=4)
  jac = _jacobian(cfg)
  s = jac.shape[0]
  norms = np.abs(jac).sum(-1)                           # [S_out, S_in]
  future = np.triu(np.ones((s, s), bool), k=1)
  assert np.all(norms[future] == 0.0), "a logit depends on a later position"
  # The past is visible: across segment boundaries only through the memory.
  t = cfg.segment_length
  assert norms[t, 0] > 0, "segment 1 does not see segment 0 through the memory"
  assert norms[2 * t + 1, 1] > 0, "segment 2 does not see segment 0 through the memory"
  assert np.all(np.diag(norms) > 0)


@pytest.mark.parametrize("keys", ["both", "address"])
def test_slot_routed_write_with_addresses_is_causal(keys):
  cfg = tiny_config(write_softmax="slots", memory_norm=True, memory_keys=keys, segment_length=4)
  norms = np.abs(_jacobian(cfg)).sum(-1)
  s, t = norms.shape[0], cfg.segment_length
  assert np.all(norms[np.triu(np.ones((s, s), bool), k=1)] == 0.0)
  assert norms[t, 0] > 0 and norms[2 * t + 1, 1] > 0


def test_memoryless_segments_are_independent():
  cfg = tiny_config(use_memory=False, segment_length=4)
  norms = np.abs(_jacobian(cfg)).sum(-1)
  t = cfg.segment_length
  for i in range(norms.shape[0]):
    seg = i // t
    outside = [j for j in range(norms.shape[1]) if j // t != seg]
    assert np.all(norms[i, outside] == 0.0)
  assert norms[t + 1, t] > 0


def test_full_attention_sees_the_whole_past():
  cfg = tiny_config(use_memory=False, attention="full", segment_length=4)
  norms = np.abs(_jacobian(cfg)).sum(-1)
  s = norms.shape[0]
  assert np.all(norms[np.triu(np.ones((s, s), bool), k=1)] == 0.0)
  assert np.all(norms[np.tril(np.ones((s, s), bool))] > 0)
