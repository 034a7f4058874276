"""BABILong evaluation: stream every sample's context through the model, generate the answer, score it.

Samples come from a JSONL file written by `python -m lm2_jax.data.babilong` (or are built on the fly with
the same builder). The samples of one (task, length) are batched: contexts are left-padded to a whole
number of segments (`streaming.build_qa_batch`). A memory-less model sees at most the context it was
trained on: longer contexts are cut to their last tokens, and the report records it per length.
"""

from __future__ import annotations

import collections
import dataclasses
import json
import math
import pathlib
from typing import Iterable, Sequence

import numpy as np
from tqdm import tqdm

from lm2_jax.data import babi, babilong
from lm2_jax.eval import jsonl, scoring, streaming
from lm2_jax.eval.checkpoints import EvalModel
from lm2_jax.model.decode import Decoder

REQUIRED_KEYS = {"task": str, "length": str, "input": str, "question": str, "answer": str}


class EvalDataError(ValueError):
  """A malformed evaluation file (the message names the file and line)."""


def read_jsonl(path: str | pathlib.Path) -> list[dict]:
  """BABILong rows of a JSONL file, each checked for the keys and values evaluation needs.

  Raises:
    FileNotFoundError: no such file.
    EvalDataError: a line that is not a JSON object, lacks a key, or names an unknown task or length.
  """
  path = pathlib.Path(path)
  if not path.is_file():
    raise FileNotFoundError(f"BABILong data file {path} does not exist; build one with "
                            "`python -m lm2_jax.data.babilong --tasks ... --lengths ... --out FILE`")
  rows = []
  for where, row in jsonl.iter_objects(path, EvalDataError):
    for key, kind in REQUIRED_KEYS.items():
      if not isinstance(row.get(key), kind):
        raise EvalDataError(f"{where}: key {key!r} must be a {kind.__name__} (needs keys "
                            f"{sorted(REQUIRED_KEYS)}), got {row.get(key)!r}")
    try:
      babi.check_task(row["task"])
      babilong.check_length(row["length"])
    except ValueError as e:
      raise EvalDataError(f"{where}: {e}") from None
    rows.append(row)
  if not rows:
    raise EvalDataError(f"{path}: no samples")
  return rows


def build_rows(tasks: Sequence[str], lengths: Sequence[str], samples: int, seed: int, tokenizer,
               split: str = "test") -> list[dict]:
  """Builds `samples` rows per (task, length) with the BABILong builder (the template filler)."""
  rows, _ = babilong.build_set(tasks, lengths, samples, seed, tokenizer, split=split)
  return [r.to_json() for r in rows]


def select(rows: Iterable[dict], tasks: Sequence[str] | None, lengths: Sequence[str] | None) -> list[dict]:
  """The rows of the asked tasks and lengths (None: any); asking for what the rows lack is an error.

  With both given, every (task, length) must have a row; with one, each of its values must.
  """
  rows = [r for r in rows if (not tasks or r["task"] in tasks) and (not lengths or r["length"] in lengths)]
  present = {(r["task"], r["length"]) for r in rows}
  if tasks and lengths:
    missing = [f"{t} {n}" for t in tasks for n in lengths if (t, n) not in present]
  else:
    missing = ([t for t in tasks or [] if t not in {task for task, _ in present}]
               + [n for n in lengths or [] if n not in {length for _, length in present}])
  if missing:
    raise EvalDataError(f"the data has no samples for: {', '.join(missing)}")
  if not rows:
    raise EvalDataError("no samples left after selecting tasks and lengths")
  return rows


@dataclasses.dataclass
class Cell:
  """Counts of one (task, length): correct answers, samples, samples whose context was truncated."""

  correct: int = 0
  total: int = 0
  truncated: int = 0

  @property
  def accuracy(self) -> float:
    return self.correct / self.total if self.total else math.nan


@dataclasses.dataclass
class ModelReport:
  """One model's BABILong results.

  Attributes:
    name, source, step: which model.
    max_context: context tokens it was allowed to see (None: all of them, streamed through memory).
    cells: {(task, length): Cell}.
    predictions: one record per sample (task, length, question, answer, prediction, correct, truncated).
  """

  name: str
  source: str
  step: int | None
  max_context: int | None
  cells: dict = dataclasses.field(default_factory=dict)
  predictions: list = dataclasses.field(default_factory=list)


def context_limit(model: EvalModel, override: int | None = None) -> int | None:
  """Context tokens a model may see: all (memory models), else its training context minus the question.

  A memory-less model never saw more than `trained_length` tokens; with `full` attention it cannot
  position more, with `segment` attention it only reads the question's segment anyway (the cut changes
  nothing but the time spent). `override` wins when given.
  """
  t = model.cfg.segment_length
  if override is not None:
    return override
  if model.cfg.use_memory:
    return None
  if model.trained_length is None:
    if model.cfg.attention == "full":
      raise ValueError(f"{model.name}: a full-attention model needs its training context length; the "
                       "checkpoint's config does not say it: pass --max-context TOKENS")
    return None
  return max(model.trained_length - t, 0)


