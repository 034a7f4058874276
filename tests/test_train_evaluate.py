"""Held-out evaluation and reports; also home of the tiny run fixtures the other trainer tests import."""

import json

import numpy as np
import pytest

from lm2_jax.data import qa
from lm2_jax.train import config as config_lib
from lm2_jax.train import evaluate as eval_lib
from test_qa_layout import TOK, replay_row

C, T, V = 4, 8, 32

TINY_MODEL = dict(vocab_size=V, d_model=32, num_layers=1, num_heads=4, num_kv_heads=2, mlp_dim=64,
                  segment_length=T, use_memory=True, num_slots=8, memory_heads=2)


class CountingSource:
  """Rows of a learnable toy language: token i+1 = token i + stride (mod V), QA bookkeeping attached.

  `nan_from` puts NaN into the loss mask of rows >= nan_from (to make a loss non-finite on purpose).
  """

  def __init__(self, num_rows: int, seed: int = 0, nan_from: int | None = None):
    self.num_rows, self.seed, self.nan_from = num_rows, seed, nan_from

  def __len__(self):
    return self.num_rows

  def __getitem__(self, index):
    rng = np.random.default_rng([self.seed, int(index)])
    start = int(rng.integers(V))
    seq = (start + np.arange(C * T + 1)) % V
    loss_mask = np.ones(C * T, np.float32)
    if self.nan_from is not None and index >= self.nan_from:
      loss_mask[:] = np.nan
    return {
        "inputs": seq[:-1].astype(np.int32), "targets": seq[1:].astype(np.int32),
        "loss_mask": loss_mask, "valid": np.ones(C * T, bool), "resets": np.arange(C) == 0,
        "fact_segment": np.int32(index % (C - 1)), "question_segment": np.int32(C - 1),
    }


def tiny_config(runs_dir, name="tiny", **sections) -> config_lib.RunConfig:
  """A RunConfig of the tiny model on one device; `sections` deep-merge over the defaults."""
  data = {
      "name": name, "runs_dir": str(runs_dir), "model": dict(TINY_MODEL),
      "train": {"steps": 8, "batch_size": 8, "learning_rate": 1e-2, "warmup_steps": 2},
      "data": {"num_segments": C, "shuffle": True, "seed": 3},
      "mesh": {"data": 1, "num_devices": 1},
      "checkpoint": {"every": 4, "keep": 3, "async_save": True},
      "logging": {"every": 1, "progress": False, "tensorboard": False, "peak_flops": 1e9},
  }
  for key, value in sections.items():
    data[key] = {**data[key], **value} if isinstance(value, dict) and key != "model" else value
  return config_lib.from_dict(data)


def sources(train_rows=64, eval_rows=16, **kw):
  return CountingSource(train_rows, seed=0, **kw), CountingSource(eval_rows, seed=1)


def test_evaluate_counts_answers_by_distance():
  # Rows 0..5, distances 3, 2, 1, 3, 2, 1; rows 1 and 4 (distance 2) wrong in one of two tokens.
  batches = [{"fact_segment": np.array([0, 1, 2]), "question_segment": np.array([3, 3, 3])},
             {"fact_segment": np.array([0, 1, 2]), "question_segment": np.array([3, 3, 3])}]
  stats = [{"nll_sum": np.array([1.0, 2.0, 3.0]), "weight_sum": np.array([2.0, 2.0, 2.0]),
            "correct_sum": np.array([2.0, 1.0, 2.0])},
           {"nll_sum": np.array([1.0, 1.0, 1.0]), "weight_sum": np.array([2.0, 2.0, 2.0]),
            "correct_sum": np.array([2.0, 0.0, 2.0])}]
  it = iter(stats)
  result = eval_lib.evaluate(lambda b: next(it), batches)
  assert result["num_samples"] == 6
  assert result["loss"] == pytest.approx(9.0 / 12.0)
  assert result["accuracy"] == pytest.approx(9.0 / 12.0)
  assert result["answer_accuracy"] == pytest.approx(4 / 6)
  assert result["accuracy_by_distance"] == {"1": 1.0, "2": 0.0, "3": 1.0}


