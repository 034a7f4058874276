"""Checkpoints restore bit-exactly onto another mesh shape; SIGTERM leaves a restorable checkpoint."""

import os
import pathlib
import shutil
import signal
import subprocess
import sys
import time

import jax
import numpy as np
import orbax.checkpoint as ocp
import pytest
import yaml

from lm2_jax.data import pipeline
from lm2_jax.model import LM2, ModelConfig
from lm2_jax.train import checkpoint as ckpt_lib
from lm2_jax.train import config as config_lib
from lm2_jax.train import mesh as mesh_lib
from lm2_jax.train import optimizer as opt_lib
from lm2_jax.train import state as state_lib
from lm2_jax.train import loop as train_loop
from lm2_jax.train import metrics as metrics_lib
from lm2_jax.train import step as step_lib
from test_train_evaluate import C, T, TINY_MODEL, CountingSource

REPO = pathlib.Path(__file__).resolve().parents[1]


def _abstract(mesh_cfg):
  model = LM2(ModelConfig.from_dict(TINY_MODEL))
  tx = opt_lib.make_optimizer(config_lib.TrainConfig())
  mesh = mesh_lib.make_mesh(mesh_cfg)
  shape = (mesh.shape["data"] * mesh.shape["fsdp"], C * T)
  return model, tx, mesh, shape


def test_restore_onto_a_different_mesh(tmp_path):
  model, tx, mesh, shape = _abstract(config_lib.MeshConfig(data=2, fsdp=2, tensor=2))
  state, _ = state_lib.init_state(model, tx, mesh, shape, seed=5)
  # Make the optimizer moments non-trivial so the comparison covers them too.
  state = state.replace(step=state.step + 7, opt_state=jax.tree.map(
      lambda x: x + 0.25 if x.dtype == np.float32 else x + 3, state.opt_state))
  it = iter(pipeline.make_dataset(CountingSource(32), batch_size=4, seed=0))
  next(it), next(it)
  ckpt = ckpt_lib.Checkpointer(tmp_path / "ckpt", config_lib.CheckpointConfig(keep=2))
  ckpt.save(7, state, it, {"name": "x"})
  ckpt.close()
  expected_next = next(it)

  model, tx, mesh8, shape = _abstract(config_lib.MeshConfig(data=1, fsdp=8, tensor=1))
  abstract, shardings = state_lib.abstract_state(model, tx, mesh8, shape, seed=5)
  fresh_it = iter(pipeline.make_dataset(CountingSource(32), batch_size=4, seed=0))
  restored, step = ckpt_lib.Checkpointer(tmp_path / "ckpt", config_lib.CheckpointConfig()).restore(
      abstract, fresh_it)
  assert step == 7 and int(restored.step) == 7
  for a, b, s in zip(jax.tree.leaves(restored), jax.tree.leaves(state), jax.tree.leaves(shardings)):
    np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
    assert a.sharding.is_equivalent_to(s, a.ndim)
  assert restored.params["embed"]["embedding"].sharding.spec == shardings.params["embed"][
      "embedding"].spec
  got_next = next(fresh_it)
  for k in expected_next:
    np.testing.assert_array_equal(got_next[k], expected_next[k])


def test_empty_directory_restores_nothing(tmp_path):
  model, tx, mesh, shape = _abstract(config_lib.MeshConfig(data=1, num_devices=1))
  abstract, _ = state_lib.abstract_state(model, tx, mesh, shape, seed=0)
  assert ckpt_lib.Checkpointer(tmp_path, config_lib.CheckpointConfig()).restore(abstract) is None


def _state_on_one_device():
  """(model, tx, mesh, abstract state, its shardings, a fresh state) of the tiny model on one device."""
  model, tx, mesh, shape = _abstract(config_lib.MeshConfig(data=1, num_devices=1))
  abstract, shardings = state_lib.abstract_state(model, tx, mesh, shape, seed=0)
  state, _ = state_lib.init_state(model, tx, mesh, shape, seed=0)
  return model, tx, mesh, abstract, shardings, state