def max_answer_tokens(task: str, answers: Sequence[str], tokenizer) -> int:
  """Generation budget: the longest answer of the task (or of these rows) plus EOS."""
  vocab = list(babi.answer_vocab(task)) + list(answers)
  return max(len(tokenizer.encode(a)) for a in vocab) + 1


def evaluate(model: EvalModel, rows: Sequence[dict], *, batch_size: int = 8,
             max_context: int | None = None, temperature: float = 0.0, top_k: int | None = None,
             top_p: float | None = None, seed: int = 0, progress: bool = True) -> ModelReport:
  """Answers every row with `model` and scores it (see the module docstring).

  Args:
    model: the loaded model.
    rows: BABILong rows (`read_jsonl` / `build_rows`).
    batch_size: samples of one (task, length) streamed together.
    max_context: overrides `context_limit`.
    temperature, top_k, top_p, seed: sampling (temperature 0 = greedy).
    progress: show a tqdm bar over samples.
  """
  import jax  # pylint: disable=g-import-not-at-top

  tok, cfg = model.tokenizer, model.cfg
  limit = context_limit(model, max_context)
  report = ModelReport(model.name, model.source, model.step, limit)
  groups = collections.defaultdict(list)
  for row in rows:
    groups[(row["task"], row["length"])].append(row)
  max_length = None
  if cfg.attention == "full":
    longest = max(len(tok.encode(r["input"] + " ")) for r in rows)
    cap = limit if limit is not None else -(-longest // cfg.segment_length) * cfg.segment_length
    max_length = cap + cfg.segment_length
  decoder = Decoder(cfg, model.variables, max_length=max_length)
  rng = jax.random.key(seed)
  bar = tqdm(total=len(rows), desc=f"BABILong {model.name}", unit="sample", disable=not progress)
  for (task, length), group in groups.items():
    encoded = [(tok.encode(r["input"] + " "), tok.encode(r["question"]), r) for r in group]
    encoded.sort(key=lambda e: len(e[0]))   # similar lengths share a batch: less padding
    budget = max_answer_tokens(task, [r["answer"] for r in group], tok)
    cell = report.cells.setdefault((task, length), Cell())
    for start in range(0, len(encoded), batch_size):
      chunk = encoded[start:start + batch_size]
      batch = streaming.build_qa_batch(
          [c for c, _, _ in chunk], [q for _, q, _ in chunk], segment_length=cfg.segment_length,
          max_new_tokens=budget, pad_id=tok.pad_id, sep_id=tok.sep_id, max_context=limit)
      rng, key = jax.random.split(rng)
      bar.set_postfix_str(f"{task} {length}")
      answers = streaming.answer(decoder, batch, max_new_tokens=budget, eos_id=tok.eos_id,
                                 temperature=temperature, top_k=top_k, top_p=top_p, rng=key)
      for (_, _, row), ids, cut in zip(chunk, answers, batch.truncated.tolist()):
        prediction = tok.decode(ids)
        ok = scoring.exact_match(prediction, row["answer"], task)
        cell.correct += int(ok)
        cell.total += 1
        cell.truncated += int(cut)
        report.predictions.append({"task": task, "length": length, "question": row["question"],
                                   "answer": row["answer"], "prediction": prediction, "correct": ok,
                                   "truncated": bool(cut)})
      bar.update(len(chunk))
  bar.close()
  return report


def report_dict(report: ModelReport) -> dict:
  """A JSON-ready view of one report: accuracy[task][length], counts, truncation."""
  accuracy, counts = collections.defaultdict(dict), collections.defaultdict(dict)
  for (task, length), cell in report.cells.items():
    accuracy[task][length] = cell.accuracy
    counts[task][length] = {"correct": cell.correct, "total": cell.total, "truncated": cell.truncated}
  return {"source": report.source, "step": report.step, "max_context": report.max_context,
          "accuracy": dict(accuracy), "counts": dict(counts)}


def write_predictions(report: ModelReport, path: str | pathlib.Path) -> None:
  """One JSON line per sample: what was asked, expected and generated."""
  with open(path, "w", encoding="utf-8") as f:
    for record in report.predictions:
      f.write(json.dumps(record) + "\n")


def accuracy_matrix(report: ModelReport, tasks: Sequence[str], lengths: Sequence[str]) -> np.ndarray:
  """float [tasks, lengths] accuracies (NaN where a cell has no samples)."""
  out = np.full((len(tasks), len(lengths)), np.nan)
  for i, task in enumerate(tasks):
    for j, length in enumerate(lengths):
      cell = report.cells.get((task, length))
      if cell is not None:
        out[i, j] = cell.accuracy
  return out
