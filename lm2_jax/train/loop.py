"""The training loop: wire config, mesh, data, state, steps, checkpoints and metrics into one run.

`train(cfg)` is restartable: rerunning the same config resumes from the newest readable checkpoint in
`<runs_dir>/<name>/checkpoints` (state, optimizer, RNG and the data iterator position), and produces the
same losses as a run that was never interrupted. The loop dispatches step n+1 before it reads step n's
metrics, so the host never waits on the device except at logging, checkpoint and evaluation points.

Multi-process runs: every process runs this same loop on its own slice of each batch (see `inputs`);
process 0 alone writes config.yaml, metrics.jsonl, TensorBoard, the progress bar and final_eval.json, and
all processes write each checkpoint together. A stop signal may reach the processes at different steps,
so they agree on stopping (an all-gather of the flag) at logging and checkpoint steps before saving.
"""

from __future__ import annotations

import contextlib
import dataclasses
import logging
import math
import pathlib
import signal
import threading
import time
from typing import Callable

import jax
import numpy as np
from jax.experimental import multihost_utils

from lm2_jax.train import checkpoint as ckpt_lib
from lm2_jax.train import diagnostics as diagnostics_lib
from lm2_jax.train import evaluate as eval_lib
from lm2_jax.train import inputs as inputs_lib
from lm2_jax.train import mesh as mesh_lib
from lm2_jax.train import metrics as metrics_lib
from lm2_jax.train import optimizer as opt_lib
from lm2_jax.train import state as state_lib
from lm2_jax.train import step as step_lib
from lm2_jax.train import validate
from lm2_jax.train import warm_start
from lm2_jax.train.config import RunConfig, save_config

log = logging.getLogger(__name__)


@dataclasses.dataclass
class RunResult:
  """How a call to `train` ended.

  Attributes:
    status: `completed`, `interrupted` (signal or stop request; a checkpoint was saved) or `diverged`
      (non-finite loss; nothing saved after the last good checkpoint).
    step: optimizer steps done when it ended.
    run_dir: the run directory.
    final_eval: the final_eval.json payload (completed runs).
    message: a one-line human summary.
  """

  status: str
  step: int
  run_dir: pathlib.Path
  final_eval: dict | None = None
  message: str = ""


class _StopFlag:
  """Set by SIGTERM / SIGINT; the loop saves a checkpoint and returns at the next step boundary."""

  def __init__(self):
    self.signal_name = None
    self._previous = {}

  def install(self) -> None:
    if threading.current_thread() is not threading.main_thread():
      return
    for sig in (signal.SIGTERM, signal.SIGINT):
      self._previous[sig] = signal.signal(sig, self._handle)

  def _handle(self, signum, frame):
    del frame
    self.signal_name = signal.Signals(signum).name

  def restore(self) -> None:
    for sig, handler in self._previous.items():
      signal.signal(sig, handler)


def _compare_dir(cfg: RunConfig) -> pathlib.Path | None:
  if cfg.compare_to:
    return pathlib.Path(cfg.compare_to)
  sibling = cfg.run_dir.parent / f"{cfg.name}-nomem"
  return sibling if sibling != cfg.run_dir else None