def test_accuracy_last_fact_elsewhere_of_a_recency_model_on_replayed_stories():
  """Held-out qa1 rows answered by the recency shortcut (the place of the story's last sentence): right
  on every row whose last sentence is the supporting fact, elsewhere only when that place happens to be
  the answer. The expected figures come from replaying each row's story independently (babi_replay),
  not from the rows' own bookkeeping."""
  c, t = 4, 64
  src = qa.QASource("qa1", "validation", 0, TOK, c, t, 48)
  batches, stats, right, elsewhere, distance = [], [], [], [], []
  for start in range(0, len(src), 8):
    rows = [src[i] for i in range(start, start + 8)]
    batches.append({k: np.stack([r[k] for r in rows]) for k in eval_lib.QA_KEYS[:3]})
    ok = []
    for row in rows:
      answer, fact_segment, last_supports, sentences = replay_row(row, c, t, src.offset)
      ok.append(sentences[-1].rstrip(".").split()[-1] == answer)
      right.append(ok[-1])
      elsewhere.append(not last_supports)
      distance.append(c - 1 - fact_segment)
    # Two target tokens per row, the answer's and EOS's: both right, or only EOS.
    stats.append({"nll_sum": np.ones(8), "weight_sum": np.full(8, 2.0),
                  "correct_sum": np.where(ok, 2.0, 1.0)})
  right, elsewhere, distance = map(np.asarray, (right, elsewhere, distance))
  it = iter(stats)
  result = eval_lib.evaluate(lambda b: next(it), batches)
  assert 10 <= elsewhere.sum() <= len(src) - 10 and right[~elsewhere].all()
  assert 0 < right[elsewhere].mean() < 1
  assert result["accuracy_last_fact_elsewhere"] == pytest.approx(right[elsewhere].mean())
  assert result["answer_accuracy"] == pytest.approx(right.mean())
  assert result["accuracy_by_distance"] == pytest.approx(
      {str(d): right[distance == d].mean() for d in sorted(set(distance.tolist()))})


def test_evaluate_without_qa_fields_has_no_answer_accuracy():
  stats = {"nll_sum": np.array([1.0]), "weight_sum": np.array([0.0]), "correct_sum": np.array([0.0])}
  result = eval_lib.evaluate(lambda b: stats, [{"inputs": np.zeros((1, 4))}])
  assert "answer_accuracy" not in result
  assert result["loss"] == 1.0  # an all-masked batch divides by max(weight, 1)


def test_final_report_and_comparison_table(tmp_path):
  result = {"loss": 0.5, "accuracy": 0.9, "num_samples": 10, "answer_accuracy": 0.6,
            "accuracy_by_distance": {"1": 0.8, "3": 0.2}}
  report = eval_lib.final_report(result, use_memory=True)
  assert report["accuracy"] == 0.6 and report["use_memory"] is True and report["num_samples"] == 10
  eval_lib.write_json(tmp_path / "final_eval.json", report)
  assert eval_lib.read_report(tmp_path) == json.loads((tmp_path / "final_eval.json").read_text())
  other = dict(report, accuracy=0.17, accuracy_by_distance={"1": 0.2, "2": 0.1}, use_memory=False)
  table = eval_lib.comparison_table({"lm2": report, "nomem": other})
  lines = table.splitlines()
  assert "lm2" in lines[0] and "nomem" in lines[0]
  assert lines[1].split()[1:] == ["0.600", "0.170"]
  assert lines[3].split()[-2:] == ["-", "0.100"]  # distance 2: only the second run has it


def test_tiny_config_is_valid(tmp_path):
  cfg = tiny_config(tmp_path, train={"steps": 3})
  assert cfg.train.steps == 3 and cfg.train.batch_size == 8
  assert cfg.model_config().segment_length == T
