"""The segment recurrence: one call == lax.scan over segments == a Python loop; memory matters; BPTT
cuts; resets; padding; scanned == unrolled layers."""

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from lm2_jax.model import LM2, init_memory, stack_layers, unstack_layers
from model_utils import init_model, max_abs_diff, tiny_config

SEGMENTS = 4
# Measured max |call - lax.scan| and |call - loop| on logits and memory on this CPU: 0.0 in float32 and in
# bfloat16 (the same segment program runs each time). The bounds leave room for backends whose fusion
# rounds a bfloat16 carry differently inside and outside a scan (8 mantissa bits: ~1e-2 relative).
TOL = {"float32": 1e-5, "bfloat16": 6e-2}


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
    assert max_abs_diff(fl, logits) <= TOL[dtype]
    assert max_abs_diff(fm, mem) <= TOL[dtype]
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


def _early_write_grad(cfg):
  """Gradient of the last segment's loss w.r.t. the memory write parameters, via the first segment."""
  model, variables, tokens = init_model(cfg, segments=SEGMENTS)
  t = cfg.segment_length
  mask = jnp.zeros(tokens.shape, jnp.float32).at[:, -t:].set(1.0)

  def loss(params):
    stats, _ = model.apply({"params": params}, tokens, tokens, mask, method=LM2.loss)
    return stats.nll_sum.sum()

  grads = nn.unbox(jax.grad(loss)(variables["params"]))
  # Only the write path (update projection and input gate) of block 0 feeds nothing but the next
  # segments' memory; its gradient is non-zero iff gradients flow through the carry.
  return grads["block_0"]["memory"]["update"]["kernel"]


def test_bptt_cut():
  full = _early_write_grad(tiny_config(bptt_segments=0))
  assert float(jnp.abs(full).max()) > 0
  # bptt_segments=1 cuts the carry into every segment: the last segment's loss cannot reach any write.
  one = _early_write_grad(tiny_config(bptt_segments=1))
  assert float(jnp.abs(one).max()) == 0.0


def test_bptt_cut_keeps_the_recent_segment():
  """bptt_segments=2 cuts only at segments 2, 4, ...: a loss on segment 1 still trains segment 0's write
  (a cut at every segment would make this gradient zero)."""
  cfg = tiny_config(bptt_segments=2)
  model, variables, tokens = init_model(cfg, segments=2)
  t = cfg.segment_length
  mask = jnp.zeros(tokens.shape, jnp.float32).at[:, -t:].set(1.0)

  def loss(params):
    stats, _ = model.apply({"params": params}, tokens, tokens, mask, method=LM2.loss)
    return stats.nll_sum.sum()

  g = nn.unbox(jax.grad(loss)(variables["params"]))["block_0"]["memory"]["update"]["kernel"]
  assert float(jnp.abs(g).max()) > 0


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


@pytest.mark.parametrize("write_softmax", ["tokens", "slots"])
def test_padding_is_not_written(write_softmax):
  cfg = tiny_config(write_softmax=write_softmax)
  model, variables, tokens = init_model(cfg, segments=2)
  t = cfg.segment_length
  valid = jnp.ones(tokens.shape, bool).at[:, t - 3:t].set(False)
  _, mem = model.apply(variables, tokens, valid=valid)
  other = tokens.at[:, t - 3:t].set(7)
  logits2, mem2 = model.apply(variables, other, valid=valid)
  assert max_abs_diff(mem, mem2) == 0.0
  # An all-padding segment leaves the memory exactly as it was.
  _, m1 = model.apply(variables, tokens[:, :t])
  empty = jnp.zeros((2, t), bool)
  _, m2 = model.apply(variables, tokens[:, t:], memory=m1, valid=empty)
  assert max_abs_diff(m1, m2) == 0.0
  assert bool(jnp.all(jnp.isfinite(logits2)))


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
