"""A word-level tokenizer: one token per word or punctuation mark, from a fixed vocabulary.

With a built-in vocabulary of the bAbI world (every word the generator and the procedural filler can
emit), a fact such as "Mary moved to the bathroom." is 6 tokens instead of 28 bytes, and every name and
place is a single token, as in the paper's Llama-3 vocabulary. So the default run spends its CPU time on
the memory problem rather than on spelling. A user vocabulary file (one token per line) works the same way.

Ids: PAD 0, BOS 1, EOS 2, SEP 3, UNK 4, then the vocabulary in file (or sorted) order. Decoding joins words
with single spaces and puts no space before punctuation, so "apple,milk" decodes as "apple, milk".
"""

from __future__ import annotations

import functools
import itertools
import os
import re

from lm2_jax.data.tokenizer_base import Tokenizer

SPECIALS = ("<pad>", "<bos>", "<eos>", "<sep>", "<unk>")
_TOKEN = re.compile(r"[A-Za-z]+|[0-9]+|[^\sA-Za-z0-9]")
_NO_SPACE_BEFORE = frozenset(".,?!;:")


def split_words(text: str) -> list[str]:
  """Words, numbers and single punctuation marks of `text`, in order."""
  return _TOKEN.findall(text)


class WordTokenizer(Tokenizer):
  """Word-level ids over a fixed vocabulary; unknown words map to UNK (id 4)."""

  pad_id, bos_id, eos_id, sep_id, unk_id = range(5)

  def __init__(self, words):
    words = [w for w in dict.fromkeys(words) if w not in SPECIALS]
    bad = [w for w in words if split_words(w) != [w]]
    if bad:
      raise ValueError(f"vocabulary entries must be single words or punctuation marks, got {bad[:5]}")
    self.words = tuple(SPECIALS) + tuple(words)
    self.vocab_size = len(self.words)
    self._ids = {w: i for i, w in enumerate(self.words)}

  @classmethod
  def from_file(cls, path: str | os.PathLike) -> "WordTokenizer":
    """Reads a vocabulary file: one token per line; blank lines and '#' comments are skipped."""
    if not os.path.isfile(path):
      raise FileNotFoundError(f"word vocabulary file not found: {path}")
    with open(path, encoding="utf-8") as f:
      words = [line.strip() for line in f if line.strip() and not line.startswith("#")]
    if not words:
      raise ValueError(f"{path}: the word vocabulary is empty")
    try:
      return cls(words)
    except ValueError as e:
      raise ValueError(f"{path}: {e}") from None

  @classmethod
  def babi(cls) -> "WordTokenizer":
    """The built-in vocabulary: every word of the bAbI generator and of the template filler."""
    return cls(babi_vocabulary())

  def encode(self, text: str) -> list[int]:
    return [self._ids.get(w, self.unk_id) for w in split_words(text)]

  def decode(self, ids) -> str:
    out = []
    for i in ids:
      i = int(i)
      if i < len(SPECIALS) or i >= self.vocab_size:
        continue
      word = self.words[i]
      if out and word not in _NO_SPACE_BEFORE:
        out.append(" ")
      out.append(word)
    return "".join(out)


@functools.cache
def babi_vocabulary() -> tuple[str, ...]:
  """Sorted words of all bAbI tasks (questions, answers, stories) and of the template filler.

  Harvested by running the generators over a fixed set of stories per task, plus the entity and verb
  lists, so it is deterministic; tests check that fresh stories encode without UNK.
  """
  from lm2_jax.data import babi, babi_world as bw, filler  # pylint: disable=g-import-not-at-top
  words = set()
  lists = (bw.ACTORS, bw.LOCATIONS, bw.OBJECTS, bw.QA5_ACTORS, bw.QA10_ACTORS, bw.QA10_LOCATIONS,
           bw.DIRECTIONS, bw.MOVE_VERBS, bw.GET_VERBS, bw.DROP_VERBS, bw.GIVE_VERBS, bw.COUNT_WORDS)
  for phrase in itertools.chain(*lists):
    words.update(split_words(phrase))
  for task in babi.TASKS:
    for text in (*babi.all_questions(task), *babi.answer_vocab(task)):
      words.update(split_words(text))
    for index in range(300):
      sample = babi.generate(task, 0, index)
      for text in (*sample.sentences, sample.question, sample.answer):
        words.update(split_words(text))
  # The filler: its word lists, every number its sums can print, and the template words.
  for value in vars(filler).values():
    if isinstance(value, tuple) and all(isinstance(v, str) for v in value):
      for phrase in value:
        words.update(split_words(phrase))
  words.update(str(n) for n in range(200))
  for sentence in itertools.islice(filler.TemplateFiller().stream(0), 3000):
    words.update(split_words(sentence))
  return tuple(sorted(words))
