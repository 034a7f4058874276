"""Log-likelihood of token streams, computed segment by segment with the memory as the carry.

`SegmentScorer` runs one jitted segment step (`LM2.loss` on T tokens with the carried memory) per segment, so
a document of any length costs constant device memory and never materialises [B, N, V] logits; it returns
the sums of a row or of each of its segments. `corpus_perplexity` applies it to local text (the corpora
formats of `lm2_jax.data.corpora`): every document is encoded, followed by EOS, and each token after the
first is predicted from the ones before it. `segment_perplexity` reports the same by segment index within a
document, over the first `max_segments` segments of each, however many segments the model trained on.

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
    t = tokens.shape[1] if self.cfg.attention == "full" else self.cfg.segment_length
    nll, count = self._stream(*self._targets(tokens, weights, valid, t), t, on_segment)
    return nll.sum(axis=1), count.sum(axis=1)

  def by_segment(self, tokens: np.ndarray, weights: np.ndarray, valid: np.ndarray | None = None,
                 on_segment=None) -> tuple[np.ndarray, np.ndarray]:
    """Summed NLL and weight [B, S] of the targets of each segment of `segment_length` tokens.

    Segment s holds the targets of positions s*T .. s*T+T-1 (tokens s*T+1 .. s*T+T); S = ceil(N / T).
    A segment-local model streams the segments once, the memory carried, exactly as `__call__` does (the
    sums over s are its sums). A full-attention model attends over the whole input, and its loss is a sum
    per row, so it runs once per segment that has a weighted target, with only that segment's weights.

    Args: as `__call__`.
    """
    t = self.cfg.segment_length
    tokens, targets, weights, valid = self._targets(tokens, weights, valid, t)
    if self.cfg.attention != "full":
      return self._stream(tokens, targets, weights, valid, t, on_segment)
    b, n = tokens.shape
    nll, count = np.zeros((b, n // t)), np.zeros((b, n // t))
    for s in range(n // t):
      only = np.zeros_like(weights)
      only[:, s * t:(s + 1) * t] = weights[:, s * t:(s + 1) * t]
      if only.any():
        seg_nll, seg_count = self._stream(tokens, targets, only, valid, n, None)
        nll[:, s], count[:, s] = seg_nll[:, 0], seg_count[:, 0]
      if on_segment is not None:
        on_segment()
    return nll, count

  @staticmethod
  def _targets(tokens, weights, valid, t: int):
    """(tokens, targets, weights, valid) [B, N'] padded to a multiple of `t`; the last position unweighted."""
    b, n = tokens.shape
    valid = np.ones((b, n), bool) if valid is None else np.asarray(valid, bool)
    targets = np.concatenate([tokens[:, 1:], np.zeros((b, 1), tokens.dtype)], axis=1)
    weights = np.asarray(weights, np.float32).copy()
    weights[:, -1] = 0.0
    pad = -n % t
    grow = lambda x, v: np.pad(x, ((0, 0), (0, pad)), constant_values=v)
    return grow(tokens, 0), grow(targets, 0), grow(weights, 0), grow(valid, False)

  def _stream(self, tokens, targets, weights, valid, t: int, on_segment) -> tuple[np.ndarray, np.ndarray]:
    """(NLL, weight) float64 [B, N/t] of each chunk of t positions, the memory carried from chunk to chunk."""
    b = tokens.shape[0]
    memory = self.model.apply(self.variables, b, method=LM2.initial_memory)
    nll, count = [], []
    for start in range(0, tokens.shape[1], t):
      s = slice(start, start + t)
      seg_nll, seg_count, memory = self._step(self.variables, jnp.asarray(tokens[:, s], jnp.int32),
                                              jnp.asarray(targets[:, s], jnp.int32), jnp.asarray(weights[:, s]),
                                              jnp.asarray(valid[:, s]), memory)
      nll.append(seg_nll)
      count.append(seg_count)
      if on_segment is not None:
        on_segment()
    return np.asarray(jnp.stack(nll, 1), np.float64), np.asarray(jnp.stack(count, 1), np.float64)


def _encode_corpus(model: EvalModel, paths: Sequence[str], *, text_field: str, txt_split: str, on_error: str,
                   max_documents: int | None, max_unknown: float) -> tuple[list[list[int]], dict]:
  """(token ids of each document, {"unknown_tokens", "unknown_share", "skipped"}); see `corpus_perplexity`."""
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
  return encoded, {"unknown_tokens": unknown, "unknown_share": share, "skipped": dict(stats.skipped)}


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
  encoded, counts = _encode_corpus(model, paths, text_field=text_field, txt_split=txt_split,
                                   on_error=on_error, max_documents=max_documents, max_unknown=max_unknown)
  eos = model.tokenizer.eos_id
  scorer = SegmentScorer(model.cfg, model.variables)
  total_nll = total_tokens = 0.0
  bar = tqdm(desc=f"perplexity {model.name}", unit="segment", disable=not progress)
  for ids in encoded:
    row = np.asarray([ids + [eos]], np.int32)
    nll, count = scorer(row, np.ones(row.shape, np.float32), on_segment=lambda: bar.update(1))
    total_nll += float(nll[0])
    total_tokens += float(count[0])
  bar.close()
  mean = total_nll / max(total_tokens, 1.0)
  return {"perplexity": math.exp(mean), "nll": mean, "tokens": int(total_tokens), "documents": len(encoded),
          **counts}


def segment_perplexity(model: EvalModel, paths: Sequence[str], *, max_segments: int, batch_size: int = 8,
                       text_field: str = "text", txt_split: str = "file", on_error: str = "fail",
                       max_documents: int | None = None, max_unknown: float = DEFAULT_MAX_UNKNOWN,
                       progress: bool = True) -> dict:
  """Perplexity by segment index within a document, each document streamed from its start.

  Every document (encoded, followed by EOS, as in `corpus_perplexity`) is cut to its first
  `max_segments` segments of the model's `segment_length` T, plus the one token that segment
  `max_segments - 1` predicts last; segment s scores the targets of positions s*T .. s*T+T-1. A memory
  model carries its memory across all of them, so segments past the trained length (`model.trained_length`)
  measure the memory on streams longer than any training row; a segment-local model sees only the segment;
  a full-attention model attends over everything before. Documents are scored `batch_size` at a time (the
  shorter ones padded, padding scores nothing), longest first.

  Args:
    model: the loaded model.
    paths: files, directories, globs or `stdlib:held_out` (`corpora.CorpusConfig.paths`).
    max_segments: segments scored per document (S).
    batch_size: documents per scorer call.
    text_field, txt_split, on_error, max_documents, max_unknown, progress: as in `corpus_perplexity`.

  Returns:
    {"segments": [per index s < S: {"segment" (s), "documents" (that reach it), "tokens" (targets scored),
    "nll" (mean per token), "perplexity", "bits_per_token" (bits per byte with byte tokens),
    "past_trained_length"}], "segment_length", "max_segments", "trained_segments" (None if unknown),
    "documents", "tokens", "nll", "perplexity" (over all scored targets), "unknown_tokens",
    "unknown_share", "skipped"}. An index no document reaches has 0 tokens and NaN means.
  Raises:
    ValueError: max_segments or batch_size < 1. Otherwise as `corpus_perplexity`.
  """
  if max_segments < 1 or batch_size < 1:
    raise ValueError(f"max_segments={max_segments} and batch_size={batch_size} must be >= 1")
  encoded, counts = _encode_corpus(model, paths, text_field=text_field, txt_split=txt_split,
                                   on_error=on_error, max_documents=max_documents, max_unknown=max_unknown)
  t, eos, pad = model.cfg.segment_length, model.tokenizer.eos_id, model.tokenizer.pad_id
  docs = sorted(((ids + [eos])[:max_segments * t + 1] for ids in encoded), key=len, reverse=True)
  scorer = SegmentScorer(model.cfg, model.variables)
  nll, count, reach = np.zeros(max_segments), np.zeros(max_segments), np.zeros(max_segments, np.int64)
  bar = tqdm(desc=f"perplexity by segment {model.name}", unit="segment", disable=not progress)
  for start in range(0, len(docs), batch_size):
    batch = docs[start:start + batch_size]
    n = len(batch[0])
    tokens = np.full((batch_size, n), pad, np.int32)  # a constant batch size: one compiled step
    valid = np.zeros((batch_size, n), bool)
    weights = np.zeros((batch_size, n), np.float32)
    for i, ids in enumerate(batch):
      tokens[i, :len(ids)], valid[i, :len(ids)] = ids, True
      weights[i, :len(ids) - 1] = 1.0  # a row's last token predicts nothing
    seg_nll, seg_count = scorer.by_segment(tokens, weights, valid, on_segment=lambda: bar.update(1))
    s = min(seg_nll.shape[1], max_segments)  # the extra last token makes a segment with no target
    nll[:s] += seg_nll[:, :s].sum(axis=0)
    count[:s] += seg_count[:, :s].sum(axis=0)
    reach[:s] += (seg_count[:, :s] > 0).sum(axis=0)
  bar.close()
  trained = model.trained_length // t if model.trained_length else None
  segments = []
  for s in range(max_segments):
    mean = nll[s] / count[s] if count[s] else math.nan
    segments.append({"segment": s, "documents": int(reach[s]), "tokens": int(count[s]), "nll": mean,
                     "perplexity": math.exp(mean), "bits_per_token": mean / math.log(2),
                     "past_trained_length": trained is not None and s >= trained})
  mean = nll.sum() / max(count.sum(), 1.0)
  return {"segments": segments, "segment_length": t, "max_segments": max_segments, "trained_segments": trained,
          "documents": len(docs), "tokens": int(count.sum()), "nll": mean, "perplexity": math.exp(mean),
          **counts}


def format_segment_table(results: dict[str, dict], baseline: str | None = None, unit: str = "token") -> str:
  """`segment_perplexity` results of several models side by side: perplexity by segment index.

  Args:
    results: {model name: segment_perplexity result}, all with the same max_segments.
    baseline: a model name; each other model gets a line saying at how many segment indices after the
      first (and how many past the trained length) its perplexity is lower than the baseline's, and the
      mean difference in bits per `unit` there.
    unit: what a token is ("byte" for the byte tokenizer), for the bits column names.
  Raises:
    ValueError: `baseline` is not one of the results.
  """
  if baseline is not None and baseline not in results:
    raise ValueError(f"baseline {baseline!r} is not one of the models {list(results)}")
  names = list(results)
  first = results[names[0]]
  trained = {r["trained_segments"] for r in results.values()}
  width = max(10, *(len(n) + 1 for n in names))
  lines = [f"perplexity by segment index within a document (T = {first['segment_length']} tokens; "
           f"{first['documents']} documents)",
           "segment  docs" + "".join(n.rjust(width) for n in names)]
  for s in range(first["max_segments"]):
    past = any(r["segments"][s]["past_trained_length"] for r in results.values())
    cells = "".join(f"{r['segments'][s]['perplexity']:{width}.4f}" for r in results.values())
    lines.append(f"{s:>6}{'>' if past else ' '} {first['segments'][s]['documents']:>5}{cells}")
  lines.append(f"{'all':>6}  {'':>5}" + "".join(f"{r['perplexity']:{width}.4f}" for r in results.values()))
  lengths = ", ".join(str(x) for x in sorted(t for t in trained if t is not None)) or "unknown"
  lines.append(f"> past the trained length ({lengths} segments); docs = documents that reach the segment")
  if baseline is not None:
    base = results[baseline]["segments"]
    for name in names:
      if name == baseline:
        continue
      rows = results[name]["segments"]
      later = [s for s in range(1, len(rows)) if rows[s]["tokens"] and base[s]["tokens"]]
      beyond = [s for s in later if rows[s]["past_trained_length"]]
      lower = lambda ss: sum(rows[s]["perplexity"] < base[s]["perplexity"] for s in ss)
      diff = (sum(rows[s]["bits_per_token"] - base[s]["bits_per_token"] for s in later) / len(later)
              if later else math.nan)
      lines.append(f"{name} vs {baseline}: lower perplexity at {lower(later)}/{len(later)} segment indices "
                   f"after the first, {lower(beyond)}/{len(beyond)} past the trained length; mean "
                   f"{diff:+.4f} bits/{unit} there")
  return "\n".join(lines)
