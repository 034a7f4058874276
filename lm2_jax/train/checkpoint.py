"""Orbax checkpoints of the train state, the Grain iterator position and the resolved config.

One `Checkpointer` per run directory (`<run_dir>/checkpoints/<step>/{state,data,config}`). Saves are
asynchronous: `save` returns once the arrays are copied off the devices, and the write finishes in the
background (`wait` blocks). Restoring takes an abstract state whose ShapeDtypeStructs carry the
shardings of the *current* mesh, so a checkpoint written on one mesh shape restores onto another. A
latest checkpoint that cannot be read (corrupt or half-written) is reported and the previous one is used;
when the resumed run reaches that step again, its save replaces the unreadable checkpoint. Checkpoints past
`keep` are renamed whole into `deleted/` and deleted there, so a kill never leaves a half-deleted step
directory behind.

A save that fails in the background (a full disk, a vanished directory) is raised as one
`CheckpointSaveError` by the next `save`, `wait` or `close`; Orbax writes into a temporary directory and
renames it only when complete, so the failed step never becomes a checkpoint and the older ones stay (Orbax
deletes the oldest only after a save succeeds). While a `Checkpointer` is open, Orbax's own error logs of
that failure (a traceback per thread) are dropped, and its event loops finish their pending writes before
closing, so the failure is reported once.

Multi-process runs write one checkpoint together: Orbax writes each array's shards from the processes that
hold them, and Grain writes each process's iterator position as `data/process_<i>-of-<n>.json`. Resuming
needs the same process count `n`, or `reshard_data=True`: the model state restores onto any mesh, and the
data position is re-derived from the step. That is exact because global batch k is the same rows whatever
the process count (process i of n takes rows i, i+n, ... of the shuffled epoch; see
`lm2_jax.data.pipeline`), as long as the training set's size is a multiple of both process counts (else each
epoch drops up to n-1 different rows).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import pathlib
import re
import shutil
from typing import Any

import grain
import jax
import orbax.checkpoint as ocp

from lm2_jax.train.config import CheckpointConfig, ConfigError
from lm2_jax.train.state import TrainState

log = logging.getLogger(__name__)

# How long a failed restore or save waits for the reads and writes it started to finish (they finish or
# fail quickly).
_DRAIN_TIMEOUT_S = 60.0


# Where old checkpoints are moved, whole, before they are deleted (not a step name: restore ignores it).
TRASH = "deleted"


class CheckpointSaveError(RuntimeError):
  """A checkpoint could not be written; the message names the step, the directory, the cause and the
  checkpoints that remain."""


class _DropOrbaxErrors(logging.Filter):
  """Drops Orbax's ERROR records: each background failure logs a traceback per thread, and the
  `Checkpointer` raises that failure itself as one CheckpointSaveError (or a restore warning)."""

  def filter(self, record: logging.LogRecord) -> bool:
    return not (record.levelno >= logging.ERROR and "orbax" in record.pathname)


class Checkpointer:
  """Saves and restores {state, data iterator, config} at integer steps.

  Attributes:
    directory: where the step directories live.
    manager: the underlying `ocp.CheckpointManager`.
  """

  def __init__(self, directory: str | pathlib.Path, cfg: CheckpointConfig):
    self.directory = pathlib.Path(directory).absolute()
    # Orbax deletes an old checkpoint in place, file by file: a kill in the middle would leave a
    # half-deleted step directory where restore looks. Renamed whole into the trash first, it never is.
    options = ocp.CheckpointManagerOptions(
        max_to_keep=cfg.keep, enable_async_checkpointing=cfg.async_save, create=True,
        cleanup_tmp_directories=True, todelete_subdir=TRASH)
    self._closed = False
    self._unreadable: set[int] = set()  # steps `restore` could not read
    self._started: list[int] = []        # steps whose save was started, oldest first
    self._failed = False                 # a CheckpointSaveError was raised
    self._log_filter = _DropOrbaxErrors()
    logging.getLogger("absl").addFilter(self._log_filter)
    self._previous_policy = asyncio.get_event_loop_policy()
    # Process-wide while open: Orbax makes its event loops in background save threads too.
    asyncio.set_event_loop_policy(_DrainingPolicy())
    try:
      self.manager = ocp.CheckpointManager(self.directory, options=options)
    except BaseException:
      self._release_process_hooks()
      raise
    self._empty_trash()

  def __enter__(self) -> "Checkpointer":
    return self

  def __exit__(self, exc_type, exc, tb) -> None:
    # Leaving on an error too: the saves under way finish, and the caller still sees its own error,
    # except an I/O error while a save failed: on a full disk the save that filled it usually fails
    # first, and training goes on (writing metrics) until the failure surfaces; report the save.
    try:
      self.close()
    except Exception as e:  # pylint: disable=broad-except
      if exc_type is None:
        raise
      if isinstance(e, CheckpointSaveError) and isinstance(exc, OSError):
        raise CheckpointSaveError(f"{e}; the run then stopped on: {exc}") from exc
      log.warning("closing the checkpointer of %s after an error failed too: %s: %s", self.directory,
                  type(e).__name__, e)

  def steps(self) -> list[int]:
    """Finished checkpoint steps, oldest first."""
    return sorted(self.manager.all_steps())

  def save(self, step: int, state: TrainState, data_iter: Any = None, config: dict | None = None
           ) -> bool:
    """Starts saving `state` (and the iterator position, config) as `step`; False if already saved.

    A step that `restore` found unreadable is deleted and written anew.

    Raises:
      CheckpointSaveError: this save, or an earlier one still finishing in the background, failed.
    """
    with self._reporting_failed_saves(step):
      self._empty_trash()
      if step in self._unreadable:
        self.manager.delete(step)
        self._unreadable.discard(step)
      if step in self.manager.all_steps():
        return False
      items = {"state": ocp.args.StandardSave(state)}
      if data_iter is not None:
        items["data"] = grain.checkpoint.CheckpointSave(data_iter)
      if config is not None:
        items["config"] = ocp.args.JsonSave(config)
      started = self.manager.save(step, args=ocp.args.Composite(**items), force=True)
      self._started.append(step)
      return started

  def _empty_trash(self) -> None:
    """Deletes the checkpoints Orbax moved to the trash (process 0; one moved there meanwhile waits)."""
    trash = self.directory / TRASH
    if jax.process_index() == 0 and trash.is_dir():
      for entry in trash.iterdir():
        shutil.rmtree(entry, ignore_errors=True)

  def wait(self) -> None:
    """Blocks until every started save is on disk; CheckpointSaveError if one failed."""
    with self._reporting_failed_saves():
      self.manager.wait_until_finished()

  @contextlib.contextmanager
  def _reporting_failed_saves(self, step: int | None = None):
    """Turns any error of a save (this one or one finishing in the background) into CheckpointSaveError."""
    try:
      yield
    except Exception as e:  # pylint: disable=broad-except
      # Orbax raises a background failure at the next call: the failed save is the newest started one
      # that is not on disk. Orbax's own step list may already have dropped the step that save was to
      # replace, so the disk is read, where only finished checkpoints have a plain step name.
      kept = sorted(int(p.name) for p in self.directory.iterdir() if p.name.isdigit()) \
          if self.directory.is_dir() else []
      failed = [s for s in self._started if s not in kept] or ([step] if step is not None else [])
      self._failed = True
      raise CheckpointSaveError(
          f"saving checkpoint step {failed[-1] if failed else '?'} in {self.directory} failed: "
          f"{_cause(e)}. Checkpoints kept: "
          f"{'steps ' + ', '.join(map(str, kept)) if kept else 'none'}; fix the cause (free disk space?) "
          f"and rerun the same command to resume from {'step ' + str(kept[-1]) if kept else 'the start'}"
      ) from e

  def data_process_count(self, step: int) -> int | None:
    """How many processes wrote `step`'s data iterator positions (None: no data item)."""
    data_dir = self.directory / str(step) / "data"
    counts = {int(m.group(1)) for p in data_dir.glob("process_*-of-*.json")
              if (m := re.fullmatch(r"process_\d+-of-(\d+)\.json", p.name))}
    if len(counts) > 1:
      raise ConfigError(f"checkpoint {data_dir} mixes iterator states of {sorted(counts)} processes")
    return counts.pop() if counts else None

  def restore(self, abstract_state: TrainState, data_iter: Any = None, *, reshard_data: bool = False
              ) -> tuple[TrainState, int] | None:
    """Restores the newest readable checkpoint onto `abstract_state`'s shardings.

    Args:
      abstract_state: TrainState of ShapeDtypeStructs with shardings (see `state.abstract_state`).
      data_iter: a Grain iterator whose position is set from the checkpoint (in place).
      reshard_data: accept a checkpoint written by another number of processes, positioning `data_iter`
        at the checkpoint's step instead of restoring the saved positions (see the module docstring).

    Returns:
      (state, step), or None when the directory holds no readable checkpoint.

    Raises:
      ConfigError: the checkpoint was written by a different number of processes and not `reshard_data`.
    """
    for step in reversed(self.steps()):
      items = {"state": ocp.args.StandardRestore(abstract_state)}
      written_by = self.data_process_count(step) if data_iter is not None else None
      reposition = written_by is not None and written_by != jax.process_count()
      if reposition and not reshard_data:
        raise ConfigError(
            f"checkpoint {self.directory}/{step} was written by {written_by} process(es) but this run has "
            f"{jax.process_count()}: resume with {written_by} processes, or pass --reshard-data "
            "(LM2_RESHARD_DATA=1) to restore the model and re-derive the data position from the step")
      if data_iter is not None and not reposition:
        items["data"] = grain.checkpoint.CheckpointRestore(data_iter)
      try:
        restored = self.manager.restore(step, args=ocp.args.Composite(**items))
      except Exception as e:  # pylint: disable=broad-except
        # Anything from a truncated file to a missing item: this step is unusable, the older may not be.
        self._unreadable.add(step)
        log.warning("checkpoint %s/%d cannot be restored (%s: %s); trying the previous one",
                    self.directory, step, type(e).__name__, str(e).splitlines()[0][:300] if str(e)
                    else "")
        continue
      if reposition:
        _position_iterator(data_iter, step)
        log.warning("checkpoint %s/%d: written by %d processes, resumed by %d; data position re-derived "
                    "from the step", self.directory, step, written_by, jax.process_count())
      return restored["state"], step
    return None

  def close(self) -> None:
    """Waits for every started save, then stops Orbax's background threads; a second call does nothing.

    Raises:
      CheckpointSaveError: a save failed that no earlier call reported.
    """
    if self._closed:
      return
    self._closed = True
    try:
      if self._failed:
        # Reported already: only let the background threads end.
        with contextlib.suppress(Exception):
          self.manager.wait_until_finished()
      else:
        self.wait()
    finally:
      try:
        self.manager.close()
      finally:
        self._release_process_hooks()

  def _release_process_hooks(self) -> None:
    logging.getLogger("absl").removeFilter(self._log_filter)
    asyncio.set_event_loop_policy(self._previous_policy)


