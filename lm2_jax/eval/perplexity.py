"""Log-likelihood of token streams, computed segment by segment with the memory as the carry.

`stream_nll` runs one jitted segment step (`LM2.loss` on T tokens with the carried memory) per segment, so a
document of any length costs constant device memory and never materialises [B, N, V] logits.
`corpus_perplexity` applies it to local text (the corpora formats of `lm2_jax.data.corpora`): every
document is encoded, followed by EOS, and each token after the first is predicted from the ones before it.

Text outside the tokenizer's vocabulary becomes its unknown-token id (the word tokenizer's UNK, a
SentencePiece or Hugging Face `<unk>`), which is easy to predict: a perplexity over such text mostly measures
how often unknown words occur. The share of unknown-token ids is always reported, and past `max_unknown`
(default 5%) the text is refused before anything is scored.
"""

from __future__ import annotations

import math
from typing import Sequence

import jax
import jax.numpy as jnp
import numpy as np
from tqdm import tqdm

from lm2_jax.data import corpora
from lm2_jax.eval.checkpoints import EvalModel
from lm2_jax.model import LM2, ModelConfig

# Above this share of unknown-token ids, a perplexity says more about the vocabulary than about the model.
DEFAULT_MAX_UNKNOWN = 0.05


class UnknownTokensError(ValueError):
  """Too much of the text is outside the tokenizer's vocabulary (see the module docstring)."""


def unknown_id(tokenizer) -> int | None:
  """The id a tokenizer gives text outside its vocabulary; None when it has none (bytes cover all text)."""
  unk = getattr(tokenizer, "unk_id", None)
  if isinstance(unk, int):
    return unk
  processor = getattr(tokenizer, "processor", None)          # SentencePiece
  if processor is not None:
    return processor.unk_id() if processor.unk_id() >= 0 else None
  backend = getattr(tokenizer, "backend", None)              # Hugging Face tokenizers
  name = getattr(getattr(backend, "model", None), "unk_token", None)
  return backend.token_to_id(name) if name else None


class SegmentScorer:
  """Jitted per-segment NLL sums for one model, carrying the memory across calls.

  Args:
    cfg: the model config. variables: {"params": ...}.
  """

  def __init__(self, cfg: ModelConfig, variables):
    self.cfg, self.variables, self.model = cfg, variables, LM2(cfg)
    self._step = jax.jit(self._step_fn)

  def _step_fn(self, variables, tokens, targets, weights, valid, memory):
    stats, memory = self.model.apply(variables, tokens, targets, weights, memory=memory, valid=valid,
                                     method=LM2.loss)
    return stats.nll_sum, stats.weight_sum, memory

  def __call__(self, tokens: np.ndarray, weights: np.ndarray, valid: np.ndarray | None = None,
               on_segment=None) -> tuple[np.ndarray, np.ndarray]:
    """Summed NLL and weight [B] of next-token targets.

    Args:
      tokens: int [B, N] inputs; the target of position i is tokens[:, i+1].
      weights: [B, N] weight of position i's target (the last position has no target: weight ignored).
      valid: [B, N] real tokens (default all).
      on_segment: called after every segment.
    """
    b, n = tokens.shape
    t = n if self.cfg.attention == "full" else self.cfg.segment_length
    valid = np.ones((b, n), bool) if valid is None else np.asarray(valid, bool)
    targets = np.concatenate([tokens[:, 1:], np.zeros((b, 1), tokens.dtype)], axis=1)
    weights = np.asarray(weights, np.float32).copy()
    weights[:, -1] = 0.0
    pad = -n % t
    grow = lambda x, v: np.pad(x, ((0, 0), (0, pad)), constant_values=v)
    tokens, targets, weights, valid = grow(tokens, 0), grow(targets, 0), grow(weights, 0), grow(valid, False)
    memory = self.model.apply(self.variables, b, method=LM2.initial_memory)
    nll, count = jnp.zeros((b,)), jnp.zeros((b,))
    for start in range(0, tokens.shape[1], t):
      s = slice(start, start + t)
      seg_nll, seg_count, memory = self._step(self.variables, jnp.asarray(tokens[:, s], jnp.int32),
                                              jnp.asarray(targets[:, s], jnp.int32), jnp.asarray(weights[:, s]),
                                              jnp.asarray(valid[:, s]), memory)
      nll, count = nll + seg_nll, count + seg_count
      if on_segment is not None:
        on_segment()
    return np.asarray(nll, np.float64), np.asarray(count, np.float64)


def corpus_perplexity(model: EvalModel, paths: Sequence[str], *, text_field: str = "text",
                      txt_split: str = "file", on_error: str = "fail", max_documents: int | None = None,
                      max_unknown: float = DEFAULT_MAX_UNKNOWN, progress: bool = True) -> dict:
  """Perplexity of local text under `model`: exp(total NLL / predicted tokens).

  Args:
    model: the loaded model.
    paths: files, directories or globs (`corpora.CorpusConfig.paths`).
    text_field, txt_split, on_error: how to read them (`corpora.CorpusConfig`).
    max_documents: read at most this many documents (None = all).
    max_unknown: the largest share of unknown-token ids scored (1.0 = any).
    progress: show a tqdm bar over segments.

  Returns:
    {"perplexity", "nll" (mean per token), "tokens" (predicted), "documents", "unknown_tokens",
    "unknown_share" (of the documents' tokens; 0 for a tokenizer without an unknown id), "skipped"
    ({reason: count} of documents skipped with `on_error="skip"`, and empty ones)}.
  Raises:
    FileNotFoundError / corpora.CorpusError: missing or malformed corpus files (the messages name the
      corpus options: `corpus.paths`, `corpus.on_error`, ...).
    UnknownTokensError: more than `max_unknown` of the tokens are the unknown id (message names
      `max_unknown`).
  """
  config = corpora.CorpusConfig(tuple(paths), txt_split=txt_split, text_field=text_field, on_error=on_error)
  stats = corpora.CorpusStats()
  tok = model.tokenizer
  unk = unknown_id(tok)
  encoded = []
  for text in corpora.iter_documents(config, stats):
    encoded.append(tok.encode(text))
    if max_documents and len(encoded) >= max_documents:
      break
  text_tokens = sum(len(ids) for ids in encoded)
  unknown = 0 if unk is None else sum(ids.count(unk) for ids in encoded)
  share = unknown / max(text_tokens, 1)
  if share > max_unknown:
    raise UnknownTokensError(
        f"{unknown} of the {text_tokens} tokens of {list(paths)} ({share:.1%}) are the tokenizer's unknown "
        f"id (text outside its vocabulary), more than max_unknown={max_unknown:g}: their perplexity would "
        "mostly measure how often unknown words occur. Evaluate a model whose tokenizer covers this text, "
        "or raise max_unknown (1 = score anyway).")
  scorer = SegmentScorer(model.cfg, model.variables)
  total_nll = total_tokens = 0.0
  bar = tqdm(desc=f"perplexity {model.name}", unit="segment", disable=not progress)
  for ids in encoded:
    row = np.asarray([ids + [tok.eos_id]], np.int32)
    nll, count = scorer(row, np.ones(row.shape, np.float32), on_segment=lambda: bar.update(1))
    total_nll += float(nll[0])
    total_tokens += float(count[0])
  bar.close()
  mean = total_nll / max(total_tokens, 1.0)
  return {"perplexity": math.exp(mean), "nll": mean, "tokens": int(total_tokens), "documents": len(encoded),
          "unknown_tokens": unknown, "unknown_share": share, "skipped": dict(stats.skipped)}
