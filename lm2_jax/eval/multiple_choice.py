"""Multiple choice (MMLU-style) by log-likelihood: the model picks the choice it finds most likely.

Input: a local JSONL file, one item a line: `question` (str), `choices` (list of >= 2 str), `answer` and
optionally `subject`. `answer` names the right choice by its integer index (0 = the first), by its exact
text, or by its letter "A", "B", ... (case-insensitive) only when no choice is itself a single letter: with
`choices: ["B", "A"]`, `"A"` is the text of the second choice, and a letter that is no choice's text is an
error (an integer index is never ambiguous).

For each choice the prompt `{question}\\nAnswer:` is followed by ` {choice}`; the score is the summed
log-probability of the choice's tokens given the prompt (or their mean with `normalize`, which removes the
bias towards short choices). All choices of an item are scored in one batch, streamed segment by segment.
"""

from __future__ import annotations

import collections
import json
import pathlib
import string

import numpy as np
from tqdm import tqdm

from lm2_jax.eval import jsonl
from lm2_jax.eval.checkpoints import EvalModel
from lm2_jax.eval.perplexity import SegmentScorer


class MCDataError(ValueError):
  """A malformed multiple-choice file (the message names the file and line)."""


def _is_letter(text: str) -> bool:
  return len(text) == 1 and text.upper() in string.ascii_uppercase


def _answer_index(answer, choices: list[str], where: str) -> int:
  """The index of the choice `answer` names (see the module docstring); MCDataError when it names none,
  or when it could name two (a letter among letter choices, a text several choices share)."""
  if isinstance(answer, bool) or not isinstance(answer, (int, str)):
    raise MCDataError(f"{where}: answer {answer!r} must be an integer index or a string")
  if isinstance(answer, int):
    if not 0 <= answer < len(choices):
      raise MCDataError(f"{where}: answer {answer} is out of range for {len(choices)} choices "
                        "(0 = the first)")
    return answer
  same_text = [i for i, c in enumerate(choices) if c == answer]
  if len(same_text) > 1:
    raise MCDataError(f"{where}: answer {answer!r} is the text of choices {same_text}; give the index as "
                      "an integer")
  letter_choices = any(_is_letter(c) for c in choices)
  if _is_letter(answer) and not letter_choices:
    index = string.ascii_uppercase.index(answer.upper())
    if index >= len(choices):
      raise MCDataError(f"{where}: answer letter {answer!r} is out of range for {len(choices)} choices")
    return index
  if same_text:
    return same_text[0]
  if _is_letter(answer):
    raise MCDataError(f"{where}: answer {answer!r} is ambiguous: the choices {choices} are themselves "
                      "letters, so a letter answer must be one of them exactly (case included); give the "
                      "index as an integer (0 = the first choice)")
  raise MCDataError(f"{where}: answer {answer!r} is neither a choice index, a letter, nor one of the "
                    f"choices {choices}")


def read_jsonl(path: str | pathlib.Path) -> list[dict]:
  """Items {question, choices, answer (an index), subject (or None)} of a JSONL file.

  Raises:
    FileNotFoundError: no such file. MCDataError: a malformed line (file:line in the message).
  """
  path = pathlib.Path(path)
  if not path.is_file():
    raise FileNotFoundError(f"multiple-choice file {path} does not exist")
  items = []
  for where, row in jsonl.iter_objects(path, MCDataError,
                                      "a JSON object with question, choices, answer"):
    question, choices = row.get("question"), row.get("choices")
    if not isinstance(question, str):
      raise MCDataError(f"{where}: `question` must be a string, got {question!r}")
    if not (isinstance(choices, list) and len(choices) >= 2 and all(isinstance(c, str) for c in choices)):
      raise MCDataError(f"{where}: `choices` must be a list of at least 2 strings, got {choices!r}")
    if "answer" not in row:
      raise MCDataError(f"{where}: missing `answer`")
    subject = row.get("subject")
    if subject is not None and not isinstance(subject, str):
      raise MCDataError(f"{where}: `subject` must be a string, got {subject!r}")
    items.append({"question": question, "choices": choices,
                  "answer": _answer_index(row["answer"], choices, where), "subject": subject})
  if not items:
    raise MCDataError(f"{path}: no items")
  return items


def choice_scores(scorer: SegmentScorer, tokenizer, question: str, choices: list[str],
                  normalize: bool = False) -> np.ndarray:
  """Log-likelihood [len(choices)] of each choice's tokens after the question's prompt."""
  prompt = tokenizer.encode(f"{question}\nAnswer:")
  conts = [tokenizer.encode(f" {c}") for c in choices]
  n = len(prompt) + max(len(c) for c in conts)
  tokens = np.full((len(choices), n), tokenizer.pad_id, np.int32)
  valid = np.zeros((len(choices), n), bool)
  weights = np.zeros((len(choices), n), np.float32)
  for i, cont in enumerate(conts):
    row = prompt + cont
    tokens[i, :len(row)] = row
    valid[i, :len(row)] = True
    # Position j predicts token j+1: the choice's tokens are predicted from len(prompt)-1 on.
    weights[i, len(prompt) - 1:len(row) - 1] = 1.0
  nll, count = scorer(tokens, weights, valid)
  return -nll / np.maximum(count, 1.0) if normalize else -nll


def evaluate(model: EvalModel, items: list[dict], *, normalize: bool = False, progress: bool = True) -> dict:
  """Accuracy over `items`, per subject when items have one, and each item's predicted index."""
  scorer = SegmentScorer(model.cfg, model.variables)
  right = collections.Counter()
  seen = collections.Counter()
  predictions = []
  for item in tqdm(items, desc=f"multiple choice {model.name}", unit="item", disable=not progress):
    scores = choice_scores(scorer, model.tokenizer, item["question"], item["choices"], normalize)
    pick = int(np.argmax(scores))
    predictions.append(pick)
    for key in ("__all__", item["subject"]):
      if key is not None:
        seen[key] += 1
        right[key] += int(pick == item["answer"])
  subjects = {k: right[k] / seen[k] for k in sorted(seen) if k != "__all__"}
  return {"accuracy": right["__all__"] / seen["__all__"], "items": seen["__all__"],
          "by_subject": subjects, "predictions": predictions}


def format_result(name: str, result: dict) -> str:
  lines = [f"{name}: multiple-choice accuracy {100 * result['accuracy']:.1f}% over {result['items']} items"]
  for subject, acc in result["by_subject"].items():
    lines.append(f"  {subject}: {100 * acc:.1f}%")
  return "\n".join(lines)
