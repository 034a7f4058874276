"""The RMT baseline (`memory_kind: rmt`): what a segment computes (a Llama over [memory, tokens, memory]),
causality, one call == scan == loop == streaming == decoding, the carry matters, resets, padding, BPTT,
config checks, FLOPs, a Hugging Face warm start of its backbone, and the trainer's exact resume and
2x2x2 sharding tests run on RMT."""

import pathlib

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import traverse_util

from lm2_jax.convert import load_hf_llama, save_hf_llama
from lm2_jax.eval import streaming
from lm2_jax.model import LM2, ModelConfig, forward_flops_per_token
from lm2_jax.model.decode import Decoder
from lm2_jax.train import config as config_lib
from lm2_jax.train import mesh as mesh_lib
from lm2_jax.train import optimizer as opt_lib
from lm2_jax.train import state as state_lib
import test_model_recurrence
import test_train_loop
import test_train_sharding as ts
from model_utils import init_model, max_abs_diff, tiny_config, tolerance
from test_model_recurrence import _three_ways
from test_model_shapes import _counted_flops_per_token
from test_train_evaluate import TINY_MODEL

TIED = pathlib.Path(__file__).parent / "fixtures" / "hf_tiny_llama_tied"
SEGMENTS = 3
M = 3  # memory tokens: fewer than the segment's 8 tokens, so a slice of the wrong length fails


def rmt_config(**overrides) -> ModelConfig:
  return tiny_config(**{"memory_kind": "rmt", "memory_init": "learned", "num_slots": M, **overrides})


def _llama_hidden(mdl, x, length):
  """Final-normed hidden states [B, S, D] of a memory-less model over input embeddings x (full causal
  attention at positions 0..S-1): the reference an RMT segment must reproduce."""
  h, _ = mdl._blocks(x, None, jnp.ones(x.shape[:2], bool), jnp.arange(length))
  return mdl.final_norm(h)


def test_a_segment_is_a_llama_over_read_memory_tokens_and_write_memory():
  """Segment by segment, RMT's logits are those of the same backbone (a memory-less, full-attention
  model with RMT's parameters minus `memory_init`) run on [carry; segment embeddings; carry], and the
  next carry is that model's final-normed hidden state at the last m positions."""
  cfg = rmt_config()
  model, variables, tokens = init_model(cfg, segments=SEGMENTS)
  logits, final = model.apply(variables, tokens)
  llama = LM2(cfg.replace(use_memory=False, attention="full", memory_kind="lm2"))
  params = {k: v for k, v in nn.unbox(variables["params"]).items() if k != "memory_init"}
  t, m = cfg.segment_length, M
  carry = jnp.broadcast_to(nn.unbox(variables["params"])["memory_init"],
                           (tokens.shape[0], m, cfg.d_model))
  for c in range(SEGMENTS):
    embeds = model.apply(variables, tokens[:, c * t:(c + 1) * t], method=lambda mdl, x: mdl.embed(x))
    x = jnp.concatenate([carry, embeds, carry], axis=1)
    h = llama.apply({"params": params}, x, t + 2 * m, method=_llama_hidden)
    ref_logits = llama.apply({"params": params}, h[:, m:m + t], method=lambda mdl, y: mdl._logits(y))
    assert max_abs_diff(logits[:, c * t:(c + 1) * t], ref_logits) <= 1e-5, c
    carry = h[:, m + t:]
  assert final.shape == (tokens.shape[0], m, cfg.d_model) and final.dtype == jnp.float32
  assert max_abs_diff(final, carry) <= 1e-5


def _jacobian(cfg, segments=SEGMENTS):
  """|d(logits_i . r) / d(embedding_j)| summed over D: [S, S] for a batch of one."""
  model, variables, tokens = init_model(cfg, batch=1, segments=segments)
  emb = model.apply(variables, tokens, method=lambda m, t: m.embed(t))
  r = jax.random.normal(jax.random.key(7), (cfg.vocab_size,))

  def f(e):
    logits, _ = model.apply(variables, inputs_embeds=e)
    return logits[0] @ r

  return np.abs(np.asarray(jax.jacrev(f)(emb)[:, 0])).sum(-1)


def test_no_gradient_from_the_future_and_the_past_only_through_the_memory():
  cfg = rmt_config(segment_length=4)
  norms = _jacobian(cfg)
  s, t = norms.shape[0], cfg.segment_length
  assert np.all(norms[np.triu(np.ones((s, s), bool), k=1)] == 0.0), "a logit depends on a later token"
  assert np.all(np.diag(norms) > 0)
  # Every earlier token reaches every later segment, across boundaries only through the carry.
  assert np.all(norms[np.tril(np.ones((s, s), bool))] > 0)


