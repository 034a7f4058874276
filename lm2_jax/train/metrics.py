"""Metric sinks (metrics.jsonl, TensorBoard), the console progress bar, and MFU bookkeeping."""

from __future__ import annotations

import json
import logging
import math
import pathlib
import time

import jax
import jax.numpy as jnp
import tqdm

log = logging.getLogger(__name__)


class MetricsWriter:
  """Appends one JSON line per (step, split) to `<run_dir>/metrics.jsonl` and mirrors it to TensorBoard.

  A resumed run writes to the same files, so the history of a run survives restarts, and every step is
  in it once: a run that (re)starts at `start_step` drops the rows of later steps, which an earlier attempt
  wrote before it stopped or fell back to an older checkpoint, and a `final_eval` row at `start_step`
  (rewritten when that run ends there); TensorBoard purges those steps' events likewise.
  """

  def __init__(self, run_dir: str | pathlib.Path, tensorboard: bool = True, enabled: bool = True,
               start_step: int = 0):
    self.path = pathlib.Path(run_dir) / "metrics.jsonl"
    self.enabled = enabled
    self._file = self._tb = None
    if not enabled:
      return
    _truncate(self.path, start_step)
    self._file = open(self.path, "a", encoding="utf-8")  # pylint: disable=consider-using-with
    if tensorboard:
      import tensorboardX  # pylint: disable=g-import-not-at-top

      self._tb = tensorboardX.SummaryWriter(str(pathlib.Path(run_dir) / "tensorboard"),
                                            purge_step=start_step + 1)

  def __enter__(self) -> "MetricsWriter":
    return self

  def __exit__(self, *exc) -> None:
    self.close()

  def write(self, step: int, metrics: dict, split: str = "train") -> None:
    if not self.enabled:
      return
    row = {"step": int(step), "split": split}
    row.update({k: float(v) for k, v in metrics.items()})
    try:
      self._file.write(json.dumps(row) + "\n")
      self._file.flush()
    except OSError as e:  # a full disk: name the file (a resume drops a row cut short here)
      raise OSError(e.errno, e.strerror, str(self.path)) from e
    if self._tb is not None:
      for k, v in metrics.items():
        self._tb.add_scalar(f"{split}/{k}", float(v), int(step))
      self._tb.flush()

  def close(self) -> None:
    if self._file is not None:
      self._file.close()
      self._file = None
    if self._tb is not None:
      self._tb.close()
      self._tb = None


def _truncate(path: pathlib.Path, start_step: int) -> None:
  """Drops the rows of `path` past `start_step` and its final_eval row at `start_step` (atomically)."""
  if not path.is_file():
    return
  lines = path.read_text(encoding="utf-8").splitlines(keepends=True)
  keep = []
  for line in lines:
    try:
      row = json.loads(line)
      step, split = int(row["step"]), row.get("split")
    except (ValueError, KeyError, TypeError):
      continue  # a line cut short by a killed run
    if step < start_step or (step == start_step and split != "final_eval"):
      keep.append(line if line.endswith("\n") else line + "\n")
  if keep != lines:
    scratch = path.with_name(path.name + ".tmp")
    scratch.write_text("".join(keep), encoding="utf-8")
    scratch.replace(path)


def read_metrics(run_dir: str | pathlib.Path, split: str | None = None) -> list[dict]:
  """The rows of a run's metrics.jsonl (optionally one split), in file order.

  A last line cut short (a run killed or out of disk mid-write; its resume drops it) is skipped with a
  warning; a bad line elsewhere is a ValueError naming the file and line.
  """
  path = pathlib.Path(run_dir) / "metrics.jsonl"
  lines = path.read_text(encoding="utf-8").splitlines()
  rows = []
  for number, line in enumerate(lines, start=1):
    if not line.strip():
      continue
    try:
      row = json.loads(line)
      if not isinstance(row, dict) or "step" not in row or "split" not in row:
        raise ValueError("not a metrics row")
    except ValueError as e:
      if number == len(lines):
        log.warning("%s: skipped line %d, cut short (%s)", path, number, e)
        continue
      raise ValueError(f"{path}:{number}: not a metrics row ({e}); the file is damaged") from None
    rows.append(row)
  return [r for r in rows if split is None or r["split"] == split]


def measure_peak_flops(size: int = 1024, repeats: int = 5, dtype="float32") -> float:
  """FLOP/s of a [size, size] matmul of `dtype` on this process's first device, best of `repeats` runs.

  A stand-in for the vendor peak when none is configured; on CPU it is what this machine really
  delivers, so MFU reads as the fraction of attainable matmul throughput. An accelerator needs a larger
  `size` (8192) to reach its peak, and the model's compute dtype (bfloat16) to measure the right one.
  """
  device = jax.local_devices()[0]
  a = jax.device_put(jnp.ones((size, size), dtype), device)
  matmul = jax.jit(lambda x: x @ x)
  matmul(a).block_until_ready()
  best = math.inf
  for _ in range(repeats):
    start = time.perf_counter()
    matmul(a).block_until_ready()
    best = min(best, time.perf_counter() - start)
  return 2.0 * size**3 / best


def total_peak_flops(per_device: float) -> float:
  """Peak FLOP/s of all devices; fake CPU devices share the host's cores, so they count once."""
  if jax.devices()[0].platform == "cpu":
    return per_device * jax.process_count()
  return per_device * jax.device_count()


class Progress:
  """A tqdm bar over optimizer steps (ETA from tqdm), starting at the resumed step."""

  def __init__(self, total: int, initial: int, enabled: bool = True):
    self._bar = tqdm.tqdm(total=total, initial=initial, disable=not enabled, dynamic_ncols=True,
                          unit="step", smoothing=0.1)

  def update(self, steps: int, postfix: dict | None = None) -> None:
    self._bar.update(steps)
    if postfix:
      self._bar.set_postfix({k: f"{v:.4g}" for k, v in postfix.items()}, refresh=False)

  def write(self, message: str) -> None:
    self._bar.write(message)

  def close(self) -> None:
    self._bar.close()