def train(cfg: RunConfig, *, sources=None, stop_requested: Callable[[int], bool] | None = None,
          echo: Callable[[str], None] = print, reshard_data: bool = False) -> RunResult:
  """Trains (or resumes) the run `cfg` describes.

  Args:
    cfg: the resolved run config.
    sources: (train_source, eval_source) row sources to use instead of building them from `cfg.data`.
    stop_requested: polled with the step after every step; True stops like SIGTERM (save, return).
    echo: where human-readable lines go (the console by default); the caller silences it on processes
      other than 0.
    reshard_data: resume a checkpoint written by a different number of processes (see
      `Checkpointer.restore`); without it such a checkpoint is a ConfigError.

  Returns:
    RunResult; `diverged` runs leave the newest good checkpoint in place.

  Raises:
    ConfigError: a config that cannot run (`validate`), raised before any step and before anything is
      written but the data cache.
  """
  model_cfg = cfg.model_config()
  validate.check_config(cfg)
  mesh = mesh_lib.make_mesh(cfg.mesh)
  validate.check_batch_layout(cfg, mesh)
  run_dir = cfg.run_dir
  if sources is None:
    sources = inputs_lib.make_sources(cfg.data, model_cfg.segment_length, model_cfg.vocab_size,
                                      cache_dir=run_dir / "cache")
  validate.check_eval_set(cfg, sources[1])
  # Every exit path, errors included, finishes the checkpoint saves under way and closes what was opened.
  with contextlib.ExitStack() as cleanup:
    return _train(cfg, model_cfg, mesh, sources, cleanup, stop_requested=stop_requested, echo=echo,
                  reshard_data=reshard_data)


