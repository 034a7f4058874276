"""Backbone layers: RoPE frequencies (plain and Llama-3.1+ scaled)."""

import numpy as np

from model_utils import tiny_config


def test_llama3_rope_scaling_frequencies():
  from lm2_jax.model.layers import rope_frequencies
  plain_cfg = tiny_config()
  plain = np.asarray(rope_frequencies(plain_cfg, 64))
  scaled_cfg = plain_cfg.replace(rope_scaling_factor=8.0, rope_original_max_position=256)
  scaled = np.asarray(rope_frequencies(scaled_cfg, 64))
  wavelen = 2 * np.pi / plain
  high = wavelen < 256 / 4.0
  low = wavelen > 256 / 1.0
  assert high.any() and low.any() and (~high & ~low).any()
  np.testing.assert_allclose(scaled[high], plain[high])
  np.testing.assert_allclose(scaled[low], plain[low] / 8.0, rtol=1e-6)
  mid = ~high & ~low
  assert np.all(scaled[mid] < plain[mid]) and np.all(scaled[mid] > plain[mid] / 8.0)
