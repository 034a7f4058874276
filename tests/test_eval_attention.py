"""Memory attention maps: the traced read attention and memory updates match the model's own forward."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from lm2_jax.eval import attention_maps
from lm2_jax.model import LM2, ModelConfig

T = 8


@pytest.mark.parametrize("flow", ["chained", "per_block"])
def test_trace_matches_full_forward(tmp_path, flow):
  cfg = ModelConfig.from_yaml("configs/model/tiny.yaml", segment_length=T, memory_flow=flow)
  variables = LM2(cfg).init(jax.random.key(1), jnp.zeros((1, T), jnp.int32))
  tokens = np.asarray(jax.random.randint(jax.random.key(2), (1, 4 * T), 0, 256), np.int32)
  valid = np.ones_like(tokens, bool)
  valid[0, :T + 3] = False       # one all-padding segment, then a partly padded one
  trace = attention_maps.trace_memory(cfg, variables, tokens, valid, block=1)
  assert trace.read_attention.shape == (4, T, cfg.num_slots)
  np.testing.assert_allclose(trace.read_attention.sum(-1), 1.0, rtol=1e-5)
  # The same read attention, sown by one full forward over all segments (segment axis first).
  _, state = LM2(cfg).apply(variables, jnp.asarray(tokens), valid=jnp.asarray(valid),
                            mutable=["intermediates"])
  full = state["intermediates"]["block_1"]["memory"]["read_attention"][0][:, 0].mean(axis=1)
  np.testing.assert_allclose(trace.read_attention, np.asarray(full), atol=1e-5)
  # A segment without real tokens leaves the memory as it was; real segments change it.
  assert np.all(trace.update_norm[0] == 0.0)
  assert np.all(trace.update_norm[1:].max(axis=1) > 0.0)
  paths = attention_maps.plot_trace(trace, tmp_path)
  for p in paths[:2]:
    assert p.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
  saved = np.load(paths[2])
  np.testing.assert_array_equal(saved["update_norm"], trace.update_norm)


def test_memoryless_model_and_bad_block_are_errors():
  cfg = ModelConfig.from_yaml("configs/model/tiny.yaml", segment_length=T, memory_layers=1)
  variables = LM2(cfg).init(jax.random.key(1), jnp.zeros((1, T), jnp.int32))
  tokens = np.zeros((1, T), np.int32)
  with pytest.raises(ValueError, match="memory in blocks 0..0"):
    attention_maps.trace_memory(cfg, variables, tokens, np.ones_like(tokens, bool), block=1)
  nomem = cfg.replace(use_memory=False)
  with pytest.raises(ValueError, match="need a model with memory"):
    attention_maps.trace_memory(nomem, variables, tokens, np.ones_like(tokens, bool), block=0)
