"""Held-out evaluation: token loss/accuracy, and for QA rows answer accuracy by fact distance.

A QA row is answered correctly when every answer token (the loss mask of a held-out QA row, which is
always the answer) is predicted right. Its distance is `question_segment - fact_segment`: how many
segments back the memory had to carry the supporting fact. Recall rows also say whether the asked key was
`overwritten` (assigned more than once in the row), and accuracy is split by that too. With LM2 memory the
eval step also returns per-block memory diagnostics (`lm2_jax.train.diagnostics`), averaged here.
"""

from __future__ import annotations

import json
import pathlib
from collections import defaultdict
from typing import Callable, Iterable

import jax
import numpy as np

QA_KEYS = ("fact_segment", "question_segment", "last_fact_supports", "overwritten")


def evaluate(eval_fn: Callable[[dict], dict], batches: Iterable[dict]) -> dict:
  """Runs `eval_fn` (numpy batch -> per-row stats) over `batches` and aggregates.

  Returns:
    {"loss", "accuracy", "num_samples"} and, when the batches carry QA fields, "answer_accuracy",
    "accuracy_by_distance" ({"<segments back>": accuracy}) and "accuracy_last_fact_elsewhere" (rows
    whose story ends with a sentence that is not the supporting fact: the recency-shortcut check); with
    `overwritten` in the batches, "accuracy_overwritten" and "accuracy_not_overwritten" (each only when
    that group has rows); when `eval_fn` returns "memory" (per block and name, per-row (sum, weight)),
    "memory": {"block<i>": {name: total sum / total weight}} (names whose weight stayed 0 left out).
  """
  nll = weight = correct = 0.0
  rows = 0
  right_by_distance: dict[int, list[int]] = defaultdict(lambda: [0, 0])
  elsewhere = [0, 0]
  by_overwrite = {True: [0, 0], False: [0, 0]}  # overwritten? -> [right, rows]
  qa = False
  memory: dict[str, dict[str, list[float]]] = defaultdict(lambda: defaultdict(lambda: [0.0, 0.0]))
  for batch in batches:
    stats = jax.device_get(eval_fn(batch))
    for block, named in stats.get("memory", {}).items():
      for name, (row_sum, row_weight) in named.items():
        memory[block][name][0] += float(np.sum(row_sum))
        memory[block][name][1] += float(np.sum(row_weight))
    nll += float(np.sum(stats["nll_sum"]))
    weight += float(np.sum(stats["weight_sum"]))
    correct += float(np.sum(stats["correct_sum"]))
    rows += len(stats["nll_sum"])
    if all(k in batch for k in QA_KEYS[:2]):
      qa = True
      answered = (stats["weight_sum"] > 0) & (stats["correct_sum"] == stats["weight_sum"])
      distance = np.asarray(batch["question_segment"]) - np.asarray(batch["fact_segment"])
      for d, ok in zip(distance.tolist(), answered.tolist()):
        right_by_distance[d][0] += int(ok)
        right_by_distance[d][1] += 1
      if "last_fact_supports" in batch:
        off = np.asarray(batch["last_fact_supports"]) == 0
        elsewhere[0] += int(np.sum(answered & off))
        elsewhere[1] += int(np.sum(off))
      if "overwritten" in batch:
        for flag, ok in zip((np.asarray(batch["overwritten"]) != 0).tolist(), answered.tolist()):
          by_overwrite[flag][0] += int(ok)
          by_overwrite[flag][1] += 1
  out = {"loss": nll / max(weight, 1.0), "accuracy": correct / max(weight, 1.0), "num_samples": rows}
  if memory:
    out["memory"] = {block: {name: s / w for name, (s, w) in sorted(named.items()) if w > 0}
                     for block, named in sorted(memory.items())}
  if qa:
    total_right = sum(r for r, _ in right_by_distance.values())
    out["answer_accuracy"] = total_right / max(rows, 1)
    out["accuracy_by_distance"] = {str(d): r / n for d, (r, n) in sorted(right_by_distance.items())}
    if elsewhere[1]:
      out["accuracy_last_fact_elsewhere"] = elsewhere[0] / elsewhere[1]
    for flag, name in ((True, "accuracy_overwritten"), (False, "accuracy_not_overwritten")):
      if by_overwrite[flag][1]:
        out[name] = by_overwrite[flag][0] / by_overwrite[flag][1]
  return out


def final_report(result: dict, use_memory: bool, chance: float | None = None) -> dict:
  """The final_eval.json payload; `accuracy` is answer accuracy for QA runs, token accuracy otherwise.

  Args:
    result: `evaluate`'s output.
    use_memory: recorded beside the figures.
    chance: answer accuracy of a uniform guess (`inputs.chance_level`), recorded when given.
  The memory diagnostics, when evaluated, are `memory`: {"block<i>": {name: value}}.
  """
  report = {
      "accuracy": result.get("answer_accuracy", result["accuracy"]),
      "token_accuracy": result["accuracy"],
      "loss": result["loss"],
      "accuracy_by_distance": result.get("accuracy_by_distance", {}),
      "accuracy_last_fact_elsewhere": result.get("accuracy_last_fact_elsewhere"),
      "num_samples": result["num_samples"],
      "use_memory": use_memory,
  }
  for key in ("accuracy_overwritten", "accuracy_not_overwritten", "memory"):
    if key in result:
      report[key] = result[key]
  if chance is not None:
    report["chance"] = chance
  return report


def write_json(path: str | pathlib.Path, payload: dict) -> None:
  pathlib.Path(path).write_text(json.dumps(payload, indent=2, sort_keys=True) + "\n")


def read_report(run_dir: str | pathlib.Path) -> dict | None:
  path = pathlib.Path(run_dir) / "final_eval.json"
  if not path.is_file():
    return None
  return json.loads(path.read_text())


def comparison_table(reports: dict[str, dict]) -> str:
  """A text table of answer accuracy (overall, by distance, by group; chance), one column per named report.

  The `last fact elsewhere`, `overwritten`, `not overwritten` and `chance` rows appear when some report has
  that figure.
  """
  names = list(reports)
  distances = sorted({d for r in reports.values() for d in r.get("accuracy_by_distance", {})}, key=int)
  width = max([12] + [len(n) for n in names]) + 2
  lines = ["".ljust(22) + "".join(n.rjust(width) for n in names)]
  def row(label, values):
    return label.ljust(22) + "".join(
        (f"{v:.3f}" if v is not None else "-").rjust(width) for v in values)
  lines.append(row("accuracy", [reports[n]["accuracy"] for n in names]))
  for d in distances:
    lines.append(row(f"  {d} segment(s) back", [reports[n].get("accuracy_by_distance", {}).get(d)
                                                for n in names]))
  for label, key in (("last fact elsewhere", "accuracy_last_fact_elsewhere"),
                     ("overwritten", "accuracy_overwritten"), ("not overwritten", "accuracy_not_overwritten"),
                     ("chance", "chance")):
    if any(r.get(key) is not None for r in reports.values()):  # rows only for the fields some run has
      lines.append(row(label, [reports[n].get(key) for n in names]))
  lines.append("".ljust(22) + "".join(str(reports[n]["num_samples"]).rjust(width) for n in names)
               + "  samples")
  return "\n".join(lines)
