"""The training loop: exact resume, NaN stop, corrupt-checkpoint fallback, a loss that falls."""

import logging
import shutil

import numpy as np
import pytest

from lm2_jax.train import metrics as metrics_lib
from lm2_jax.train.loop import train
from test_train_evaluate import sources, tiny_config


def _losses(run_dir):
  return {r["step"]: r["loss"] for r in metrics_lib.read_metrics(run_dir, "train")}


@pytest.mark.slow
def test_resume_gives_bit_identical_losses(tmp_path):
  full = train(tiny_config(tmp_path, "full"), sources=sources(), echo=lambda s: None)
  assert full.status == "completed" and full.step == 8
  stopped = train(tiny_config(tmp_path, "split"), sources=sources(),
                  stop_requested=lambda step: step == 3, echo=lambda s: None)
  assert stopped.status == "interrupted" and stopped.step == 3
  resumed = train(tiny_config(tmp_path, "split"), sources=sources(), echo=lambda s: None)
  assert resumed.status == "completed" and resumed.step == 8
  a, b = _losses(tmp_path / "full"), _losses(tmp_path / "split")
  assert sorted(a) == sorted(b) == list(range(1, 9))
  # Bit for bit: the resumed run saw the same batches (iterator state), RNG, params and moments.
  assert [a[s] for s in sorted(a)] == [b[s] for s in sorted(b)]
  assert len(set(a.values())) > 1
  assert full.final_eval == resumed.final_eval


def test_nan_loss_stops_and_names_the_step(tmp_path):
  # Rows >= 40 carry a NaN loss mask; with batch 8 unshuffled, step 6 is the first to read them.
  cfg = tiny_config(tmp_path, "nan", train={"steps": 10}, data={"shuffle": False},
                    checkpoint={"every": 2})
  result = train(cfg, sources=sources(nan_from=40), echo=lambda s: None)
  assert result.status == "diverged" and result.step == 6
  assert "step 6" in result.message and "step 4" in result.message
  assert not (tmp_path / "nan" / "final_eval.json").exists()
  steps = sorted(int(p.name) for p in (tmp_path / "nan" / "checkpoints").iterdir() if p.name.isdigit())
  assert steps == [2, 4]  # the checkpoint due at step 6 was never written from a NaN state


def test_corrupt_latest_checkpoint_falls_back(tmp_path, caplog):
  """The run falls back to step 4, saved asynchronously while steps 5-8 went on; its state there (params,
  moments, step, RNG, data position) is what was saved: steps 5-8 repeat their metrics bit for bit.
  Its final save replaces the unreadable step 8 (a rerun would otherwise fall back to 4 again)."""
  cfg = tiny_config(tmp_path, "corrupt", train={"steps": 8})
  train(cfg, sources=sources(), echo=lambda s: None)
  first = metrics_lib.read_metrics(tmp_path / "corrupt", "train")
  ckpts = tmp_path / "corrupt" / "checkpoints"
  assert sorted(int(p.name) for p in ckpts.iterdir() if p.name.isdigit()) == [4, 8]
  shutil.rmtree(ckpts / "8" / "state")
  (ckpts / "8" / "state").mkdir()
  (ckpts / "8" / "state" / "garbage").write_bytes(b"\x00not a checkpoint")
  lines = []
  with caplog.at_level(logging.WARNING):
    # The same 8 steps (the learning-rate schedule depends on them), resumed from step 4.
    again = train(tiny_config(tmp_path, "corrupt", train={"steps": 8}), sources=sources(),
                  echo=lines.append)
  assert "resumed" in lines[0] and "from step 4" in lines[0]
  assert any("8 cannot be restored" in r.getMessage() for r in caplog.records)
  assert again.status == "completed" and again.step == 8
  keys = ("step", "loss", "accuracy", "grad_norm", "lr")
  replayed = [{k: r[k] for k in keys} for r in metrics_lib.read_metrics(tmp_path / "corrupt", "train")]
  original = [{k: r[k] for k in keys} for r in first]
  # Each step once (the rerun replaced the rows of 5-8), and 5-8 replayed bit for bit.
  assert replayed == original and [r["step"] for r in original] == list(range(1, 9))
  assert len({r["loss"] for r in original[4:]}) > 1
  assert not (ckpts / "8" / "state" / "garbage").exists() and (ckpts / "8" / "state" / "_METADATA").exists()


def test_training_reduces_loss_and_writes_outputs(tmp_path):
  cfg = tiny_config(tmp_path, "e2e", train={"steps": 30, "learning_rate": 3e-2, "warmup_steps": 3},
                    logging={"every": 5, "tensorboard": True, "eval_every": 15, "eval_batches": 1},
                    checkpoint={"every": 15})
  out = []
  result = train(cfg, sources=sources(train_rows=256), echo=out.append)
  assert result.status == "completed"
  losses = _losses(tmp_path / "e2e")
  assert losses[30] < 0.5 * losses[5]
  run = tmp_path / "e2e"
  assert (run / "config.yaml").is_file() and list((run / "tensorboard").iterdir())
  rows = metrics_lib.read_metrics(run)
  train_row = [r for r in rows if r["split"] == "train"][-1]
  assert {"loss", "accuracy", "grad_norm", "lr", "tokens_per_s", "step_time", "mfu"} <= set(train_row)
  assert np.isfinite(train_row["mfu"]) and train_row["mfu"] > 0
  assert [r["step"] for r in rows if r["split"] == "eval"] == [15, 30]
  report = result.final_eval
  assert set(report["accuracy_by_distance"]) == {"1", "2", "3"} and report["num_samples"] == 16
  assert report["use_memory"] is True
  assert any("segment(s) back" in line for line in out)
