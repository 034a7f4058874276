"""The segment recurrence: one call == lax.scan over segments == a Python loop; memory matters; BPTT
cuts; resets; padding (forward and decoder); scanned == unrolled layers."""

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from lm2_jax.model import LM2, init_memory, stack_layers, unstack_layers
from lm2_jax.model.decode import Decoder
from model_utils import init_model, max_abs_diff, tiny_config, tolerance

SEGMENTS = 4
# Measured max |call - lax.scan| and |call - loop| on logits and memory on this CPU: 0.0 in float32 and in
# bfloat16 (the same segment program runs each time); the bounds are model_utils.tolerance.


def _three_ways(model, variables, tokens, t):
  """Logits and final memory of: one call; jax.lax.scan over per-segment applies; a Python loop."""
  b = tokens.shape[0]
  full_logits, full_mem = model.apply(variables, tokens)

  segs = jnp.swapaxes(tokens.reshape(b, -1, t), 0, 1)  # [C, B, T]

  def body(mem, seg):
    logits, mem = model.apply(variables, seg, memory=mem)
    return mem, logits

  scan_mem, scan_logits = jax.lax.scan(body, init_memory(model.cfg, b), segs)
  scan_logits = jnp.swapaxes(scan_logits, 0, 1).reshape(full_logits.shape)

  mem, outs = None, []
  for c in range(segs.shape[0]):
    logits, mem = model.apply(variables, segs[c], memory=mem)
    outs.append(logits)
  loop_logits = jnp.concatenate(outs, axis=1)
  return (full_logits, full_mem), (scan_logits, scan_mem), (loop_logits, mem)


@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
@pytest.mark.parametrize("flow", ["chained", "per_block"])
def test_call_equals_scan_equals_loop(dtype, flow):
  cfg = tiny_config(dtype=dtype, memory_flow=flow)
  model, variables, tokens = init_model(cfg, segments=SEGMENTS)
  (fl, fm), (sl, sm), (ll, lm) = _three_ways(model, variables, tokens, cfg.segment_length)
  print(f"{dtype} {flow}: max |call - scan| logits {max_abs_diff(fl, sl):.1e} memory "
        f"{max_abs_diff(fm, sm):.1e}; max |call - loop| logits {max_abs_diff(fl, ll):.1e} memory "
        f"{max_abs_diff(fm, lm):.1e}")
  for logits, mem in ((sl, sm), (ll, lm)):
    assert max_abs_diff(fl, logits) <= tolerance(dtype, fl)
    assert max_abs_diff(fm, mem) <= tolerance(dtype, fm)
  assert fm.dtype == jnp.float32 and fl.dtype == jnp.float32


def test_memory_changes_later_segments_only():
  cfg = tiny_config()
  model, variables, tokens = init_model(cfg, segments=SEGMENTS)
  t = cfg.segment_length
  base, mem = model.apply(variables, tokens)
  other = jax.random.normal(jax.random.key(3), mem.shape)
  swapped, _ = model.apply(variables, tokens, memory=other)
  diff = jnp.abs(base - swapped).max(axis=(0, 2))       # per position
  assert float(diff[:t].max()) > 1e-4                   # segment 0 reads the given memory
  # Changing a token of segment 2 changes segment 3 (via memory) but not segments 0-2 before it.
  tokens2 = tokens.at[:, 2 * t + 1].set((tokens[:, 2 * t + 1] + 1) % cfg.vocab_size)
  changed, _ = model.apply(variables, tokens2)
  d2 = jnp.abs(base - changed).max(axis=(0, 2))
  assert float(d2[: 2 * t + 1].max()) == 0.0
  assert float(d2[3 * t:].max()) > 1e-5


