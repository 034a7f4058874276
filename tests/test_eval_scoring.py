"""Exact-match scoring of generated answers (lm2_jax.eval.scoring)."""

import pytest

from lm2_jax.eval import scoring


@pytest.mark.parametrize("prediction, reference, task, expected", [
    ("kitchen", "kitchen", "qa1", True),
    ("Kitchen.", "kitchen", "qa1", True),
    ("  the   Kitchen ", "the kitchen", "qa1", True),
    ("kitchens", "kitchen", "qa1", False),
    ("the kitchen", "kitchen", "qa1", False),
    ("Yes!", "yes", "qa6", True),
    ("no", "yes", "qa6", False),
    ("", "kitchen", "qa1", False),
    # qa8 answers are sets of objects: order, separators and case do not matter...
    ("milk,apple", "apple,milk", "qa8", True),
    ("Milk and apple.", "apple,milk", "qa8", True),
    ("apple, football, milk", "milk,football,apple", "qa8", True),
    ("nothing", "nothing", "qa8", True),
    # ... but missing or extra objects do; an empty generation is not "nothing".
    ("apple", "apple,milk", "qa8", False),
    ("apple,milk,football", "apple,milk", "qa8", False),
    ("", "nothing", "qa8", False),
    ("nothing", "apple", "qa8", False),
    # Outside qa8, order matters.
    ("milk,apple", "apple,milk", "qa1", False),
])
def test_exact_match(prediction, reference, task, expected):
  assert scoring.exact_match(prediction, reference, task) is expected


def test_answer_set_parses_separators():
  assert scoring.answer_set("apple,milk") == {"apple", "milk"}
  assert scoring.answer_set("football and milk") == {"football", "milk"}
  assert scoring.answer_set("Nothing.") == frozenset()
