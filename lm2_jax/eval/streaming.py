"""Streaming QA inference: a batch of long contexts through the memory, then the question, then the answer.

Prompt layout (the QA training rows of `lm2_jax.data.qa`, without filler):

    context segments   the context tokens, LEFT-padded to a whole number of segments (pad: valid=False)
    question segment   [PAD ...][question][SEP]  then the generated [answer][EOS]

Training rows put the question at a fixed offset that leaves room for the task's longest question and
answer; here every row's question block is right-aligned so that SEP is the last prompt token of every
row and the batch generates in lockstep. Inside a segment only the relative positions of the valid tokens
count (RoPE is relative and padding is masked), so this shift changes no logit. The SEP ends at
`T - max_new_tokens`, the same room for the answer that training leaves.

Contexts go through `Decoder.feed` one segment at a time, so a context of C segments costs C segment
steps, never materialises [B, C*T, V] logits, and holds constant device memory.
"""

from __future__ import annotations

import dataclasses
from typing import Callable, Sequence

import numpy as np

from lm2_jax.model.decode import Decoder


class PromptError(ValueError):
  """A prompt that cannot be laid out (question and answer do not fit one segment)."""


@dataclasses.dataclass(frozen=True)
class QABatch:
  """Token arrays of one batch of QA prompts (host numpy).

  Attributes:
    context: int32 [B, Cc*T] left-padded contexts (Cc may be 0).
    context_valid: bool [B, Cc*T].
    question: int32 [B, Tq] the start of the question segment, right-aligned on SEP.
    question_valid: bool [B, Tq].
    truncated: bool [B], rows whose context was cut to its last `max_context` tokens.
  """

  context: np.ndarray
  context_valid: np.ndarray
  question: np.ndarray
  question_valid: np.ndarray
  truncated: np.ndarray

  @property
  def tokens(self) -> np.ndarray:
    """The whole prompt [B, Cc*T + Tq]."""
    return np.concatenate([self.context, self.question], axis=1)

  @property
  def valid(self) -> np.ndarray:
    return np.concatenate([self.context_valid, self.question_valid], axis=1)


def build_qa_batch(contexts: Sequence[Sequence[int]], questions: Sequence[Sequence[int]], *,
                   segment_length: int, max_new_tokens: int, pad_id: int, sep_id: int,
                   max_context: int | None = None) -> QABatch:
  """Lays out a batch of (context, question) token lists (see the module docstring).

  Args:
    contexts, questions: token ids per row.
    segment_length: T.
    max_new_tokens: room left after SEP in the question segment (longest answer + EOS).
    pad_id, sep_id: the tokenizer's PAD and SEP ids.
    max_context: keep only the last `max_context` context tokens (memory-less models); None keeps all.
  Raises:
    PromptError: a question does not fit before the answer's room, or max_context is not a whole number
      of segments.
  """
  t = segment_length
  if len(contexts) != len(questions) or not contexts:
    raise ValueError(f"need as many contexts as questions (>= 1), got {len(contexts)} and {len(questions)}")
  end = t - max_new_tokens
  longest = max(len(q) for q in questions)
  if longest + 1 > end:
    raise PromptError(f"a question of {longest} tokens + SEP + {max_new_tokens} answer tokens does not fit "
                      f"in one segment of {t} tokens; use a model with a longer segment_length")
  if max_context is not None and (max_context < 0 or max_context % t):
    raise PromptError(f"max_context={max_context} must be a non-negative multiple of segment_length={t}")
  kept, truncated = [], []
  for ctx in contexts:
    cut = max_context is not None and len(ctx) > max_context
    kept.append(list(ctx[len(ctx) - max_context:]) if cut else list(ctx))
    truncated.append(cut)
  segments = max(-(-len(c) // t) for c in kept)
  b = len(kept)
  context = np.full((b, segments * t), pad_id, np.int32)
  context_valid = np.zeros((b, segments * t), bool)
  question = np.full((b, end), pad_id, np.int32)
  question_valid = np.zeros((b, end), bool)
  for i, (ctx, q) in enumerate(zip(kept, questions)):
    if ctx:
      context[i, -len(ctx):] = ctx
      context_valid[i, -len(ctx):] = True
    block = list(q) + [sep_id]
    question[i, end - len(block):] = block
    question_valid[i, end - len(block):] = True
  return QABatch(context, context_valid, question, question_valid, np.asarray(truncated))


def stream(decoder: Decoder, state, tokens: np.ndarray, valid: np.ndarray,
           on_segment: Callable[[], None] | None = None):
  """Feeds whole segments of `tokens` [B, C*T] one at a time; returns the state (logits are dropped).

  Args:
    decoder: the model's Decoder (with `full` attention the chunks fill its cache).
    state: its DecodeState at a segment boundary.
    tokens, valid: host arrays whose length is a multiple of the segment length.
    on_segment: called after every segment (progress bars).
  """
  t = decoder.cfg.segment_length
  if tokens.shape[1] % t:
    raise ValueError(f"stream() takes whole segments: {tokens.shape[1]} tokens, segment_length {t}")
  for start in range(0, tokens.shape[1], t):
    _, state = decoder.feed(state, tokens[:, start:start + t], valid[:, start:start + t])
    if on_segment is not None:
      on_segment()
  return state


def prompt_logits(decoder: Decoder, batch: QABatch, on_segment=None):
  """(logits [B, Tq, V] of the question segment, state after SEP): the context streamed first."""
  state = decoder.init_state(batch.context.shape[0])
  state = stream(decoder, state, batch.context, batch.context_valid, on_segment)
  return decoder.feed(state, batch.question, batch.question_valid)


def answer(decoder: Decoder, batch: QABatch, *, max_new_tokens: int, eos_id: int, temperature: float = 0.0,
           top_k: int | None = None, top_p: float | None = None, rng=None,
           on_segment=None) -> list[list[int]]:
  """Generated answer tokens per row (EOS and anything after it removed)."""
  logits, state = prompt_logits(decoder, batch, on_segment)
  tokens, _ = decoder.generate(state, logits[:, -1], max_new_tokens, eos_id=eos_id,
                               temperature=temperature, top_k=top_k, top_p=top_p, rng=rng)
  out = []
  for row in np.asarray(tokens).tolist():
    out.append(row[:row.index(eos_id)] if eos_id in row else row)
  return out
