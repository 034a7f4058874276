"""A sweep: one base experiment, named cells of dotted overrides, seeds; each cell a real `train.py` run.

    python -m lm2_jax.sweep configs/sweep/NAME.yaml [--jobs N] [--cells a,b] [--dry-run] [--table]
        [key=value ...]

A sweep file:

    name: memory-qa1-bound              # runs go to <runs_dir>/<name>/<cell>-s<seed>/
    base: ../experiment/qa1-bound.yaml  # the experiment every cell starts from (relative to this file)
    overrides: [train.steps=800]        # applied to every cell
    seeds: [0]                          # train.seed and data.seed of each repeat
    twins: [full, nomem]                # cells marked as calibration twins in the table
    cells:
      full: [model.use_memory=false, model.attention=full]
      keyed: [model.memory_write=keyed, model.memory_init=zeros]

Each cell runs as `python train.py --config BASE <overrides> <cell overrides> <command-line overrides>
train.seed=S data.seed=S name=<cell>-s<S> runs_dir=<runs_dir>/<sweep>`. A cell whose run directory has a
`final_eval.json` is finished and skipped; an interrupted one resumes from its own checkpoint (train.py
does that by itself). `--dry-run` prints one command per cell (for a cluster scheduler); `--table`
rebuilds the comparison table (Markdown, JSON and a bar plot, `<runs_dir>/<sweep>/table.{md,json,png}`)
from finished runs. Progress prints cells done / left and each cell's wall time.
"""

from __future__ import annotations

import argparse
import concurrent.futures
import json
import pathlib
import shlex
import statistics
import subprocess
import sys
import time

from lm2_jax.train import evaluate as eval_lib
from lm2_jax.train.config import ConfigError, read_yaml

TRAIN = str(pathlib.Path(__file__).resolve().parents[1] / "train.py")
# final_eval.json fields tabulated, in order (a column appears when any run has it).
FIELDS = ("accuracy", "accuracy_last_fact_elsewhere", "accuracy_overwritten",
          "accuracy_not_overwritten", "chance", "loss")


def load_sweep(path: str | pathlib.Path) -> dict:
  """The sweep file as a checked mapping; ConfigError names the file and the bad key."""
  path = pathlib.Path(path)
  data = read_yaml(path)
  known = {"name", "base", "overrides", "seeds", "cells", "twins", "runs_dir"}
  unknown = sorted(set(data) - known)
  if unknown:
    raise ConfigError(f"{path}: unknown key(s) {unknown}; known keys: {sorted(known)}")
  for key in ("name", "base", "cells"):
    if key not in data:
      raise ConfigError(f"{path}: missing `{key}`")
  if not isinstance(data["cells"], dict) or not data["cells"]:
    raise ConfigError(f"{path}: `cells` must be a non-empty mapping of name -> list of overrides")
  for cell, overrides in data["cells"].items():
    if not isinstance(overrides, list) or not all(isinstance(o, str) and "=" in o for o in overrides):
      raise ConfigError(f"{path}: cells.{cell} must be a list of dotted key=value strings")
  seeds = data.get("seeds", [0])
  if not isinstance(seeds, list) or not all(isinstance(s, int) for s in seeds):
    raise ConfigError(f"{path}: `seeds` must be a list of integers, got {seeds!r}")
  return {"name": data["name"], "base": str((path.parent / data["base"]).resolve()),
          "overrides": list(data.get("overrides", [])), "seeds": seeds, "cells": data["cells"],
          "twins": list(data.get("twins", [])), "runs_dir": data.get("runs_dir", "runs")}


def cell_runs(sweep: dict, extra: list[str]) -> list[tuple[str, int, pathlib.Path, list[str]]]:
  """(cell, seed, run directory, train.py command) of every run of the sweep, in file order."""
  root = pathlib.Path(sweep["runs_dir"]) / sweep["name"]
  out = []
  for cell, overrides in sweep["cells"].items():
    for seed in sweep["seeds"]:
      name = f"{cell}-s{seed}"
      cmd = [sys.executable, TRAIN, "--config", sweep["base"], *sweep["overrides"], *overrides, *extra,
             f"train.seed={seed}", f"data.seed={seed}", f"name={name}", f"runs_dir={root}"]
      out.append((cell, seed, root / name, cmd))
  return out


def _run(cmd: list[str], run_dir: pathlib.Path) -> tuple[int, float]:
  run_dir.mkdir(parents=True, exist_ok=True)
  t0 = time.perf_counter()
  with open(run_dir / "sweep.log", "ab") as log:
    rc = subprocess.call(cmd, stdout=log, stderr=subprocess.STDOUT)
  return rc, time.perf_counter() - t0


def table(sweep: dict, runs) -> dict:
  """Per cell: mean and spread (min..max) over seeds of every FIELDS value and of accuracy by distance."""
  rows = {}
  for cell, _, run_dir, _ in runs:
    report = eval_lib.read_report(run_dir)
    if report is None:
      continue
    row = rows.setdefault(cell, {"seeds": 0, "values": {}})
    row["seeds"] += 1
    values = {k: report[k] for k in FIELDS if report.get(k) is not None}
    values.update({f"{d} back": a for d, a in report.get("accuracy_by_distance", {}).items()})
    for k, v in values.items():
      row["values"].setdefault(k, []).append(v)
  return {cell: {"seeds": r["seeds"], "twin": cell in sweep["twins"],
                 **{k: {"mean": statistics.fmean(v), "min": min(v), "max": max(v)}
                    for k, v in r["values"].items()}}
          for cell, r in rows.items()}