def _donating_steps():
  """(abstract state, state, compiled train step that donates its state, batch(step)), one device."""
  model, tx, mesh, abstract, shardings, state = _state_on_one_device()
  schedule = opt_lib.make_schedule(config_lib.TrainConfig())
  compiled = step_lib.compile_train_step(step_lib.make_train_step(model, tx, schedule, 1, mesh),
                                         shardings, abstract, step_lib.abstract_batch(4, C * T, C, mesh),
                                         mesh)
  source = CountingSource(64)

  def batch(step):
    rows = [source[i] for i in range(4 * step, 4 * step + 4)]
    return mesh_lib.global_batch({k: np.stack([r[k] for r in rows]) for k in step_lib.MODEL_KEYS}, mesh)

  return abstract, state, compiled, batch


def test_async_saves_then_donating_steps_restore_their_own_step_and_keep_the_newest(tmp_path):
  """Asynchronous saves at steps 2, 4 and 5, each followed at once by more steps of a train step that
  donates its state, while the write may still run: with keep=2, steps 4 and 5 remain, each restoring
  the values of its own step."""
  abstract, state, compiled, batch = _donating_steps()
  ckpt = ckpt_lib.Checkpointer(tmp_path / "ckpt", config_lib.CheckpointConfig(keep=2, async_save=True))
  saved = {}
  for step in range(1, 8):
    old = state
    state, _ = compiled(state, batch(step))
    if step == 1:
      # The step donates its input state. (Measured: the step right after a save copies instead, as the
      # save still holds those buffers; the values below must not depend on that.)
      assert all(leaf.is_deleted() for leaf in jax.tree.leaves(old))
    if step in (2, 4, 5):
      saved[step] = jax.device_get(state)
      ckpt.save(step, state)
  ckpt.close()
  assert ckpt.steps() == [4, 5]
  assert sorted(p.name for p in (tmp_path / "ckpt").iterdir() if p.name.isdigit()) == ["4", "5"]
  restored, step = ckpt_lib.Checkpointer(tmp_path / "ckpt", config_lib.CheckpointConfig()).restore(abstract)
  assert step == 5
  older = ckpt_lib.Checkpointer(tmp_path / "ckpt", config_lib.CheckpointConfig()).manager.restore(
      4, args=ocp.args.Composite(state=ocp.args.StandardRestore(abstract)))["state"]
  for got, want in ((restored, saved[5]), (older, saved[4])):
    assert int(got.step) == int(want.step)
    for a, b in zip(jax.tree.leaves(got), jax.tree.leaves(want)):
      np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
  assert not np.array_equal(saved[4].params["embed"]["embedding"], saved[5].params["embed"]["embedding"])


def test_reshard_data_resumes_at_the_global_batch_of_the_step(tmp_path):
  """A checkpoint written by 2 processes (each reading half of every global batch) resumed by 1 process
  with reshard_data: the state restores, and the next batch is global batch `step`, which the 2 processes
  would have read together (process i takes rows i, i+2, ... of it). Step 7 lies in the second epoch."""
  *_, abstract, _, state = _state_on_one_device()
  source = pipeline.ArraySource({"row": np.arange(24)})
  step = 7
  halves = []
  for i in range(2):
    it = iter(pipeline.make_dataset(source, batch_size=2, seed=3, process_index=i, process_count=2))
    for _ in range(step):
      next(it)
    halves.append(next(it)["row"])
  expected = np.stack(halves, axis=1).reshape(-1)             # [p0 row 0, p1 row 0, p0 row 1, p1 row 1]
  # The 2-process checkpoint: one process's save, its data item renamed as the two processes' files.
  it = iter(pipeline.make_dataset(source, batch_size=4, seed=3))
  ckpt = ckpt_lib.Checkpointer(tmp_path / "ckpt", config_lib.CheckpointConfig(async_save=False))
  ckpt.save(step, state, it)
  ckpt.close()
  data = tmp_path / "ckpt" / str(step) / "data"
  (data / "process_0-of-1.json").rename(data / "process_0-of-2.json")
  shutil.copy(data / "process_0-of-2.json", data / "process_1-of-2.json")

  fresh = iter(pipeline.make_dataset(source, batch_size=4, seed=3))
  reader = ckpt_lib.Checkpointer(tmp_path / "ckpt", config_lib.CheckpointConfig())
  with pytest.raises(config_lib.ConfigError, match="reshard-data"):
    reader.restore(abstract, fresh)
  restored, got_step = reader.restore(abstract, fresh, reshard_data=True)
  assert got_step == step
  for a, b in zip(jax.tree.leaves(restored), jax.tree.leaves(state)):
    np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
  np.testing.assert_array_equal(next(fresh)["row"], expected)


