"""Packing tokenized documents into fixed rows of C segments of T tokens, random access by row index.

Every document is tokenized once, EOS appended, and all of them concatenated into one int32 token stream
(plus the offsets where documents start). Rows are cut from that stream in one of two ways (`align`):

  * "stream": row i is the slice [i*C*T, (i+1)*C*T): greedy concatenation, so a document may continue into
    the next row and start anywhere in one. No padding but the final row's.
  * "document": every document starts a row. Document d fills rows of C*T tokens, its k-th row holding its
    segments k*C .. k*C+C-1, and its last row is padded (`valid` False) instead of holding the next
    document, so segment c of a row whose first segment is a document's start IS segment c of that
    document: what "perplexity by segment index within a document" needs from training rows. The last
    real input of a document is its EOS, which has no target.

Rows are cheap, deterministic and random access, which is what a shuffled, sharded, resumable Grain
pipeline needs.

Each row is a dict of numpy arrays (the same contract as the QA sources):
  inputs     int32[C*T]   the tokens
  targets    int32[C*T]   the next token of the stream (the last position's target is the next row's first
                          token: the true continuation of the text)
  loss_mask  float32[C*T] 1 where the target is a real token
  valid      bool[C*T]    True where the input is a real token (False only in the padded final row)
  resets     bool[C]      True where a document STARTS inside segment c

About `resets`: the model resets a row's memory to its initial state at the start of segment c when
resets[c] is True. A document that starts mid-segment therefore gets fresh memory, but so do the tokens of
the previous document before it in that segment, and within the segment attention stays causal over all
its tokens, so the new document's first tokens still attend to the previous document's tail. A document
continuing from the previous row is not a reset (its memory context is simply lost when rows are shuffled;
that is the usual cost of packing).

The final partial row is padded with PAD (`final_row="pad"`, the padding counted in `padded_tokens`) or
dropped (`final_row="drop"`, its tokens counted in `dropped_tokens`; "stream" rows only). Nothing else is
ever dropped.

The token stream can be cached as .npy files keyed by the corpus files and the tokenizer, so a second run
(or a worker process) memory-maps it instead of tokenizing again.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import os
import shutil
import tempfile
from collections.abc import Iterable, Sequence

import numpy as np

from lm2_jax.data import corpora
from lm2_jax.data import tokenizers as tokenizers_lib

FINAL_ROW = ("pad", "drop")
ALIGN = ("stream", "document")
_ENCODE_CHUNK = 256  # documents per encode_batch call


@dataclasses.dataclass(frozen=True)
class PackingStats:
  """Counts of a packed corpus.

  Attributes:
    documents: documents packed.
    tokens: tokens in the stream (documents plus one EOS each).
    rows: rows of C*T tokens.
    padded_tokens: PAD positions of the final row (`final_row="pad"`), or of every document's last row
      (`align="document"`).
    dropped_tokens: stream tokens in no row (`final_row="drop"`).
  """

  documents: int
  tokens: int
  rows: int
  padded_tokens: int
  dropped_tokens: int


class PackedCorpus:
  """A token stream cut into rows of C*T tokens; `len()` rows, `[i]` is row i as a dict of numpy arrays.

  Attributes:
    tokens: int32[n] the stream (each document followed by EOS).
    doc_starts: int64[documents] the offset of each document in `tokens`, increasing.
    num_segments: C.
    segment_len: T.
    pad_id: the id written at padded positions.
    final_row: "pad" or "drop".
    align: "stream" or "document" (see the module docstring).
    stats: the counts of this packing.
    corpus_stats: the counts of reading the corpus, when built from files.
  """

  def __init__(self, tokens: np.ndarray, doc_starts: np.ndarray, *, num_segments: int, segment_len: int,
               pad_id: int, final_row: str = "pad", align: str = "stream",
               corpus_stats: corpora.CorpusStats | None = None, cache_dir: str | None = None):
    if num_segments < 1 or segment_len < 1:
      raise ValueError(f"num_segments and segment_len must be >= 1 (got {num_segments}, {segment_len}).")
    if final_row not in FINAL_ROW:
      raise ValueError(f"final_row is {final_row!r}; use one of {FINAL_ROW}.")
    if align not in ALIGN:
      raise ValueError(f"align is {align!r}; use one of {ALIGN}.")
    if align == "document" and final_row != "pad":
      raise ValueError("align='document' pads every document's last row; it needs final_row='pad'.")
    self.tokens = tokens
    self.doc_starts = doc_starts
    self.num_segments = num_segments
    self.segment_len = segment_len
    self.pad_id = int(pad_id)
    self.final_row = final_row
    self.align = align
    self.corpus_stats = corpus_stats
    self._cache_dir = cache_dir  # set when `tokens` is memory-mapped from there: pickled by path
    n, row_len = len(tokens), num_segments * segment_len
    self._index_rows()
    if align == "document":
      rows = len(self._row_starts)
    else:
      rows = -(-n // row_len) if final_row == "pad" else n // row_len
    if rows == 0:
      raise ValueError(
          f"the corpus has {n} tokens, fewer than one row of {num_segments}x{segment_len}; with "
          "final_row='drop' nothing is left. Use final_row='pad' or a larger corpus.")
    self.stats = PackingStats(documents=len(doc_starts), tokens=n, rows=rows,
                              padded_tokens=max(rows * row_len - n, 0),
                              dropped_tokens=max(n - rows * row_len, 0))

  @property
  def row_len(self) -> int:
    return self.num_segments * self.segment_len

  def __len__(self) -> int:
    return self.stats.rows

  def _index_rows(self) -> None:
    """With align="document": where each row starts in the stream, and where its document ends."""
    self._row_starts = self._row_ends = None
    if self.align != "document":
      return
    ends = np.append(np.asarray(self.doc_starts[1:], np.int64), len(self.tokens))
    lengths = ends - self.doc_starts
    per_doc = -(-lengths // self.row_len)                 # every document has its EOS: >= 1 row
    first = np.repeat(np.cumsum(per_doc) - per_doc, per_doc)
    self._row_starts = (np.repeat(np.asarray(self.doc_starts, np.int64), per_doc)
                        + self.row_len * (np.arange(per_doc.sum()) - first))
    self._row_ends = np.repeat(ends, per_doc)

  def row_span(self, index: int) -> tuple[int, int]:
    """(where row `index` starts in the stream, where the text it may hold ends: its document's end with
    align="document", the stream's end otherwise)."""
    if self._row_starts is not None:
      return int(self._row_starts[index]), int(self._row_ends[index])
    return index * self.row_len, len(self.tokens)

  def __getitem__(self, index: int) -> dict[str, np.ndarray]:
    index = int(index)
    if not 0 <= index < len(self):
      raise IndexError(f"row {index} out of range for a packed corpus of {len(self)} rows.")
    row_len = self.row_len
    start, end = self.row_span(index)
    window = np.asarray(self.tokens[start:min(start + row_len + 1, end)], dtype=np.int32)
    padded = np.full(row_len + 1, self.pad_id, np.int32)
    padded[:len(window)] = window
    position = np.arange(row_len)
    bounds = np.minimum(start + self.segment_len * np.arange(self.num_segments + 1), end)
    starts_before = np.searchsorted(self.doc_starts, bounds)
    return {
        "inputs": padded[:row_len],
        "targets": padded[1:],
        "loss_mask": (position < end - start - 1).astype(np.float32),
        "valid": position < end - start,
        "resets": starts_before[1:] > starts_before[:-1],
    }

  def __getstate__(self):
    state = dict(self.__dict__)
    if self._cache_dir is not None:
      del state["tokens"], state["doc_starts"], state["_row_starts"], state["_row_ends"]
    return state

  def __setstate__(self, state):
    self.__dict__.update(state)
    if self._cache_dir is not None:
      self.tokens, self.doc_starts = _load_stream(self._cache_dir)
      self._index_rows()


def pack_documents(token_docs: Iterable[Sequence[int]], *, eos_id: int, pad_id: int, num_segments: int,
                   segment_len: int, final_row: str = "pad", align: str = "stream") -> PackedCorpus:
  """Packs already tokenized documents (EOS is appended to each here)."""
  tokens, doc_starts = _stream(token_docs, eos_id)
  return PackedCorpus(tokens, doc_starts, num_segments=num_segments, segment_len=segment_len, pad_id=pad_id,
                      final_row=final_row, align=align)


def _stream(token_docs: Iterable[Sequence[int]], eos_id: int) -> tuple[np.ndarray, np.ndarray]:
  pieces, starts, offset = [], [], 0
  eos = np.array([eos_id], np.int32)
  for ids in token_docs:
    ids = np.asarray(ids, np.int32)
    starts.append(offset)
    pieces += [ids, eos]
    offset += len(ids) + 1
  tokens = np.concatenate(pieces) if pieces else np.zeros(0, np.int32)
  return tokens, np.asarray(starts, np.int64)


def _encode_documents(documents: Iterable[str], tokenizer: tokenizers_lib.Tokenizer,
                      stats: corpora.CorpusStats):
  """Yields the token ids of each document, encoding in chunks when the tokenizer has `encode_batch`."""
  encode_batch = getattr(tokenizer, "encode_batch", None)
  if encode_batch is None:
    for text in documents:
      ids = tokenizer.encode(text)
      stats.tokens += len(ids) + 1
      yield ids
    return
  chunk = []
  for text in documents:
    chunk.append(text)
    if len(chunk) == _ENCODE_CHUNK:
      for ids in encode_batch(chunk):
        stats.tokens += len(ids) + 1
        yield ids
      chunk = []
  for ids in encode_batch(chunk) if chunk else ():
    stats.tokens += len(ids) + 1
    yield ids


def _fingerprint(config: corpora.CorpusConfig, tokenizer: tokenizers_lib.Tokenizer) -> str:
  """A key that changes when a corpus file, a reading option or the tokenizer changes."""
  files = []
  for path in corpora.resolve_paths(config.paths):
    st = os.stat(path)
    files.append([os.path.abspath(path), st.st_size, st.st_mtime_ns])
  tokenizer_file = getattr(tokenizer, "model_file", None) or getattr(tokenizer, "tokenizer_json", None)
  tokenizer_key = [type(tokenizer).__name__, tokenizer.vocab_size, tokenizer.eos_id]
  if tokenizer_file:
    with open(tokenizer_file, "rb") as f:
      tokenizer_key.append(hashlib.sha256(f.read()).hexdigest())
  key = {"files": files, "config": dataclasses.asdict(config), "tokenizer": tokenizer_key}
  return hashlib.sha256(json.dumps(key, sort_keys=True).encode()).hexdigest()[:24]


def _load_stream(cache_dir: str) -> tuple[np.ndarray, np.ndarray]:
  return (np.load(os.path.join(cache_dir, "tokens.npy"), mmap_mode="r"),
          np.load(os.path.join(cache_dir, "doc_starts.npy")))


def pack_corpus(config: corpora.CorpusConfig, tokenizer: tokenizers_lib.Tokenizer, *, num_segments: int,
                segment_len: int, final_row: str = "pad", align: str = "stream",
                cache_dir: str | None = None) -> PackedCorpus:
  """Reads, tokenizes and packs a corpus of local files.

  Args:
    config: the corpus files and how to read them.
    tokenizer: the tokenizer (its `eos_id` ends every document, its `pad_id` fills the final row).
    num_segments: C, segments per row.
    segment_len: T, tokens per segment.
    final_row: "pad" or "drop" the final partial row (both counted in `stats`).
    align: "stream" (greedy concatenation) or "document" (every document starts a row); the cache holds
      the stream, which both share.
    cache_dir: if set, the token stream is cached under `cache_dir/<fingerprint>/` as .npy files and
      memory-mapped; a later call with the same files (size and mtime), options and tokenizer reuses it.

  Returns:
    The packed corpus; `corpus_stats` holds the reading counts (restored from the cache on a hit).
  """
  cached = None
  if cache_dir is not None:
    cached = os.path.join(cache_dir, _fingerprint(config, tokenizer))
    if os.path.exists(os.path.join(cached, "stats.json")):
      with open(os.path.join(cached, "stats.json")) as f:
        stats = corpora.CorpusStats(**json.load(f))
      tokens, doc_starts = _load_stream(cached)
      return PackedCorpus(tokens, doc_starts, num_segments=num_segments, segment_len=segment_len,
                          pad_id=tokenizer.pad_id, final_row=final_row, align=align, corpus_stats=stats,
                          cache_dir=cached)
  stats = corpora.CorpusStats()
  documents = corpora.iter_documents(config, stats)
  tokens, doc_starts = _stream(_encode_documents(documents, tokenizer, stats), tokenizer.eos_id)
  if cached is not None:
    os.makedirs(cache_dir, exist_ok=True)
    # Written whole, then renamed: readers never see a partial cache.
    staging = tempfile.mkdtemp(dir=cache_dir)
    np.save(os.path.join(staging, "tokens.npy"), tokens)
    np.save(os.path.join(staging, "doc_starts.npy"), doc_starts)
    with open(os.path.join(staging, "stats.json"), "w") as f:
      json.dump(dataclasses.asdict(stats), f)
    try:
      os.rename(staging, cached)
    except OSError:  # another process cached the same corpus first; both copies are identical
      shutil.rmtree(staging, ignore_errors=True)
    tokens, doc_starts = _load_stream(cached)
  return PackedCorpus(tokens, doc_starts, num_segments=num_segments, segment_len=segment_len,
                      pad_id=tokenizer.pad_id, final_row=final_row, align=align, corpus_stats=stats,
                      cache_dir=cached)
