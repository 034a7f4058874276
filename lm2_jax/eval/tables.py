"""BABILong result tables: text (task x length, with the paper's averages), JSON, and a PNG heatmap.

The paper reports, per length, the mean accuracy over qa1-qa10, and one "8K-64K" column: the mean of the
8k, 16k, 32k and 64k averages. Lengths at which a model's contexts were truncated are marked with `*`
and explained under its table.
"""

from __future__ import annotations

import json
import math
import pathlib
from typing import Sequence

import numpy as np

from lm2_jax.eval.babilong_eval import ModelReport, accuracy_matrix, report_dict

LONG_LENGTHS = ("8k", "16k", "32k", "64k")
LONG_COLUMN = "8k-64k"


def length_averages(matrix: np.ndarray, lengths: Sequence[str]) -> dict[str, float]:
  """{length: mean over tasks} plus "8k-64k" (mean of those lengths' averages) when any is present."""
  out = {}
  for j, length in enumerate(lengths):
    column = matrix[:, j]
    out[length] = float(np.nanmean(column)) if np.isfinite(column).any() else math.nan
  long = [out[n] for n in LONG_LENGTHS if n in out and math.isfinite(out[n])]
  if long:
    out[LONG_COLUMN] = float(np.mean(long))
  return out


def truncated_lengths(report: ModelReport) -> list[str]:
  """Lengths at which at least one of the model's contexts was cut."""
  return sorted({length for (_, length), cell in report.cells.items() if cell.truncated},
                key=lambda n: int(n[:-1]))


def _pct(x: float) -> str:
  return "  -  " if not math.isfinite(x) else f"{100 * x:5.1f}"


def format_table(report: ModelReport, tasks: Sequence[str], lengths: Sequence[str]) -> str:
  """One model's task x length accuracy table (%), with the average row and the 8k-64k column."""
  matrix = accuracy_matrix(report, tasks, lengths)
  cut = set(truncated_lengths(report))
  averages = length_averages(matrix, lengths)
  columns = [n + ("*" if n in cut else "") for n in lengths]
  has_long = LONG_COLUMN in averages
  header = ["task".ljust(6)] + [c.rjust(6) for c in columns] + ([LONG_COLUMN.rjust(7)] if has_long else [])
  title = f"{report.name}" + (f" (step {report.step})" if report.step is not None else "")
  lines = [title, " ".join(header)]
  for i, task in enumerate(tasks):
    cells = [_pct(matrix[i, j]).rjust(6) for j in range(len(lengths))]
    if has_long:
      long = [matrix[i, j] for j, n in enumerate(lengths) if n in LONG_LENGTHS and math.isfinite(matrix[i, j])]
      cells.append(_pct(float(np.mean(long)) if long else math.nan).rjust(7))
    lines.append(" ".join([task.ljust(6)] + cells))
  avg = [_pct(averages[n]).rjust(6) for n in lengths] + ([_pct(averages[LONG_COLUMN]).rjust(7)]
                                                          if has_long else [])
  lines.append(" ".join(["avg".ljust(6)] + avg))
  if cut:
    lines.append(f"* memory-less model: contexts longer than {report.max_context} tokens (its training "
                 f"context minus the question segment) were truncated to their last {report.max_context} "
                 "tokens")
  return "\n".join(lines)


def format_comparison(reports: Sequence[ModelReport], tasks: Sequence[str], lengths: Sequence[str]) -> str:
  """Models x lengths: the qa-average per length (the paper's headline table)."""
  rows = [(r.name, length_averages(accuracy_matrix(r, tasks, lengths), lengths), set(truncated_lengths(r)))
          for r in reports]
  columns = list(lengths) + ([LONG_COLUMN] if any(LONG_COLUMN in a for _, a, _ in rows) else [])
  width = max(len("model"), *(len(name) for name, _, _ in rows))
  lines = [f"average over {', '.join(tasks)} (accuracy %, * = truncated context)",
           " ".join(["model".ljust(width)] + [c.rjust(7) for c in columns])]
  for name, averages, cut in rows:
    cells = [(_pct(averages.get(c, math.nan)) + ("*" if c in cut else " ")).rjust(7) for c in columns]
    lines.append(" ".join([name.ljust(width)] + cells))
  return "\n".join(lines)


def results_json(reports: Sequence[ModelReport], tasks: Sequence[str], lengths: Sequence[str]) -> dict:
  """Everything the tables show, per model, plus the averages and truncated lengths."""
  models = {}
  for r in reports:
    entry = report_dict(r)
    entry["average"] = length_averages(accuracy_matrix(r, tasks, lengths), lengths)
    entry["truncated_lengths"] = truncated_lengths(r)
    models[r.name] = entry
  return {"tasks": list(tasks), "lengths": list(lengths), "models": models}


def write_json(data: dict, path: str | pathlib.Path) -> None:
  """JSON with NaN written as null (strict JSON readers reject NaN)."""
  def clean(x):
    if isinstance(x, float) and not math.isfinite(x):
      return None
    if isinstance(x, dict):
      return {k: clean(v) for k, v in x.items()}
    if isinstance(x, (list, tuple)):
      return [clean(v) for v in x]
    return x
  pathlib.Path(path).write_text(json.dumps(clean(data), indent=2))


def heatmap(reports: Sequence[ModelReport], tasks: Sequence[str], lengths: Sequence[str],
            path: str | pathlib.Path) -> None:
  """One task x length accuracy heatmap per model, side by side, annotated with the values (%).

  The panels share the task axis, labelled once on the left; each panel is wide enough for its cells and
  its title (the model name), and the figure is laid out (`constrained`) so that no label overlaps another
  panel or leaves the image, with any number of models.
  """
  import matplotlib  # pylint: disable=g-import-not-at-top
  matplotlib.use("Agg")
  import matplotlib.pyplot as plt  # pylint: disable=g-import-not-at-top

  n = len(reports)
  longest_name = max(len(r.name) for r in reports)
  # Inches: a cell holds "100" and a "128k*" tick; a title of ~11 characters per inch at 10 pt.
  panel_width = max(0.6 * len(lengths), 0.1 * longest_name + 0.2, 1.4)
  fig, axes = plt.subplots(1, n, sharey=True, squeeze=False, layout="constrained",
                           figsize=(0.8 + panel_width * n + 1.1, 0.45 * len(tasks) + 1.6))
  image = None
  for k, (ax, report) in enumerate(zip(axes[0], reports)):
    matrix = accuracy_matrix(report, tasks, lengths) * 100
    image = ax.imshow(np.ma.masked_invalid(matrix), vmin=0, vmax=100, cmap="viridis", aspect="auto")
    cut = set(truncated_lengths(report))
    ax.set_xticks(range(len(lengths)), [n + ("*" if n in cut else "") for n in lengths])
    ax.set_yticks(range(len(tasks)), list(tasks))
    ax.tick_params(axis="y", labelleft=k == 0)
    ax.set_title(report.name, fontsize=10)
    ax.set_xlabel("context length")
    for i in range(len(tasks)):
      for j in range(len(lengths)):
        if math.isfinite(matrix[i, j]):
          ax.text(j, i, f"{matrix[i, j]:.0f}", ha="center", va="center",
                  color="black" if matrix[i, j] > 60 else "white", fontsize=8)
  fig.colorbar(image, ax=axes[0].tolist(), label="accuracy %")
  fig.savefig(path, dpi=100)
  plt.close(fig)
