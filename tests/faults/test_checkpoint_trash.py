"""Old checkpoints leave whole: renamed into checkpoints/deleted/ first, deleted there later. A kill -9 in
the middle of Orbax's in-place delete left a half-deleted step directory that restore would try
(bench/faults.py found one in 6 kill_random trials)."""

import numpy as np

from lm2_jax.train import checkpoint as ckpt_lib
from lm2_jax.train import config as config_lib


def _state(step):
  return {"w": np.full((4, 4), float(step), np.float32)}


def test_checkpoints_past_keep_move_whole_to_the_trash_then_go(tmp_path, monkeypatch):
  directory = tmp_path / "ckpt"
  emptied = []
  monkeypatch.setattr(ckpt_lib.Checkpointer, "_empty_trash", lambda self: emptied.append(1))
  ckpt = ckpt_lib.Checkpointer(directory, config_lib.CheckpointConfig(keep=1, async_save=False))
  for step in (1, 2, 3):
    ckpt.save(step, _state(step))
  ckpt.close()
  assert emptied
  # Steps 1 and 2 were moved, complete, out of the way of restore.
  assert sorted(p.name for p in directory.iterdir()) == ["3", ckpt_lib.TRASH]
  trash = directory / ckpt_lib.TRASH
  assert sorted(p.name for p in trash.iterdir()) == ["1", "2"]
  assert all((trash / s / "commit_success.txt").is_file() for s in ("1", "2"))
  monkeypatch.undo()
  reopened = ckpt_lib.Checkpointer(directory, config_lib.CheckpointConfig(keep=1))
  assert reopened.steps() == [3] and list(trash.iterdir()) == []
  reopened.close()
