"""kill -9 during an async save, during a restore and at a random moment (metrics.jsonl's last row cut), and
a disk that fills during a save: every resumed run ends with the losses of an uninterrupted run, bit for
bit, no finished checkpoint is lost, no half-written one is restored, nothing prints a traceback.

One trial per fault here (each ~15-30 s of subprocess runs); `python bench/faults.py --trials N` runs more
and prints the counted table (docs/faults.md).
"""

import random

import pytest

import harness

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def uninterrupted(tmp_path_factory):
  """(train rows, wall seconds) of the run no fault touches."""
  return harness.reference(tmp_path_factory.mktemp("reference"))


def _assert_clean(result: harness.TrialResult, injected: int):
  assert result.injected == injected, result
  assert result.resumed_exactly, result.notes
  assert (result.checkpoints_lost, result.half_written, result.uncaught) == (0, 0, 0), result


@pytest.mark.parametrize("fault, seed", [("kill_save", 1), ("kill_restore", 2), ("cut_metrics", 3)])
def test_kill_then_resume_ends_with_the_uninterrupted_losses(tmp_path, uninterrupted, fault, seed):
  rows, wall_s = uninterrupted
  assert [r[0] for r in rows] == list(range(1, harness.STEPS + 1))
  result = harness.kill_trial(tmp_path, fault, rows, wall_s, random.Random(seed), kills=2)
  _assert_clean(result, injected=2)
  assert result.resumes >= 1, result   # a trial that never resumed would test nothing about resuming


def test_disk_full_during_a_save_keeps_the_previous_checkpoint_and_metrics(tmp_path, uninterrupted):
  """On a real 3 MiB tmpfs where this process may mount one (root in CI), else with an injected ENOSPC."""
  rows, _ = uninterrupted
  result = harness.disk_full_trial(tmp_path, rows, real_disk=harness.can_mount_tmpfs(tmp_path / "probe"))
  _assert_clean(result, injected=1)

