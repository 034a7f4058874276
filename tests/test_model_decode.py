"""Streaming and incremental decoding give the logits of the full forward; sampling filters."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from lm2_jax.model.decode import Decoder, sample_logits
from model_utils import init_model, max_abs_diff, tiny_config, tolerance


def _stream(decoder, tokens, cuts):
  """Feeds tokens in chunks ending at `cuts`; returns all logits and the final state."""
  state, outs, start = decoder.init_state(tokens.shape[0]), [], 0
  for end in (*cuts, tokens.shape[1]):
    logits, state = decoder.feed(state, tokens[:, start:end])
    outs.append(logits)
    start = end
  return jnp.concatenate(outs, axis=1), state


@pytest.mark.parametrize("cfg_kw", [
    dict(),
    dict(memory_flow="per_block", scan_layers=True),
    dict(read_topk=3),
    dict(memory_write="slots", memory_norm=True),
    dict(use_memory=False, attention="full"),
    dict(dtype="bfloat16"),
])
def test_decode_equals_full_forward(cfg_kw):
  cfg = tiny_config(**cfg_kw)
  model, variables, tokens = init_model(cfg, segments=3)
  full, memory = model.apply(variables, tokens)
  decoder = Decoder(cfg, variables, max_length=tokens.shape[1])
  # Token by token through segment 0, a chunk straddling into segment 1, then whole segments.
  cuts = (*range(1, 9), 13, 16)
  logits, state = _stream(decoder, tokens, cuts)
  assert logits.shape == full.shape
  assert max_abs_diff(logits, full) <= tolerance(cfg.dtype, full)
  if memory is not None:
    assert max_abs_diff(state.memory, memory) <= tolerance(cfg.dtype, memory)
  assert state.position == tokens.shape[1]


def test_greedy_generation_continues_the_argmax():
  cfg = tiny_config()
  model, variables, tokens = init_model(cfg, segments=2)
  decoder = Decoder(cfg, variables)
  prompt = tokens[:, :11]
  logits, state = decoder.feed(decoder.init_state(2), prompt)
  generated, _ = decoder.generate(state, logits[:, -1], max_new_tokens=9)
  assert generated.shape == (2, 9)
  # Each generated token is the argmax of the full forward over prompt + generated so far.
  seq = jnp.concatenate([prompt, jnp.asarray(generated)], axis=1)[:, :16]
  full, _ = model.apply(variables, seq)
  expected = np.asarray(jnp.argmax(full[:, 10:15], axis=-1))
  np.testing.assert_array_equal(generated[:, :5], expected)


def test_generation_stops_at_eos():
  cfg = tiny_config()
  _, variables, tokens = init_model(cfg, segments=1)
  decoder = Decoder(cfg, variables)
  logits, state = decoder.feed(decoder.init_state(2), tokens[:, :4])
  forced = jnp.full_like(logits[:, -1], -1e9).at[:, 5].set(0.0)   # the first new token is "5"
  generated, _ = decoder.generate(state, forced, max_new_tokens=20, eos_id=5)
  assert generated.shape == (2, 1) and np.all(generated == 5)


def test_sampling_respects_top_k_and_top_p():
  logits = jnp.log(jnp.array([[0.5, 0.3, 0.15, 0.05]] * 512))
  keys = jax.random.split(jax.random.key(0), 4)
  top1 = sample_logits(logits, keys[0], temperature=1.0, top_k=1)
  assert np.all(np.asarray(top1) == 0)
  top2 = np.asarray(sample_logits(logits, keys[1], temperature=1.0, top_k=2))
  assert set(top2.tolist()) == {0, 1}
  nucleus = np.asarray(sample_logits(logits, keys[2], temperature=1.0, top_p=0.7))
  assert set(nucleus.tolist()) == {0, 1}                   # 0.5 + 0.3 covers 0.7
  free = np.asarray(sample_logits(logits, keys[3], temperature=1.0))
  assert set(free.tolist()) == {0, 1, 2, 3}
  assert np.all(np.asarray(sample_logits(logits, keys[3])) == 0)  # temperature 0 is greedy
