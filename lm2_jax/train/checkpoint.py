"""Orbax checkpoints of the train state, the Grain iterator position and the resolved config.

One `Checkpointer` per run directory (`<run_dir>/checkpoints/<step>/{state,data,config}`). Saves are
asynchronous: `save` returns once the arrays are copied off the devices, and the write finishes in the
background (`wait` blocks). Restoring takes an abstract state whose ShapeDtypeStructs carry the
shardings of the *current* mesh, so a checkpoint written on one mesh shape restores onto another. A
latest checkpoint that cannot be read (corrupt or half-written) is reported and the previous one is used.
"""

from __future__ import annotations

import logging
import pathlib
from typing import Any

import grain
import orbax.checkpoint as ocp

from lm2_jax.train.config import CheckpointConfig
from lm2_jax.train.state import TrainState

log = logging.getLogger(__name__)


class Checkpointer:
  """Saves and restores {state, data iterator, config} at integer steps.

  Attributes:
    directory: where the step directories live.
    manager: the underlying `ocp.CheckpointManager`.
  """

  def __init__(self, directory: str | pathlib.Path, cfg: CheckpointConfig):
    self.directory = pathlib.Path(directory).absolute()
    options = ocp.CheckpointManagerOptions(
        max_to_keep=cfg.keep, enable_async_checkpointing=cfg.async_save, create=True,
        cleanup_tmp_directories=True)
    self.manager = ocp.CheckpointManager(self.directory, options=options)

  def steps(self) -> list[int]:
    """Finished checkpoint steps, oldest first."""
    return sorted(self.manager.all_steps())

  def save(self, step: int, state: TrainState, data_iter: Any = None, config: dict | None = None
           ) -> bool:
    """Starts saving `state` (and the iterator position, config) as `step`; False if already saved."""
    if step in self.manager.all_steps():
      return False
    items = {"state": ocp.args.StandardSave(state)}
    if data_iter is not None:
      items["data"] = grain.checkpoint.CheckpointSave(data_iter)
    if config is not None:
      items["config"] = ocp.args.JsonSave(config)
    return self.manager.save(step, args=ocp.args.Composite(**items), force=True)

  def wait(self) -> None:
    """Blocks until every started save is on disk."""
    self.manager.wait_until_finished()

  def restore(self, abstract_state: TrainState, data_iter: Any = None
              ) -> tuple[TrainState, int] | None:
    """Restores the newest readable checkpoint onto `abstract_state`'s shardings.

    Args:
      abstract_state: TrainState of ShapeDtypeStructs with shardings (see `state.abstract_state`).
      data_iter: a Grain iterator whose position is set from the checkpoint (in place).

    Returns:
      (state, step), or None when the directory holds no readable checkpoint.
    """
    for step in reversed(self.steps()):
      items = {"state": ocp.args.StandardRestore(abstract_state)}
      if data_iter is not None:
        items["data"] = grain.checkpoint.CheckpointRestore(data_iter)
      try:
        restored = self.manager.restore(step, args=ocp.args.Composite(**items))
      except Exception as e:  # pylint: disable=broad-except
        # Anything from a truncated file to a missing item: this step is unusable, the older may not be.
        log.warning("checkpoint %s/%d cannot be restored (%s: %s); trying the previous one",
                    self.directory, step, type(e).__name__, str(e).splitlines()[0][:300] if str(e)
                    else "")
        continue
      return restored["state"], step
    return None

  def close(self) -> None:
    self.manager.wait_until_finished()
    self.manager.close()
