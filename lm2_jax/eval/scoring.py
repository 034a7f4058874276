"""Exact-match scoring of generated answers (BABILong / bAbI).

An answer matches when it equals the reference after normalisation: lower case, punctuation dropped,
whitespace collapsed. qa8 ("What is X carrying?") answers a list of objects whose order carries no
meaning, so there both sides are compared as sets ("apple,milk" == "milk and apple"); "nothing" is the
empty set.
"""

from __future__ import annotations

import re
import string

SET_TASKS = frozenset({"qa8"})
_PUNCTUATION = re.compile(f"[{re.escape(string.punctuation)}]")
_SET_SEPARATORS = re.compile(r"\s*(?:,|\band\b|\s)\s*")
_EMPTY_SET = frozenset({"nothing", "none"})


def normalize(text: str) -> str:
  """Lower case, punctuation removed, whitespace collapsed and stripped."""
  return " ".join(_PUNCTUATION.sub(" ", text.lower()).split())


def answer_set(text: str) -> frozenset[str]:
  """The objects of a list answer ("apple, milk" / "milk and apple"); "nothing" is the empty set."""
  words = {w for w in _SET_SEPARATORS.split(text.lower()) if w}
  words = {normalize(w) for w in words} - {""}
  return frozenset() if words <= _EMPTY_SET else frozenset(words)


def exact_match(prediction: str, reference: str, task: str | None = None) -> bool:
  """Whether `prediction` answers like `reference` (see the module docstring for `task`'s role)."""
  if not normalize(prediction):
    # An empty generation answers nothing at all (not the answer "nothing").
    return not normalize(reference)
  if task in SET_TASKS:
    return answer_set(prediction) == answer_set(reference)
  return normalize(prediction) == normalize(reference)