def _train(cfg: RunConfig, model_cfg, mesh, sources, cleanup: contextlib.ExitStack, *,
           stop_requested: Callable[[int], bool] | None, echo: Callable[[str], None],
           reshard_data: bool) -> RunResult:
  """The body of `train` on a validated config; what it opens is closed by `cleanup`."""
  run_dir = cfg.run_dir
  run_dir.mkdir(parents=True, exist_ok=True)
  is_main = jax.process_index() == 0
  if is_main:
    save_config(cfg, run_dir / "config.yaml")
  from lm2_jax.model import LM2, model_flops_per_token  # pylint: disable=g-import-not-at-top

  model = LM2(model_cfg)
  seq_len = cfg.data.num_segments * model_cfg.segment_length
  train_source, eval_source = sources
  train_iter = inputs_lib.train_iterator(train_source, cfg.data, cfg.train.batch_size, cfg.data.seed)
  if getattr(train_iter, "close", None) is not None:
    cleanup.callback(train_iter.close)

  tx = opt_lib.make_optimizer(cfg.train)
  schedule = opt_lib.make_schedule(cfg.train)
  init_shape = (mesh.shape["data"] * mesh.shape["fsdp"], seq_len)
  abstract, shardings = state_lib.abstract_state(model, tx, mesh, init_shape, cfg.train.seed)
  checkpointer = cleanup.enter_context(ckpt_lib.Checkpointer(run_dir / "checkpoints", cfg.checkpoint)) \
      if cfg.checkpoint.enabled else None
  restored = checkpointer.restore(abstract, train_iter, reshard_data=reshard_data) \
      if checkpointer else None
  validate.check_data_unchanged(cfg, train_source, restored[1] if restored is not None else None,
                                write=is_main)
  if restored is not None:
    state, start = restored
    echo(f"resumed {run_dir} from step {start}")
  else:
    state, _ = state_lib.init_state(model, tx, mesh, init_shape, cfg.train.seed)
    if cfg.train.init_from:
      state = state.replace(params=warm_start.load_initial_params(
          cfg.train.init_from, model_cfg, state.params, shardings.params))
      echo(f"initialised the parameters from {cfg.train.init_from}")
    start = 0
  echo(f"{model_cfg.__class__.__name__}: {state_lib.param_count(state.params):,} parameters; mesh "
       f"{dict(mesh.shape)}; {cfg.train.batch_size} x {seq_len} tokens per step")

  batch_spec = step_lib.abstract_batch(cfg.train.batch_size, seq_len, cfg.data.num_segments, mesh,
                                       bound=cfg.data.bind)
  t0 = time.perf_counter()
  train_step = step_lib.compile_train_step(
      step_lib.make_train_step(model, tx, schedule, cfg.train.micro_batches, mesh,
                               memory_aux_weight=cfg.train.memory_aux_weight),
      shardings, abstract, batch_spec, mesh)
  memory_diagnostics = cfg.logging.memory_diagnostics and diagnostics_lib.available(model_cfg)
  eval_step = step_lib.compile_eval_step(step_lib.make_eval_step(model, memory_diagnostics),
                                         shardings.params, abstract.params, batch_spec, mesh)
  echo(f"compiled train and eval steps in {time.perf_counter() - t0:.1f} s")

  def run_eval(params, max_batches):
    batches = inputs_lib.eval_batches(eval_source, cfg.train.batch_size, max_batches)
    return eval_lib.evaluate(lambda b: eval_step(params, _device_batch(b, mesh)),
                             (_with_global_qa_fields(b, mesh) for b in batches))

  peak = cfg.logging.peak_flops or metrics_lib.measure_peak_flops()
  flops_per_step = model_flops_per_token(model_cfg, seq_len) * cfg.train.batch_size * seq_len
  peak_total = metrics_lib.total_peak_flops(peak)
  # Steps after `start` are about to be run (again): their rows from an earlier attempt go.
  writer = cleanup.enter_context(
      metrics_lib.MetricsWriter(run_dir, cfg.logging.tensorboard, enabled=is_main, start_step=start))
  progress = metrics_lib.Progress(cfg.train.steps, start, enabled=cfg.logging.progress and is_main)
  config_dict = cfg.to_dict()
  stop = _StopFlag()
  stop.install()

  window: list[dict] = []
  window_start = time.perf_counter()
  saved = {start} if restored is not None else set()

  def save(step_done: int) -> None:
    if checkpointer is not None and step_done not in saved:
      checkpointer.save(step_done, state, train_iter, config_dict)
      saved.add(step_done)

  def read(step_done: int, metrics) -> None:
    """Host side of step `step_done`: NaN check, then the logging window."""
    nonlocal window_start
    values = {k: float(v) for k, v in jax.device_get(metrics).items()}
    if not math.isfinite(values["loss"]) or not math.isfinite(values["grad_norm"]):
      raise _Diverged(step_done, values)
    window.append(values)
    if step_done % cfg.logging.every == 0 or step_done == cfg.train.steps:
      elapsed = time.perf_counter() - window_start
      window_start = time.perf_counter()
      row = {k: float(np.mean([w[k] for w in window]))
             for k in ("loss", "accuracy", "grad_norm", "memory_aux") if k in values}
      step_time = elapsed / len(window)
      row.update(lr=values["lr"], step_time=step_time,
                 tokens_per_s=cfg.train.batch_size * seq_len / step_time,
                 mfu=flops_per_step / step_time / peak_total)
      writer.write(step_done, row)
      progress.update(len(window), {"loss": row["loss"], "acc": row["accuracy"]})
      window.clear()

  status, message = "completed", ""
  step_done = start
  pending = None
  try:
    for step in range(start, cfg.train.steps):
      batch = _device_batch(next(train_iter), mesh)
      state, metrics = train_step(state, batch)
      if pending is not None:
        read(*pending)
      pending = (step + 1, metrics)
      step_done = step + 1
      periodic_save = checkpointer is not None and step_done % cfg.checkpoint.every == 0
      periodic_eval = cfg.logging.eval_every and step_done % cfg.logging.eval_every == 0
      stopping = stop.signal_name is not None or (stop_requested is not None and
                                                  stop_requested(step_done))
      if jax.process_count() > 1:
        # Processes may see a signal at different steps; decide together, only where the loop syncs.
        at_sync_point = periodic_save or periodic_eval or step_done % cfg.logging.every == 0
        stopping = at_sync_point and _any_process(stopping)
      if periodic_save or periodic_eval or stopping:
        read(*pending)
        pending = None
      if periodic_save or (stopping and checkpointer is not None):
        save(step_done)
      if periodic_eval:
        result = run_eval(state.params, cfg.logging.eval_batches)
        writer.write(step_done, _scalars(result), split="eval")
        progress.write(f"step {step_done}: held-out " + _summary(result))
      if stopping:
        status = "interrupted"
        why = stop.signal_name or "stop requested"
        message = (f"{why} at step {step_done}: checkpoint saved in {run_dir / 'checkpoints'}; rerun "
                   "the same command to resume" if checkpointer else f"{why} at step {step_done}")
        break
    if pending is not None:
      read(*pending)
      pending = None
  except _Diverged as e:
    if checkpointer is not None:
      checkpointer.wait()
    saved = checkpointer.steps() if checkpointer else []
    status = "diverged"
    message = (f"loss became {e.values['loss']} (grad norm {e.values['grad_norm']}) at step {e.step}; "
               f"stopped. Last good checkpoint: "
               f"{'step ' + str(saved[-1]) if saved else 'none'} in {run_dir / 'checkpoints'}")
    step_done = e.step
  finally:
    stop.restore()
    progress.close()

  final = None
  if status == "completed":
    save(step_done)
    result = run_eval(state.params, 0)
    final = eval_lib.final_report(result, model_cfg.use_memory, chance=inputs_lib.chance_level(cfg.data))
    writer.write(step_done, _scalars(result), split="final_eval")
    if is_main:
      eval_lib.write_json(run_dir / "final_eval.json", final)
    message = f"finished {step_done} steps; held-out " + _summary(result)
    echo(message)
    reports = {cfg.name: final}
    other = _compare_dir(cfg)
    if other is not None and eval_lib.read_report(other) is not None:
      reports[other.name] = eval_lib.read_report(other)
    if "accuracy_by_distance" in result:
      echo(eval_lib.comparison_table(reports))
  else:
    echo(message)
  return RunResult(status=status, step=step_done, run_dir=run_dir, final_eval=final, message=message)


