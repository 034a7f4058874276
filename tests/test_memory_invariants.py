"""The model invariants for every token-by-token memory write (keyed, keyed with both refinements,
delta): causality with the memory carried across segments, one call == scan == Python loop over
segments, and step-by-step decoding == the full forward."""

import jax.numpy as jnp
import numpy as np
import pytest

from lm2_jax.model.decode import Decoder
from model_utils import init_model, max_abs_diff, tiny_config
from test_model_causality import _jacobian
from test_model_decode import _stream
from test_model_recurrence import _three_ways

KEYED = dict(memory_write="keyed", memory_init="zeros")
DESIGNS = {
    "keyed": dict(KEYED, memory_norm=True),
    "keyed-refined": dict(KEYED, memory_norm=True, memory_match_center=True, memory_write_gate=True),
    "delta": dict(memory_write="delta", memory_init="zeros", memory_heads=1, memory_norm=False),
}


@pytest.mark.parametrize("design", DESIGNS)
def test_memory_is_causal_and_carries_across_segments(design):
  cfg = tiny_config(**DESIGNS[design], segment_length=4)
  norms = np.abs(_jacobian(cfg)).sum(-1)
  s, t = norms.shape[0], cfg.segment_length
  assert np.all(norms[np.triu(np.ones((s, s), bool), k=1)] == 0.0)
  assert norms[t, 0] > 0 and norms[2 * t + 1, 1] > 0


@pytest.mark.parametrize("design,flow", [("keyed", "chained"), ("keyed", "per_block"),
                                         ("keyed-refined", "per_block"), ("delta", "chained"),
                                         ("delta", "per_block")])
def test_call_equals_scan_equals_loop(design, flow):
  cfg = tiny_config(**DESIGNS[design], memory_flow=flow)
  model, variables, tokens = init_model(cfg, segments=4)
  (fl, fm), *others = _three_ways(model, variables, tokens, cfg.segment_length)
  assert float(jnp.abs(fm).max()) > 0, "nothing was written"
  for logits, mem in others:
    assert max_abs_diff(fl, logits) <= 1e-5 and max_abs_diff(fm, mem) <= 1e-5


@pytest.mark.parametrize("design", DESIGNS)
def test_decode_equals_full_forward(design):
  cfg = tiny_config(**DESIGNS[design], memory_flow="per_block", scan_layers=True)
  model, variables, tokens = init_model(cfg, segments=3)
  full, memory = model.apply(variables, tokens)
  logits, state = _stream(Decoder(cfg, variables), tokens, (*range(1, 9), 13, 16))
  assert max_abs_diff(logits, full) <= 1e-5 and max_abs_diff(state.memory, memory) <= 1e-5
