"""What a newcomer hit in training (issue 19): tracebacks after a corrupt-checkpoint fallback, steps logged
twice after a resume, config errors found only after training, half-written checkpoints left behind."""

import asyncio
import shutil
import threading
import time

import pytest
from orbax.checkpoint._src import asyncio_utils

from lm2_jax.train import checkpoint as ckpt_lib
from lm2_jax.train import config as config_lib
from lm2_jax.train import evaluate as eval_lib
from lm2_jax.train import metrics as metrics_lib
from lm2_jax.train.config import ConfigError
from lm2_jax.train.loop import train
from test_train_evaluate import sources, tiny_config


def test_a_failed_restore_lets_its_reads_finish_before_its_event_loop_closes(tmp_path, monkeypatch):
  """Orbax restores in a fresh event loop (`asyncio_utils.run_sync`) and closes it when one array fails to
  load. A read still in flight then completes on its own thread into the closed loop: with a real corrupt
  checkpoint, one "RuntimeError: Event loop is closed" traceback per array. Here the read is simulated,
  so the race is decided: it completes 0.2 s after the failure."""
  ckpt = ckpt_lib.Checkpointer(tmp_path, config_lib.CheckpointConfig())
  late_errors, reads_done, threads = [], [], []

  def restore(step, args):
    del args
    if step == 1:
      return {"state": "state of step 1"}

    async def load_all_arrays():
      loop = asyncio.get_running_loop()
      read = loop.create_future()

      def tensorstore_thread():
        time.sleep(0.2)
        try:
          loop.call_soon_threadsafe(read.set_result, None)
        except RuntimeError as e:
          late_errors.append(e)

      async def other_array():
        await read
        reads_done.append(True)

      threads.append(threading.Thread(target=tensorstore_thread))
      threads[0].start()
      asyncio.ensure_future(other_array())
      raise ValueError("array 0: corrupt")

    return asyncio_utils.run_sync(load_all_arrays())

  monkeypatch.setattr(ckpt.manager, "all_steps", lambda: [1, 2])
  monkeypatch.setattr(ckpt.manager, "restore", restore)
  assert ckpt.restore(abstract_state=None) == ("state of step 1", 1)
  threads[0].join(timeout=10)
  assert late_errors == [] and reads_done == [True]
  ckpt.close()


def test_metrics_hold_each_step_once_after_a_fallback_resume(tmp_path):
  """Checkpoints at 4 and 8; 8 is corrupt, so the rerun resumes from 4 and runs 5-8 again."""
  train(tiny_config(tmp_path, "twice"), sources=sources(), echo=lambda s: None)
  ckpts = tmp_path / "twice" / "checkpoints"
  shutil.rmtree(ckpts / "8" / "state")
  (ckpts / "8" / "state").mkdir()
  again = train(tiny_config(tmp_path, "twice"), sources=sources(), echo=lambda s: None)
  assert again.status == "completed"
  rows = metrics_lib.read_metrics(tmp_path / "twice")
  assert [r["step"] for r in rows if r["split"] == "train"] == list(range(1, 9))
  assert [r["step"] for r in rows if r["split"] == "final_eval"] == [8]


def test_metrics_writer_drops_rows_past_the_start_step(tmp_path):
  with metrics_lib.MetricsWriter(tmp_path, tensorboard=False) as writer:
    for step in (1, 2, 3):
      writer.write(step, {"loss": float(step)})
    writer.write(3, {"loss": 0.5}, split="final_eval")
  with open(tmp_path / "metrics.jsonl", "a", encoding="utf-8") as f:
    f.write('{"step": 4, "spl')          # a line cut short by a killed run
  with metrics_lib.MetricsWriter(tmp_path, tensorboard=False, start_step=2) as writer:
    writer.write(3, {"loss": 9.0})
  rows = metrics_lib.read_metrics(tmp_path)
  assert [(r["step"], r["split"], r["loss"]) for r in rows] == [(1, "train", 1.0), (2, "train", 2.0),
                                                                 (3, "train", 9.0)]
  # A run restarted at its last step rewrites its final evaluation once.
  with metrics_lib.MetricsWriter(tmp_path, tensorboard=False, start_step=3) as writer:
    writer.write(3, {"loss": 0.25}, split="final_eval")
  assert [r["split"] for r in metrics_lib.read_metrics(tmp_path)] == ["train"] * 3 + ["final_eval"]


@pytest.mark.parametrize("sections, eval_rows, key", [
    ({"train": {"learning_rate": -1e-3}}, 16, "train.learning_rate"),
    ({"mesh": {"data": 3, "num_devices": 2}}, 16, "mesh"),
    ({}, 4, "data.eval_size"),                # held-out set of 4 rows, evaluation batch of 8
])
def test_config_errors_stop_the_run_before_it_writes_anything(tmp_path, sections, eval_rows, key):
  cfg = tiny_config(tmp_path, "bad", **sections)
  with pytest.raises(ConfigError, match=key):
    train(cfg, sources=sources(eval_rows=eval_rows), echo=lambda s: None)
  assert not (tmp_path / "bad").exists()


def test_an_error_after_a_save_started_leaves_that_checkpoint_whole(tmp_path, monkeypatch):
  """An error at the final evaluation, right after the final (asynchronous) save started: the error
  reaches the caller, and the save has finished by then: no `*.orbax-checkpoint-tmp*` directory."""
  def fail(*args, **kwargs):
    raise RuntimeError("evaluation failed")
  monkeypatch.setattr(eval_lib, "evaluate", fail)
  cfg = tiny_config(tmp_path, "err", train={"steps": 6}, checkpoint={"every": 4})
  with pytest.raises(RuntimeError, match="evaluation failed"):
    train(cfg, sources=sources(), echo=lambda s: None)
  ckpts = tmp_path / "err" / "checkpoints"
  assert sorted(p.name for p in ckpts.iterdir()) == ["4", "6"]