def _cause(error: BaseException) -> str:
  """One line: the operating system's reason first (TensorStore reports it inside a long ValueError),
  then the start of the error's own message."""
  text = " ".join(str(error).split())
  reason = None
  cause: BaseException | None = error
  while cause is not None and reason is None:
    if isinstance(cause, OSError) and cause.strerror:
      reason = f"{cause.strerror} (errno {cause.errno})"
    cause = cause.__cause__ or cause.__context__
  if reason is None and (m := re.search(r":\s*([^:\[]+?)\s*\[os_error_code='(\d+)'\]", text)):
    reason = f"{m.group(1)} (errno {m.group(2)})"
  detail = f"{type(error).__name__}: {text[:300]}{'...' if len(text) > 300 else ''}"
  return f"{reason}; {detail}" if reason else detail


class _DrainingEventLoop(asyncio.SelectorEventLoop):
  """An event loop that lets its unfinished tasks finish before it closes.

  Orbax runs a restore in a fresh event loop and closes that loop as soon as one array fails to load; the
  reads it started for the other arrays are still in flight in TensorStore's threads, and each completion
  then calls into the closed loop: one "RuntimeError: Event loop is closed" traceback per array, printed
  long after the failure was handled. A save that fails (a full disk) leaves its other writes in flight
  the same way. Waiting for them here (they finish or fail quickly) ends the attempt with nothing left
  running.
  """

  def close(self) -> None:
    if not self.is_closed() and not self.is_running():
      pending = [t for t in asyncio.all_tasks(self) if not t.done()]
      if pending:
        self.run_until_complete(asyncio.wait(pending, timeout=_DRAIN_TIMEOUT_S))
    super().close()


class _DrainingPolicy(asyncio.DefaultEventLoopPolicy):

  def new_event_loop(self) -> asyncio.AbstractEventLoop:
    return _DrainingEventLoop()


def _position_iterator(data_iter: Any, step: int) -> None:
  """Moves a fresh training iterator to batch `step` (each optimizer step reads one batch per process)."""
  state = data_iter.get_state()
  if set(state) != {"next_index"}:
    raise ConfigError(f"cannot re-derive the data position for a different process count from an iterator "
                      f"state with keys {sorted(state)} (data.worker_count > 0?); resume with the original "
                      "process count or data.worker_count=0")
  data_iter.set_state({"next_index": step})
