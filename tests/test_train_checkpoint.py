"""Checkpoints restore bit-exactly onto another mesh shape; SIGTERM leaves a restorable checkpoint."""

import os
import pathlib
import signal
import subprocess
import sys
import time

import jax
import numpy as np
import pytest
import yaml

from lm2_jax.data import pipeline
from lm2_jax.model import LM2, ModelConfig
from lm2_jax.train import checkpoint as ckpt_lib
from lm2_jax.train import config as config_lib
from lm2_jax.train import mesh as mesh_lib
from lm2_jax.train import optimizer as opt_lib
from lm2_jax.train import state as state_lib
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


def _write_experiment(tmp_path, steps):
  cfg = {
      "name": "sig", "runs_dir": str(tmp_path / "runs"),
      "model": dict(TINY_MODEL, vocab_size=260, segment_length=48),
      "train": {"steps": steps, "batch_size": 4, "warmup_steps": 2},
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
