"""Filler text for long-context QA: sentences that never mention anything a bAbI story talks about.

Two sources behind one method, `stream(seed) -> Iterator[str]`, an endless, deterministic sequence of
sentences for a seed:

- `TemplateFiller`: built in, procedural sentences about weather, colours, numbers and abstract topics.
  Its word lists exclude every bAbI actor, location, object, direction, action verb and answer word
  (`BABI_WORDS`), so filler can never be mistaken for a fact.
- `TextFileFiller`: the user's own local text files (e.g. a PG19 copy) split into sentences; sentences
  that contain a bAbI word are dropped, so the same guarantee holds.
"""

from __future__ import annotations

import pathlib
import re
from collections.abc import Iterator

import numpy as np

from lm2_jax.data import babi_world as bw

# Words a filler sentence must never contain (compared lower-case, word by word).
BABI_WORDS = frozenset(
    w.lower() for group in (
        bw.ACTORS, bw.QA5_ACTORS, bw.QA10_ACTORS, bw.LOCATIONS, bw.QA10_LOCATIONS, bw.OBJECTS,
        bw.DIRECTIONS, bw.COUNT_WORDS,
    ) for w in group
) | frozenset(
    w for phrase in bw.MOVE_VERBS + bw.GET_VERBS + bw.DROP_VERBS + bw.GIVE_VERBS for w in phrase.split()
) | frozenset({
    "yes", "no", "maybe", "nothing", "either", "longer", "not", "carrying", "give", "received",
    "there", "where", "before", "go", "goes", "move", "moves", "travel", "journey", "get", "gets",
    "drop", "drops", "hand", "hands", "pass", "passes",
})

_WORD = re.compile(r"[A-Za-z]+")


def mentions_babi(sentence: str) -> bool:
  """Whether `sentence` contains any bAbI word (case-insensitive, whole words)."""
  return any(w.lower() in BABI_WORDS for w in _WORD.findall(sentence))


_SKY = ("The sky", "The air", "The morning", "The evening", "The season", "The breeze", "The fog")
_SKY_STATE = ("is grey", "seems calm", "feels damp", "turns cold", "grows warm", "looks bright",
              "stays humid", "becomes still")
_SKY_TAIL = ("today", "this week", "after the storm", "at dawn", "at dusk", "all season", "again")
_COLOURS = ("red", "blue", "amber", "violet", "green", "silver", "ochre", "teal", "crimson", "ivory")
_THINGS = ("lantern", "ribbon", "curtain", "kite", "feather", "pebble", "banner", "shell", "candle",
           "lamp")
_TOPICS = ("Patience", "Curiosity", "Memory", "Silence", "Music", "Logic", "Courage", "Habit",
           "Wonder", "Order")
_VERBS_ABSTRACT = ("shapes", "outlasts", "echoes", "softens", "rewards", "follows", "invites",
                   "reflects")
_OBJECTS_ABSTRACT = ("every habit", "quiet effort", "old stories", "small choices", "distant hopes",
                     "careful thought", "each season", "a long debate")


def _article(word: str) -> str:
  return "an" if word[0] in "aeiou" else "a"


def _template(rng: np.random.Generator) -> str:
  kind = rng.integers(4)
  pick = lambda xs: xs[rng.integers(len(xs))]  # noqa: E731
  if kind == 0:
    return f"{pick(_SKY)} {pick(_SKY_STATE)} {pick(_SKY_TAIL)}."
  if kind == 1:
    first, second = pick(_COLOURS), pick(_COLOURS)
    return (f"{_article(first).title()} {first} {pick(_THINGS)} is beside "
            f"{_article(second)} {second} {pick(_THINGS)}.")
  if kind == 2:
    a, b = int(rng.integers(4, 90)), int(rng.integers(4, 90))
    return f"{a} plus {b} makes {a + b}."
  return f"{pick(_TOPICS)} {pick(_VERBS_ABSTRACT)} {pick(_OBJECTS_ABSTRACT)}."


class TemplateFiller:
  """Procedural filler sentences; the built-in default."""

  def stream(self, seed: int) -> Iterator[str]:
    """An endless deterministic sequence of sentences for `seed` (>= 0)."""
    rng = np.random.default_rng([seed, 0x51F])
    while True:
      yield _template(rng)


def place_facts(facts, fill, rng: np.random.Generator) -> list:
  """`fill` with `facts` inserted, in order, at sorted uniform random boundaries between its items."""
  slots = np.sort(rng.integers(0, len(fill) + 1, size=len(facts)))
  out, j = [], 0
  for i, item in enumerate(fill):
    while j < len(facts) and slots[j] == i:
      out.append(facts[j])
      j += 1
    out.append(item)
  return out + list(facts[j:])


_SENTENCE_END = re.compile(r"(?<=[.!?])[\"')\]]*\s+")


def split_sentences(text: str) -> list[str]:
  """Sentences of `text`: split after '.', '!' or '?' followed by white space; white space collapsed."""
  text = re.sub(r"\s+", " ", text).strip()
  return [s.strip() for s in _SENTENCE_END.split(text) if s.strip()]


class TextFileFiller:
  """Filler from local text files, sentence by sentence; each seed starts at its own random sentence.

  Attributes:
    sentences: the usable sentences of all files, in file order (those mentioning bAbI words and
      those longer than `max_chars` are dropped).
  """

  def __init__(self, paths, max_chars: int = 400, min_chars: int = 2):
    paths = [pathlib.Path(p) for p in ([paths] if isinstance(paths, (str, pathlib.Path)) else paths)]
    if not paths:
      raise ValueError("TextFileFiller needs at least one text file path")
    self.sentences: list[str] = []
    for path in paths:
      if not path.is_file():
        raise FileNotFoundError(f"filler text file {path} does not exist (pass paths to local .txt files)")
      text = path.read_text(encoding="utf-8", errors="replace")
      if not text.strip():
        raise ValueError(f"filler text file {path} is empty")
      self.sentences += [s for s in split_sentences(text)
                         if min_chars <= len(s) <= max_chars and not mentions_babi(s)]
    if not self.sentences:
      raise ValueError(f"no usable filler sentences in {', '.join(map(str, paths))}: every sentence was "
                       f"empty, longer than {max_chars} characters, or mentioned a bAbI word")

  def stream(self, seed: int) -> Iterator[str]:
    """Sentences from a seed-chosen start, in file order, wrapping around at the end."""
    n = len(self.sentences)
    i = int(np.random.default_rng([seed, 0x7E7]).integers(n))
    while True:
      yield self.sentences[i]
      i = (i + 1) % n
