"""Runs `train.py` with faults injected into Orbax's checkpoint layer, chosen by environment variables.

    LM2_FAULT_EVENTS=FILE          append "save <step> <time>" / "restore <time>" lines as those begin,
                                   so a test can kill the process inside one (the time is time.time())
    LM2_FAULT_SAVE_DELAY=SECONDS   sleep inside every checkpoint commit, after the arrays are written to the
                                   temporary directory and before it is renamed: a kill in that window
                                   lands in the middle of an asynchronous save
    LM2_FAULT_RESTORE_DELAY=SECONDS  sleep at the start of every checkpoint restore
    LM2_FAULT_ENOSPC_FROM=STEP     the commit of every checkpoint of step >= STEP fails as a full disk does
                                   (OSError ENOSPC from the write of its commit file)
    LM2_FAULT_STEP_DELAY=SECONDS   sleep before every train step's batch (a tiny run's steps take
                                   milliseconds; a random kill should often land among them, not only in
                                   start-up)

Only the timing and the write result of Orbax's own code change; the trainer runs unmodified, so what it
does with a kill or an ENOSPC is what it would do on a real preemption or a real full disk.
"""

from __future__ import annotations

import errno
import os
import pathlib
import sys
import time

REPO = pathlib.Path(__file__).resolve().parents[2]


def _event(line: str) -> None:
  path = os.environ.get("LM2_FAULT_EVENTS")
  if path:
    with open(path, "a", encoding="utf-8") as f:
      f.write(f"{line} {time.time():.6f}\n")
      f.flush()
      os.fsync(f.fileno())


def install() -> None:
  """Patches Orbax's commit and the trainer's restore as the variables above ask."""
  from orbax.checkpoint._src.path import atomicity  # pylint: disable=g-import-not-at-top
  from lm2_jax.train import checkpoint as ckpt_lib  # pylint: disable=g-import-not-at-top
  from lm2_jax.train import loop  # pylint: disable=g-import-not-at-top

  save_delay = float(os.environ.get("LM2_FAULT_SAVE_DELAY", "0"))
  restore_delay = float(os.environ.get("LM2_FAULT_RESTORE_DELAY", "0"))
  enospc_from = int(os.environ.get("LM2_FAULT_ENOSPC_FROM", "-1"))
  finalize = atomicity.AtomicRenameTemporaryPath.finalize

  async def slow_or_full_finalize(self):
    step = int(self.get_final().name) if self.get_final().name.isdigit() else -1
    _event(f"save {step}")
    if save_delay:
      time.sleep(save_delay)  # the background commit thread blocks; training goes on meanwhile
    if 0 <= enospc_from <= step:
      raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), str(self.get() / "commit_success.txt"))
    return await finalize(self)

  atomicity.AtomicRenameTemporaryPath.finalize = slow_or_full_finalize
  restore = ckpt_lib.Checkpointer.restore

  def slow_restore(self, *args, **kwargs):
    _event("restore")
    if restore_delay:
      time.sleep(restore_delay)
    return restore(self, *args, **kwargs)

  ckpt_lib.Checkpointer.restore = slow_restore
  step_delay = float(os.environ.get("LM2_FAULT_STEP_DELAY", "0"))
  if step_delay:
    device_batch = loop._device_batch  # pylint: disable=protected-access

    def slow_batch(*args, **kwargs):
      time.sleep(step_delay)
      return device_batch(*args, **kwargs)

    loop._device_batch = slow_batch  # pylint: disable=protected-access


def main(argv: list[str]) -> int:
  sys.path.insert(0, str(REPO))
  install()
  import train  # pylint: disable=g-import-not-at-top

  return train.main(argv)


if __name__ == "__main__":
  sys.exit(main(sys.argv[1:]))