def test_a_change_in_a_segment_changes_nothing_before_it_and_later_segments_through_the_carry():
  cfg = rmt_config()
  model, variables, tokens = init_model(cfg, segments=4)
  t = cfg.segment_length
  base, mem = model.apply(variables, tokens)
  for pos in (2 * t, 2 * t + 5, 3 * t - 1):            # first, middle and last token of segment 2
    changed_tokens = tokens.at[:, pos].set((tokens[:, pos] + 1) % cfg.vocab_size)
    changed, changed_mem = model.apply(variables, changed_tokens)
    diff = jnp.abs(base - changed).max(axis=(0, 2))   # per position
    assert float(diff[:pos].max()) == 0.0, pos
    assert float(diff[3 * t:].max()) > 1e-5, pos      # segment 3 sees it only through the memory
    assert max_abs_diff(mem, changed_mem) > 1e-5, pos


def test_the_carry_matters_and_cannot_without_memory():
  """Perturbing segment 0 changes segment 1's logits with RMT, never without memory; segment 0 reads
  the memory it is given."""
  t = 8
  for use_memory in (True, False):
    cfg = rmt_config(use_memory=use_memory)
    model, variables, tokens = init_model(cfg, segments=2)
    base, mem = model.apply(variables, tokens)
    other = tokens.at[:, :t].set((tokens[:, :t] + 7) % cfg.vocab_size)
    changed, _ = model.apply(variables, other)
    d1 = max_abs_diff(base[:, t:], changed[:, t:])
    assert (d1 > 1e-4) if use_memory else (d1 == 0.0), (use_memory, d1)
  cfg = rmt_config()
  model, variables, tokens = init_model(cfg, segments=2)
  base, _ = model.apply(variables, tokens)
  swapped, _ = model.apply(variables, tokens,
                           memory=jax.random.normal(jax.random.key(3), (2, M, cfg.d_model)))
  assert max_abs_diff(base[:, :t], swapped[:, :t]) > 1e-4


@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
def test_call_equals_scan_equals_loop(dtype):
  # memory_init identity: _three_ways's scan starts from init_memory(cfg, b), which has no params.
  cfg = rmt_config(dtype=dtype, memory_init="identity")
  model, variables, tokens = init_model(cfg, segments=SEGMENTS)
  (fl, fm), (sl, sm), (ll, lm) = _three_ways(model, variables, tokens, cfg.segment_length)
  for logits, mem in ((sl, sm), (ll, lm)):
    assert max_abs_diff(fl, logits) <= tolerance(dtype, fl)
    assert max_abs_diff(fm, mem) <= tolerance(dtype, fm)
  assert fm.dtype == jnp.float32


@pytest.mark.parametrize("cfg_kw", [dict(), dict(scan_layers=True), dict(dtype="bfloat16")])
def test_decode_and_streaming_equal_the_full_forward(cfg_kw):
  cfg = rmt_config(**cfg_kw)
  model, variables, tokens = init_model(cfg, segments=SEGMENTS)
  full, memory = model.apply(variables, tokens)
  decoder = Decoder(cfg, variables)
  # Token by token through segment 0, a chunk straddling into segment 1, then a whole segment.
  state, outs, start = decoder.init_state(tokens.shape[0]), [], 0
  for end in (*range(1, 9), 13, 16, tokens.shape[1]):
    logits, state = decoder.feed(state, tokens[:, start:end])
    outs.append(logits)
    start = end
  assert max_abs_diff(jnp.concatenate(outs, axis=1), full) <= tolerance(cfg.dtype, full)
  assert max_abs_diff(state.memory, memory) <= tolerance(cfg.dtype, memory)
  # streaming.stream: whole segments, only the carry kept.
  streamed = streaming.stream(decoder, decoder.init_state(tokens.shape[0]), np.asarray(tokens),
                              np.ones(tokens.shape, bool))
  assert max_abs_diff(streamed.memory, memory) <= tolerance(cfg.dtype, memory)


def test_reset_restarts_from_the_learned_memory(monkeypatch):
  """The recurrence test of resets, on RMT (its tiny config patched to rmt_config)."""
  monkeypatch.setattr(test_model_recurrence, "tiny_config", rmt_config)
  test_model_recurrence.test_reset_equals_fresh_start("chained")


def test_a_padding_segment_keeps_the_carry():
  cfg = rmt_config()
  model, variables, tokens = init_model(cfg, segments=SEGMENTS)
  t = cfg.segment_length
  # An all-padding segment 1 leaves the carry of segment 0 for segment 2.
  valid = jnp.ones(tokens.shape, bool).at[:, t:2 * t].set(False)
  padded, _ = model.apply(variables, tokens, valid=valid)
  skipped, _ = model.apply(variables, jnp.concatenate([tokens[:, :t], tokens[:, 2 * t:]], axis=1))
  assert max_abs_diff(padded[:, 2 * t:], skipped[:, t:]) <= 1e-5


