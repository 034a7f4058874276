"""Streaming QA inference (lm2_jax.eval.streaming) agrees with the full forward pass of the model."""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from lm2_jax.eval import streaming
from lm2_jax.model import LM2, ModelConfig
from lm2_jax.model.decode import Decoder

PAD, SEP, EOS = 256, 259, 258
T = 16


def _model(**overrides):
  cfg = ModelConfig.from_yaml("configs/model/tiny.yaml", segment_length=T, **overrides)
  variables = LM2(cfg).init(jax.random.key(0), jnp.zeros((1, T), jnp.int32))
  return cfg, variables


def _rows():
  rng = np.random.default_rng(0)
  contexts = [rng.integers(0, 256, 37).tolist(), rng.integers(0, 256, 5).tolist()]
  questions = [rng.integers(0, 256, 6).tolist(), rng.integers(0, 256, 3).tolist()]
  return contexts, questions


@functools.cache
def _forward(cfg):
  return jax.jit(lambda variables, tokens, valid: LM2(cfg).apply(variables, tokens, valid=valid)[0])


def _full_logits(cfg, variables, tokens, valid):
  """Logits of the full forward over the prompt right-padded to a whole segment."""
  pad = -tokens.shape[1] % T
  tokens = np.pad(tokens, ((0, 0), (0, pad)), constant_values=PAD)
  valid = np.pad(valid, ((0, 0), (0, pad)))
  logits = _forward(cfg)(variables, jnp.asarray(tokens), jnp.asarray(valid))
  return np.asarray(logits[:, :tokens.shape[1] - pad])


@pytest.mark.parametrize("use_memory", [True, False])
def test_streamed_prompt_logits_equal_full_forward(use_memory):
  cfg, variables = _model(use_memory=use_memory)
  contexts, questions = _rows()
  batch = streaming.build_qa_batch(contexts, questions, segment_length=T, max_new_tokens=4, pad_id=PAD,
                                   sep_id=SEP)
  assert batch.context.shape == (2, 48) and batch.question.shape == (2, T - 4)
  logits, _ = streaming.prompt_logits(Decoder(cfg, variables), batch)
  full = _full_logits(cfg, variables, batch.tokens, batch.valid)[:, batch.context.shape[1]:]
  qv = batch.question_valid
  np.testing.assert_allclose(np.asarray(logits)[qv], full[qv], atol=2e-5)


def test_left_padding_and_right_alignment_do_not_change_the_answer_logits():
  """Row 1 alone (one context segment, its question at the end) == row 1 next to a longer row."""
  cfg, variables = _model()
  contexts, questions = _rows()
  decoder = Decoder(cfg, variables)
  both = streaming.build_qa_batch(contexts, questions, segment_length=T, max_new_tokens=4, pad_id=PAD,
                                  sep_id=SEP)
  alone = streaming.build_qa_batch(contexts[1:], questions[1:], segment_length=T, max_new_tokens=4,
                                   pad_id=PAD, sep_id=SEP)
  assert both.context.shape[1] > alone.context.shape[1]   # row 1 gets whole padding segments in `both`
  logits_both, _ = streaming.prompt_logits(decoder, both)
  logits_alone, _ = streaming.prompt_logits(decoder, alone)
  np.testing.assert_allclose(np.asarray(logits_both)[1, -1], np.asarray(logits_alone)[0, -1], atol=2e-5)


def test_greedy_answer_equals_argmax_loop_over_full_forward():
  cfg, variables = _model()
  contexts, questions = _rows()
  batch = streaming.build_qa_batch(contexts, questions, segment_length=T, max_new_tokens=5, pad_id=PAD,
                                   sep_id=SEP)
  answers = streaming.answer(Decoder(cfg, variables), batch, max_new_tokens=5, eos_id=EOS)
  tokens, valid = batch.tokens, batch.valid
  expected = [[], []]
  done = [False, False]
  for _ in range(5):
    nxt = _full_logits(cfg, variables, tokens, valid)[:, -1].argmax(-1)
    for i, tok in enumerate(nxt.tolist()):
      if not done[i]:
        if tok == EOS:
          done[i] = True
        else:
          expected[i].append(tok)
    tokens = np.concatenate([tokens, nxt[:, None].astype(np.int32)], axis=1)
    valid = np.concatenate([valid, np.ones((2, 1), bool)], axis=1)
  assert answers == expected


def test_memoryless_truncation_keeps_the_last_tokens():
  contexts, questions = _rows()
  batch = streaming.build_qa_batch(contexts, questions, segment_length=T, max_new_tokens=4, pad_id=PAD,
                                   sep_id=SEP, max_context=T)
  assert batch.truncated.tolist() == [True, False]
  assert batch.context.shape == (2, T)
  assert batch.context[0].tolist() == contexts[0][-T:]
  assert batch.context_valid[1].sum() == 5 and batch.context[1, -5:].tolist() == contexts[1]


def test_question_that_does_not_fit_is_a_clear_error():
  with pytest.raises(streaming.PromptError, match="longer segment_length"):
    streaming.build_qa_batch([[1]], [[1] * 12], segment_length=T, max_new_tokens=4, pad_id=PAD,
                             sep_id=SEP)