def _write_experiment(tmp_path, steps):
  cfg = {
      "name": "sig", "runs_dir": str(tmp_path / "runs"),
      "model": dict(TINY_MODEL, vocab_size=260, segment_length=48),
      # decay_steps fixed: the schedule must not depend on `steps`, which the resumed run changes.
      "train": {"steps": steps, "batch_size": 4, "warmup_steps": 2, "decay_steps": 1000},
      "data": {"kind": "qa", "task": "qa1", "num_segments": 2, "train_size": 64, "eval_size": 8,
               "num_sentences": 1},
      "mesh": {"data": 1, "num_devices": 1},
      "checkpoint": {"every": 10000},
      "logging": {"every": 1, "progress": False, "tensorboard": False, "peak_flops": 1e9},
  }
  path = tmp_path / "exp.yaml"
  path.write_text(yaml.safe_dump(cfg))
  return path


@pytest.mark.slow
def test_sigterm_saves_a_restorable_checkpoint(tmp_path):
  path = _write_experiment(tmp_path, steps=100000)
  env = dict(os.environ, PYTHONPATH=str(REPO))
  proc = subprocess.Popen([sys.executable, str(REPO / "train.py"), "--config", str(path)], cwd=REPO,
                          env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
  metrics = tmp_path / "runs" / "sig" / "metrics.jsonl"
  deadline = time.time() + 240
  while time.time() < deadline and proc.poll() is None:
    if metrics.exists() and len(metrics.read_text().splitlines()) >= 3:
      break
    time.sleep(0.5)
  assert proc.poll() is None, proc.communicate()[0]
  proc.send_signal(signal.SIGTERM)
  out, _ = proc.communicate(timeout=120)
  assert proc.returncode == 0, out
  assert "SIGTERM at step" in out, out
  stopped_at = int(out.split("SIGTERM at step ")[1].split(":")[0])
  ckpts = tmp_path / "runs" / "sig" / "checkpoints"
  assert (ckpts / str(stopped_at)).is_dir()
  # The same command, with a finite step count, resumes from that checkpoint and finishes.
  path = _write_experiment(tmp_path, steps=stopped_at + 2)
  again = subprocess.run([sys.executable, str(REPO / "train.py"), "--config", str(path)], cwd=REPO,
                         env=env, capture_output=True, text=True, timeout=300)
  assert again.returncode == 0, again.stdout + again.stderr
  assert f"from step {stopped_at}" in again.stdout
  assert (tmp_path / "runs" / "sig" / "final_eval.json").is_file()
  # The restored state is the one saved at SIGTERM: interrupted + resumed metrics equal those of an
  # uninterrupted run of the same config (in this process), step for step, bit for bit.
  reference = config_lib.load_config(str(path), [f"runs_dir={tmp_path / 'reference'}"])
  train_loop.train(reference, echo=lambda s: None)
  keys = ("step", "loss", "accuracy", "grad_norm", "lr")
  def rows(root):
    return [{k: r[k] for k in keys} for r in metrics_lib.read_metrics(root / "sig", "train")]
  assert rows(tmp_path / "runs") == rows(tmp_path / "reference")
  assert [r["step"] for r in rows(tmp_path / "runs")] == list(range(1, stopped_at + 3))


@pytest.mark.parametrize("run_error, reported", [
    (OSError(28, "No space left on device", "metrics.jsonl"), ckpt_lib.CheckpointSaveError),
    (ValueError("something else"), ValueError),
])
def test_a_failed_save_is_reported_over_a_later_io_error(tmp_path, monkeypatch, run_error, reported):
  """On a full disk the background save that filled it fails first and training stops later writing
  metrics: leaving the checkpointer on that OSError reports the save (naming both); other errors stay
  the caller's own."""
  checkpointer = ckpt_lib.Checkpointer(tmp_path / "checkpoints", config_lib.CheckpointConfig())
  real_close = checkpointer.close

  def failing_close():
    real_close()
    raise ckpt_lib.CheckpointSaveError("saving checkpoint step 15 failed: No space left on device")

  monkeypatch.setattr(checkpointer, "close", failing_close)
  with pytest.raises(reported) as caught:
    with checkpointer:
      raise run_error
  if reported is ckpt_lib.CheckpointSaveError:
    assert "step 15" in str(caught.value) and "metrics.jsonl" in str(caught.value)
    assert caught.value.__cause__ is run_error