@pytest.mark.parametrize("k", [0, 1])
def test_bptt_cut_stops_gradients_through_the_carry(k):
  cfg = rmt_config(bptt_segments=k, num_layers=1)
  model, variables, tokens = init_model(cfg, batch=1, segments=2)
  t = cfg.segment_length
  embeds = model.apply(variables, tokens, method=lambda m, x: m.embed(x))
  mask = (jnp.arange(2 * t) >= t).astype(jnp.float32)[None]

  def loss(x):
    stats, _ = model.apply(variables, None, tokens, mask, inputs_embeds=x, method=LM2.loss)
    return stats.nll_sum.sum()

  g = jnp.abs(jax.grad(loss)(embeds))
  assert float(g[:, t:].max()) > 0
  assert (float(g[:, :t].max()) > 1e-7) if k == 0 else (float(g[:, :t].max()) == 0.0)


def test_config_refuses_what_rmt_cannot_carry():
  with pytest.raises(ValueError, match="memory_flow: chained"):
    rmt_config(memory_flow="per_block")
  with pytest.raises(ValueError, match="memory_layers: null"):
    rmt_config(memory_layers=1)
  with pytest.raises(ValueError, match="memory_kind"):
    tiny_config(memory_kind="bank")
  assert rmt_config().num_memory_layers == 0 and rmt_config().num_memory_tokens == M
  assert tiny_config().num_memory_tokens == 0


def _flat(variables):
  return {k: np.asarray(v) for k, v in traverse_util.flatten_dict(variables["params"]).items()}


def test_backbone_is_the_llamas_so_a_hugging_face_warm_start_loads_it(tmp_path):
  """Importing a Hugging Face Llama as RMT gives its backbone unchanged plus a fresh `memory_init`
  ([m, D]); export and re-import restore the RMT config and every parameter."""
  rmt = dict(use_memory=True, memory_kind="rmt", memory_init="learned", num_slots=4, segment_length=8)
  cfg, variables = load_hf_llama(TIED, **rmt)
  _, llama = load_hf_llama(TIED, segment_length=8)
  flat, base = _flat(variables), _flat(llama)
  assert sorted(set(flat) - set(base)) == [("memory_init",)]
  assert flat[("memory_init",)].shape == (4, cfg.d_model)
  for path, value in base.items():
    np.testing.assert_array_equal(flat[path], value, err_msg=str(path))
  save_hf_llama(cfg, variables, tmp_path)
  cfg2, variables2 = load_hf_llama(tmp_path)
  assert cfg2 == cfg and cfg2.memory_kind == "rmt"
  flat2 = _flat(variables2)
  assert sorted(flat2) == sorted(flat)
  for path, value in flat.items():
    np.testing.assert_array_equal(flat2[path], value, err_msg=str(path))



@pytest.mark.parametrize("overrides", [dict(), dict(num_slots=5, scan_layers=True)])
def test_flops_match_the_matmuls_of_the_traced_forward(overrides):
  """flops.py's RMT count equals the dot_general FLOPs of the traced forward (every block over T + 2m
  positions, the head over T), and exceeds the memory-less backbone's."""
  cfg = rmt_config(**overrides)
  expected = forward_flops_per_token(cfg, 3 * cfg.segment_length)
  assert _counted_flops_per_token(cfg) == pytest.approx(expected, rel=1e-9)
  assert expected > forward_flops_per_token(cfg.replace(use_memory=False), 3 * cfg.segment_length)


# The trainer's own tests, run on RMT: their tiny model with `memory_kind: rmt` patched in.
RMT_MODEL = {"memory_kind": "rmt", "memory_init": "learned", "num_slots": M}


@pytest.mark.slow
def test_trainer_resume_is_bit_identical(tmp_path, monkeypatch):
  base = test_train_loop.tiny_config

  def rmt_run(runs_dir, name="tiny", **sections):
    return base(runs_dir, name, model={**TINY_MODEL, **RMT_MODEL}, **sections)

  monkeypatch.setattr(test_train_loop, "tiny_config", rmt_run)
  assert rmt_run(tmp_path, "probe").model["memory_kind"] == "rmt"
  test_train_loop.test_resume_gives_bit_identical_losses(tmp_path)
  assert "memory_kind: rmt" in (tmp_path / "split" / "config.yaml").read_text()


@pytest.mark.slow
def test_sharded_steps_on_a_2x2x2_mesh_match_one_device(monkeypatch):
  """The trainer's 8-fake-device test on RMT: the logical-axis rules cover `memory_init` ([slots,
  embed]: D over fsdp) and the extended segments, and a 2x2x2 mesh (the XLA miscompile's shape) gives
  one device's losses and parameters."""
  monkeypatch.setattr(ts, "TINY_MODEL", {**ts.TINY_MODEL, **RMT_MODEL})
  mesh = mesh_lib.make_mesh(config_lib.MeshConfig(data=2, fsdp=2, tensor=2))
  _, shardings = state_lib.abstract_state(LM2(ModelConfig.from_dict(ts.TINY_MODEL)),
                                          opt_lib.make_optimizer(config_lib.TrainConfig()), mesh,
                                          (4, ts.C * ts.T), 0)
  assert tuple(shardings.params["memory_init"].spec) == (None, "fsdp")
  ts.test_sharded_steps_match_one_device(ts.run_steps(config_lib.MeshConfig(data=1, num_devices=1)),
                                         (2, 2, 2))