class _Diverged(Exception):

  def __init__(self, step: int, values: dict):
    super().__init__(f"non-finite loss at step {step}")
    self.step, self.values = step, values


def _device_batch(batch: dict, mesh) -> dict:
  return mesh_lib.global_batch(step_lib.model_inputs(batch), mesh)


def _any_process(flag: bool) -> bool:
  """True on every process if `flag` is True on any (a collective: all processes must call it)."""
  return bool(np.any(multihost_utils.process_allgather(np.asarray(flag, np.int32))))


def _with_global_qa_fields(batch: dict, mesh) -> dict:
  """`batch` with its QA fields replaced by the whole global batch's, in the eval step's row order.

  The eval step returns per-row statistics of the global batch (replicated on every process), while each
  process reads only its rows; the distance bookkeeping in `evaluate` must line up with the global rows.
  The model inputs stay local (`_device_batch` assembles them).
  """
  keys = [k for k in eval_lib.QA_KEYS if k in batch]
  if jax.process_count() == 1 or not keys:
    return batch
  rows = mesh_lib.global_batch({k: batch[k] for k in keys}, mesh)
  return {**batch, **{k: np.asarray(multihost_utils.process_allgather(v, tiled=True))
                      for k, v in rows.items()}}


def _scalars(result: dict) -> dict:
  """The scalar metrics of an evaluation; memory diagnostics as `memory/block<i>/<name>`."""
  out = {k: v for k, v in result.items() if isinstance(v, (int, float))}
  for block, named in result.get("memory", {}).items():
    out.update({f"memory/{block}/{name}": v for name, v in named.items()})
  return out


def _summary(result: dict) -> str:
  text = f"loss {result['loss']:.4f}, token accuracy {result['accuracy']:.3f}"
  if "answer_accuracy" in result:
    by = ", ".join(f"{d} back: {a:.3f}" for d, a in result["accuracy_by_distance"].items())
    text += f", answer accuracy {result['answer_accuracy']:.3f} ({by})"
  if "accuracy_last_fact_elsewhere" in result:
    text += f"; when the story's last fact is not the answer's: {result['accuracy_last_fact_elsewhere']:.3f}"
  return text