def markdown(result: dict) -> str:
  columns = []
  for r in result.values():
    columns += [k for k in r if k not in ("seeds", "twin") and k not in columns]
  lines = ["| cell | seeds | " + " | ".join(c.replace("accuracy_", "") for c in columns) + " |",
           "|---" * (len(columns) + 2) + "|"]
  for cell, r in result.items():
    cells = []
    for c in columns:
      v = r.get(c)
      if v is None:
        cells.append("")
      elif r["seeds"] > 1:
        cells.append(f"{v['mean']:.3f} ({v['min']:.3f}-{v['max']:.3f})")
      else:
        cells.append(f"{v['mean']:.3f}")
    name = f"{cell} (twin)" if r["twin"] else cell
    lines.append(f"| {name} | {r['seeds']} | " + " | ".join(cells) + " |")
  return "\n".join(lines)


def plot(result: dict, path: pathlib.Path, title: str) -> list[tuple[str, float, float, float]]:
  """A bar per cell of its mean held-out accuracy, whiskers from the lowest to the highest seed, twins
  hatched, chance dashed; written to `path` (PNG). Returns the bars drawn: (cell, mean, min, max)."""
  import matplotlib  # pylint: disable=g-import-not-at-top
  matplotlib.use("Agg")
  import matplotlib.pyplot as plt  # pylint: disable=g-import-not-at-top

  bars = [(cell, r["accuracy"]["mean"], r["accuracy"]["min"], r["accuracy"]["max"])
          for cell, r in result.items() if "accuracy" in r]
  fig, ax = plt.subplots(figsize=(max(4.0, 0.5 * len(bars) + 1.5), 3.5))
  for i, (cell, mean, lo, hi) in enumerate(bars):
    twin = result[cell]["twin"]
    ax.bar(i, mean, color="lightgray" if twin else "tab:blue", hatch="//" if twin else None,
           edgecolor="black", linewidth=0.5)
    ax.errorbar(i, mean, yerr=[[mean - lo], [hi - mean]], color="black", capsize=3)
  chances = {r["chance"]["mean"] for r in result.values() if "chance" in r}
  if len(chances) == 1:
    ax.axhline(chances.pop(), color="red", linestyle="--", linewidth=1, label="chance")
    ax.legend(loc="upper right", fontsize=8)
  ax.set_xticks(range(len(bars)), [b[0] for b in bars], rotation=60, ha="right", fontsize=8)
  ax.set_ylabel("held-out answer accuracy")
  ax.set_ylim(0, 1)
  ax.set_title(f"{title} (mean, min..max over seeds)", fontsize=9)
  fig.tight_layout()
  fig.savefig(path, dpi=120)
  plt.close(fig)
  return bars


def write_table(sweep: dict, runs) -> str:
  """Writes <runs_dir>/<sweep>/table.{md,json,png} from the finished runs; returns the Markdown."""
  result = table(sweep, runs)
  root = pathlib.Path(sweep["runs_dir"]) / sweep["name"]
  root.mkdir(parents=True, exist_ok=True)
  text = markdown(result)
  (root / "table.md").write_text(text + "\n")
  eval_lib.write_json(root / "table.json", result)
  if any("accuracy" in r for r in result.values()):
    plot(result, root / "table.png", sweep["name"])
  return text


def main(argv=None) -> int:
  parser = argparse.ArgumentParser(prog="python -m lm2_jax.sweep", description=__doc__.split("\n")[0])
  parser.add_argument("sweep", help="the sweep YAML file")
  parser.add_argument("overrides", nargs="*", help="dotted key=value overrides for every cell")
  parser.add_argument("--jobs", type=int, default=1, help="cells run at once (default 1)")
  parser.add_argument("--dry-run", action="store_true", help="print one train.py command per cell")
  parser.add_argument("--table", action="store_true", help="only rebuild the table of finished runs")
  parser.add_argument("--cells", default="", help="comma-separated cells to run (default: all)")
  args = parser.parse_intermixed_args(argv)
  try:
    sweep = load_sweep(args.sweep)
  except ConfigError as e:
    print(f"error: {e}", file=sys.stderr)
    return 2
  runs = cell_runs(sweep, args.overrides)
  if args.cells:
    wanted = [c.strip() for c in args.cells.split(",") if c.strip()]
    unknown = sorted(set(wanted) - set(sweep["cells"]))
    if unknown:
      print(f"error: --cells {unknown} not in {args.sweep}; its cells: {list(sweep['cells'])}",
            file=sys.stderr)
      return 2
    runs = [r for r in runs if r[0] in wanted]
  if args.dry_run:
    for _, _, _, cmd in runs:
      print(shlex.join(cmd))
    return 0
  todo = [r for r in runs if args.table is False and eval_lib.read_report(r[2]) is None]
  print(f"{sweep['name']}: {len(runs)} runs, {len(runs) - len(todo)} finished, {len(todo)} to run",
        flush=True)
  failed = 0
  with concurrent.futures.ThreadPoolExecutor(max(1, args.jobs)) as pool:
    futures = {pool.submit(_run, cmd, run_dir): (cell, seed, run_dir) for cell, seed, run_dir, cmd in todo}
    for done, future in enumerate(concurrent.futures.as_completed(futures), 1):
      cell, seed, run_dir = futures[future]
      rc, seconds = future.result()
      if rc == 0 and eval_lib.read_report(run_dir) is not None:
        status = "ok"
      elif rc == 0:  # train.py saves and exits 0 on SIGTERM (a preemption): the run is not finished
        status = "STOPPED before its final evaluation (no final_eval.json; rerun to resume)"
      else:
        status = f"FAILED (exit {rc}; see {run_dir / 'sweep.log'})"
      failed += status != "ok"
      print(f"[{done}/{len(todo)}] {cell} seed {seed}: {status} in {seconds:.0f} s", flush=True)
  print(write_table(sweep, runs))
  return 1 if failed else 0


if __name__ == "__main__":
  sys.exit(main())