def _carry_gradients(cfg, segments):
  """g[i, j] = max |d loss(segment j) / d input embeddings(segment i)|.

  Attention never crosses a segment boundary, so a segment i < j reaches segment j's loss only through
  the memory carry: g[i, j] > 0 iff gradients flow through the carry from j back to i.
  """
  model, variables, tokens = init_model(cfg, batch=1, segments=segments)
  t = cfg.segment_length
  embeds = model.apply(variables, tokens, method=lambda m, x: m.embed(x))

  @jax.jit
  def grad_of_segment(j):
    mask = (jnp.arange(segments * t) // t == j).astype(jnp.float32)[None]

    def loss(x):
      stats, _ = model.apply(variables, None, tokens, mask, inputs_embeds=x, method=LM2.loss)
      return stats.nll_sum.sum()

    g = jax.grad(loss)(embeds)                          # [1, C*T, D]
    return jnp.abs(g.reshape(segments, t, -1)).max(axis=(1, 2))

  return np.stack([np.asarray(grad_of_segment(j)) for j in range(segments)], axis=1)  # [i, j]


@pytest.mark.parametrize("k", [0, 1, 2])
def test_bptt_cut(k):
  """bptt_segments=k stops gradients through the carry into segments k, 2k, ...: with 5 segments and
  k=2 the windows are {0, 1}, {2, 3}, {4}; a loss reaches an earlier segment exactly when both lie in
  one window (k=0: full BPTT, every earlier segment; k=1: none)."""
  c = 5
  g = _carry_gradients(tiny_config(bptt_segments=k, num_layers=1), c)
  window = np.arange(c) // k if k else np.zeros(c, int)
  for j in range(c):
    for i in range(j):
      if window[i] == window[j]:
        assert g[i, j] > 1e-7, (i, j, g)
      else:
        assert g[i, j] == 0.0, (i, j, g)
    assert g[j, j] > 0


@pytest.mark.parametrize("flow", ["chained", "per_block"])
def test_reset_equals_fresh_start(flow):
  cfg = tiny_config(memory_flow=flow)
  model, variables, tokens = init_model(cfg, segments=SEGMENTS)
  t, c = cfg.segment_length, 2
  resets = jnp.zeros((2, SEGMENTS), bool).at[0, c].set(True)
  logits, _ = model.apply(variables, tokens, resets=resets)
  plain, _ = model.apply(variables, tokens)
  fresh, _ = model.apply(variables, tokens[:, c * t:])
  assert max_abs_diff(logits[0, c * t:], fresh[0]) <= 1e-5
  assert max_abs_diff(logits[1], plain[1]) == 0.0       # the other row is unaffected
  assert max_abs_diff(logits[0, c * t:], plain[0, c * t:]) > 1e-4


@pytest.mark.parametrize("design", ["tokens", "slots"])
def test_padding_before_real_tokens_is_neither_attended_to_nor_written(design):
  """Row 0's first segment is 3 PAD tokens (arbitrary ids, valid=False), then 5 real tokens; row 1 holds
  the same 5 real tokens first and its PAD after them. Inside a segment only the relative positions of
  real tokens count (RoPE), so if padding is neither attended to nor written both rows give the same
  logits at the real tokens, the same memory, and so the same next segment: in the full forward and when
  decoding token by token."""
  cfg = tiny_config(memory_write=design)
  model, variables, tokens = init_model(cfg, segments=2)
  t, pad = cfg.segment_length, 3
  real, nxt = tokens[0, :t - pad], tokens[0, t:]
  garbage = (jnp.arange(pad) * 37 + 11) % cfg.vocab_size
  row0 = jnp.concatenate([garbage, real, nxt])
  row1 = jnp.concatenate([real, jnp.zeros(pad, tokens.dtype), nxt])
  both = jnp.stack([row0, row1])
  valid = jnp.ones(both.shape, bool).at[0, :pad].set(False).at[1, t - pad:t].set(False)
  logits, mem = model.apply(variables, both, valid=valid)
  assert max_abs_diff(logits[0, pad:t], logits[1, :t - pad]) <= 1e-5
  assert max_abs_diff(logits[0, t:], logits[1, t:]) <= 1e-5
  assert max_abs_diff(mem[0], mem[1]) <= 1e-5
  # Not vacuous: the pad positions are where a real token would be attended to and written.
  unmasked, unmasked_mem = model.apply(variables, both)
  assert max_abs_diff(unmasked[0, pad:t], logits[0, pad:t]) > 1e-3
  assert max_abs_diff(unmasked_mem[0], mem[0]) > 1e-3
  # The decoder, token by token through the padded segment, then the next one whole.
  decoder = Decoder(cfg, variables)
  state, outs = decoder.init_state(2), []
  for i in range(t):
    out, state = decoder.feed(state, both[:, i:i + 1], valid[:, i:i + 1])
    outs.append(out)
  out, state = decoder.feed(state, both[:, t:], valid[:, t:])
  decoded = jnp.concatenate(outs + [out], axis=1)
  assert max_abs_diff(decoded[0, pad:], logits[0, pad:]) <= 1e-5
  assert max_abs_diff(decoded[1, :t - pad], logits[1, :t - pad]) <= 1e-5
  assert max_abs_diff(decoded[:, t:], logits[:, t:]) <= 1e-5
  assert max_abs_diff(state.memory, mem) <= 1e-5


@pytest.mark.parametrize("design", ["tokens", "slots"])
def test_an_all_padding_segment_leaves_the_memory_as_it_was(design):
  cfg = tiny_config(memory_write=design)
  model, variables, tokens = init_model(cfg, segments=2)
  t = cfg.segment_length
  _, m1 = model.apply(variables, tokens[:, :t])
  empty = jnp.zeros((2, t), bool)
  logits, m2 = model.apply(variables, tokens[:, t:], memory=m1, valid=empty)
  assert max_abs_diff(m1, m2) == 0.0
  assert bool(jnp.all(jnp.isfinite(logits)))


@pytest.mark.parametrize("flow", ["chained", "per_block"])
def test_scanned_layers_equal_unrolled(flow):
  unrolled = tiny_config(num_layers=3, memory_layers=2, memory_flow=flow)
  scanned = unrolled.replace(scan_layers=True)
  model_u, variables, tokens = init_model(unrolled, segments=3)
  params = nn.unbox(variables["params"])
  stacked = stack_layers(params, scanned)
  assert set(stacked) >= {"memory_blocks", "blocks"}
  model_s = LM2(scanned)
  lu, mu = model_u.apply({"params": params}, tokens)
  ls, ms = model_s.apply({"params": stacked}, tokens)
  assert max_abs_diff(lu, ls) <= 1e-5 and max_abs_diff(mu, ms) <= 1e-5
  back = unstack_layers(stacked, scanned)
  assert jax.tree.all(jax.tree.map(lambda a, b: bool(jnp.array_equal(a, b)), back, params))
  # The scanned model's own init has the same tree as the stacked one.
  own = nn.unbox(model_s.init(jax.random.key(0), tokens)["params"])
  assert jax.tree.structure(own) == jax.tree.structure(stacked)
  assert jax.tree.all(jax.tree.map(lambda a, b: a.shape == b.shape, own, stacked))


def test_sequence_length_must_be_a_multiple_of_t():
  cfg = tiny_config()
  model, variables, tokens = init_model(cfg, segments=2)
  with pytest.raises(ValueError, match="multiple of segment_length"):
    model.apply(variables, tokens[:, :-1])


def test_loss_matches_logits():
  cfg = tiny_config(tie_embeddings=False)
  model, variables, tokens = init_model(cfg, segments=3)
  targets = jnp.roll(tokens, -1, axis=1)
  mask = (jax.random.uniform(jax.random.key(5), tokens.shape) > 0.3).astype(jnp.float32)
  stats, mem = model.apply(variables, tokens, targets, mask, method=LM2.loss)
  logits, mem2 = model.apply(variables, tokens)
  logp = jax.nn.log_softmax(logits)
  nll = -jnp.take_along_axis(logp, targets[..., None], -1)[..., 0]
  np.testing.assert_allclose(stats.nll_sum, (nll * mask).sum(1), rtol=1e-5)
  np.testing.assert_allclose(stats.weight_sum, mask.sum(1))
  correct = (logits.argmax(-1) == targets) * mask
  np.testing.assert_allclose(stats.correct_sum, correct.sum(1))
  assert max_abs_diff(mem, mem2) == 0.0
