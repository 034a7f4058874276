"""`eval.py recall`: a recall run's held-out rows rebuilt with k x its segments, scored through the model."""

import dataclasses
import json
import shutil

import numpy as np
import pytest

from lm2_jax.data.recall import QUERY
from lm2_jax.eval import cli, recall_eval
from lm2_jax.train.loop import train
from test_train_evaluate import TINY_MODEL, tiny_config

RECALL = {"kind": "recall", "num_segments": 3, "recall_pairs": 2, "recall_queries": 2,
          "recall_overwrite": 0.5, "recall_filler": 1, "recall_keys": 6, "recall_values": 6,
          "eval_size": 16, "seed": 3, "shuffle": True}


@pytest.fixture(scope="module")
def recall_run(tmp_path_factory):
  root = tmp_path_factory.mktemp("runs")
  cfg = tiny_config(root, "recall", data=RECALL, train={"steps": 2, "batch_size": 8})
  result = train(cfg, echo=lambda s: None)
  assert result.status == "completed"
  return cfg, root / "recall"


def test_longer_rows_keep_the_facts_first_and_the_queries_last(recall_run):
  cfg, _ = recall_run
  c, t = cfg.data.num_segments, 8
  for k in (1, 4):
    source = recall_eval.rows_at_length(cfg.data, t, k, rows=8)
    for i in range(8):
      row = source[i]
      assert row["inputs"].shape == (c * k * t,)
      assert row["fact_segment"] < c - 1 and row["question_segment"] == c * k - 1
      segments = row["inputs"].reshape(c * k, t)
      assert QUERY in segments[-1] and not np.isin(QUERY, segments[:-1]).any()
      assert np.flatnonzero(row["loss_mask"]).min() >= (c * k - 1) * t


def test_one_x_reproduces_the_runs_own_final_evaluation(recall_run):
  cfg, run_dir = recall_run
  final = json.loads((run_dir / "final_eval.json").read_text())
  results = recall_eval.evaluate_lengths(run_dir, [1, 2], rows=cfg.data.eval_size, batch_size=8)
  assert results[1]["answer_accuracy"] == pytest.approx(final["accuracy"])
  assert results[1]["loss"] == pytest.approx(final["loss"], rel=1e-5)
  assert results[2]["segments"] == 2 * cfg.data.num_segments and results[2]["num_samples"] == 16
  assert set(results[2]["accuracy_by_distance"]) <= {str(d) for d in range(4, 6)}


def test_cli_writes_the_table_and_refuses_other_runs(recall_run, tmp_path, capsys):
  _, run_dir = recall_run
  assert cli.main(["recall", "--run", str(run_dir), "--lengths", "1,2", "--rows", "8",
                   "--out", str(tmp_path)]) == 0
  data = json.loads((tmp_path / "recall_lengths.json").read_text())
  assert set(data["recall"]) == {"1", "2"}
  assert "| recall | 2x | 6 | 4 |" in (tmp_path / "recall_lengths.md").read_text()
  text_run = tmp_path / "text"
  shutil.copytree(run_dir, text_run)
  for saved in (text_run / "checkpoints").glob("*/config"):
    shutil.rmtree(saved)  # the run's config.yaml is then what says what it trained on
  config = (text_run / "config.yaml").read_text()
  (text_run / "config.yaml").write_text(config.replace("kind: recall", "kind: text"))
  assert cli.main(["recall", "--run", str(text_run)]) == 2
  assert "data.kind: recall" in capsys.readouterr().err


def test_pairs_replaces_the_facts_per_segment(recall_run):
  cfg, run_dir = recall_run
  source = recall_eval.rows_at_length(cfg.data, 8, 1, rows=4)
  more = recall_eval.rows_at_length(dataclasses.replace(cfg.data, recall_pairs=3), 8, 1, rows=4)
  assert (more[0]["inputs"][:16] > 1).sum() > (source[0]["inputs"][:16] > 1).sum()
  result = recall_eval.evaluate_lengths(run_dir, [1], rows=8, batch_size=8, pairs=3)
  assert result[1]["pairs"] == 3 * (cfg.data.num_segments - 1)


@pytest.fixture(scope="module")
def qa_run(tmp_path_factory):
  root = tmp_path_factory.mktemp("runs")
  cfg = tiny_config(root, "qa", model={**TINY_MODEL, "vocab_size": 384, "segment_length": 16},
                    data={"kind": "qa", "task": "qa1", "tokenizer": "words", "num_segments": 4,
                          "num_sentences": 2, "max_sentences": 4, "eval_size": 16},
                    train={"steps": 2, "batch_size": 8})
  assert train(cfg, echo=lambda s: None).status == "completed"
  return cfg, root / "qa"


def test_qa_rows_at_k_times_keep_the_story_first_and_the_question_last(qa_run):
  cfg, _ = qa_run
  c, t = cfg.data.num_segments, cfg.model_config().segment_length
  short = recall_eval.rows_at_length(cfg.data, t, 1, rows=8)
  source = recall_eval.rows_at_length(cfg.data, t, 4, rows=8)
  for i in range(8):
    row, base = source[i], short[i]
    segments = row["inputs"].reshape(4 * c, t)
    assert row["fact_segment"] <= c - 2 and row["question_segment"] == 4 * c - 1
    # The added segments hold padding only (no filler in this run); the story and the question are the
    # 1x row's, moved apart.
    assert (segments[c - 1:-1] == 0).all()
    np.testing.assert_array_equal(segments[:c - 1].ravel(), base["inputs"][:(c - 1) * t])
    np.testing.assert_array_equal(segments[-1], base["inputs"][-t:])
    assert np.flatnonzero(row["loss_mask"]).min() >= (4 * c - 1) * t


def test_qa_one_x_reproduces_the_runs_own_final_evaluation(qa_run):
  cfg, run_dir = qa_run
  final = json.loads((run_dir / "final_eval.json").read_text())
  results = recall_eval.evaluate_lengths(run_dir, [1, 4], rows=cfg.data.eval_size, batch_size=8)
  assert results[1]["answer_accuracy"] == pytest.approx(final["accuracy"])
  assert results[1]["loss"] == pytest.approx(final["loss"], rel=1e-5)
  assert results[4]["segments"] == 4 * cfg.data.num_segments
  assert results[4]["chance"] == pytest.approx(final["chance"])


def test_qa_filler_density_fills_the_added_segments(qa_run):
  cfg, _ = qa_run
  c, t = cfg.data.num_segments, cfg.model_config().segment_length
  source = recall_eval.rows_at_length(cfg.data, t, 4, rows=4, filler_density=1.0)
  for i in range(4):
    row = source[i]
    segments = row["inputs"].reshape(4 * c, t)
    assert (segments[c - 1:-1] > 0).any(axis=1).all()  # every added segment holds filler text
    assert row["fact_segment"] <= c - 2 and row["question_segment"] == 4 * c - 1
