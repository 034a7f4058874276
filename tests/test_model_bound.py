"""The bound (oracle) input channel: position i's input is embed(token_i) + embed(bound_i) where
bound_i >= 0, in the full forward, the loss and streaming decoding alike."""

import jax
import jax.numpy as jnp
import numpy as np

from lm2_jax.model.decode import Decoder
from model_utils import init_model, max_abs_diff, tiny_config


def _bound(tokens, vocab):
  """A bound channel with gaps: -1 on every third position, token ids elsewhere."""
  ids = jax.random.randint(jax.random.key(5), tokens.shape, 0, vocab)
  return jnp.where(jnp.arange(tokens.shape[1]) % 3 == 0, -1, ids)


def test_bound_adds_the_bound_tokens_embedding():
  cfg = tiny_config()
  model, variables, tokens = init_model(cfg, segments=3)
  bound = _bound(tokens, cfg.vocab_size)
  table = variables["params"]["embed"]["embedding"]
  table = getattr(table, "value", table)
  embeds = table[tokens] + jnp.where((bound >= 0)[..., None], table[jnp.maximum(bound, 0)], 0.0)
  with_bound, mem_b = model.apply(variables, tokens, bound=bound)
  by_hand, mem_h = model.apply(variables, inputs_embeds=embeds)
  plain, _ = model.apply(variables, tokens)
  assert max_abs_diff(with_bound, by_hand) <= 1e-5 and max_abs_diff(mem_b, mem_h) <= 1e-5
  assert max_abs_diff(with_bound, plain) > 1e-3
  nothing, _ = model.apply(variables, tokens, bound=jnp.full(tokens.shape, -1))
  assert max_abs_diff(nothing, plain) == 0.0


def test_loss_and_decoding_read_the_bound_channel():
  cfg = tiny_config(memory_flow="per_block")
  model, variables, tokens = init_model(cfg, segments=3)
  bound = _bound(tokens, cfg.vocab_size)
  logits, memory = model.apply(variables, tokens, bound=bound)
  targets = jnp.roll(tokens, -1, axis=1)
  stats, _ = model.apply(variables, tokens, targets, jnp.ones(tokens.shape), bound=bound,
                         method="loss")
  log_probs = jax.nn.log_softmax(logits, axis=-1)
  nll = -jnp.take_along_axis(log_probs, targets[..., None], axis=-1)[..., 0].sum(-1)
  np.testing.assert_allclose(stats.nll_sum, nll, rtol=1e-5)

  decoder = Decoder(cfg, variables)
  state, outs, start = decoder.init_state(tokens.shape[0]), [], 0
  for end in (3, 8, 11, 16, tokens.shape[1]):
    out, state = decoder.feed(state, tokens[:, start:end], bound=bound[:, start:end])
    outs.append(out)
    start = end
  assert max_abs_diff(jnp.concatenate(outs, axis=1), logits) <= 1e-5
  assert max_abs_diff(state.memory, memory) <= 1e-5
