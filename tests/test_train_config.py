"""Run config: composition, overrides, and start-up errors that name the bad key."""

import dataclasses
import subprocess
import sys

import numpy as np
import pytest
import yaml

from lm2_jax.train import config as config_lib
from lm2_jax.train import inputs
from test_train_evaluate import TINY_MODEL

REPO = __import__("pathlib").Path(__file__).resolve().parents[1]


def _write(path, data):
  path.write_text(yaml.safe_dump(data))
  return path


@pytest.fixture
def experiment(tmp_path):
  (tmp_path / "model").mkdir()
  _write(tmp_path / "model" / "m.yaml", TINY_MODEL)
  _write(tmp_path / "train.yaml", {"steps": 50, "batch_size": 8})
  return _write(tmp_path / "exp.yaml", {"name": "e", "model": "model/m.yaml", "train": "train.yaml",
                                        "logging": {"every": 5}})


def test_sections_are_included_and_overridden(experiment, tmp_path):
  cfg = config_lib.load_config(experiment, ["train.steps=200", "model.use_memory=false",
                                            "train.learning_rate=1e-4", "mesh.fsdp=2"])
  assert cfg.train.steps == 200 and cfg.train.batch_size == 8
  assert cfg.model["use_memory"] is False and cfg.model["d_model"] == TINY_MODEL["d_model"]
  assert cfg.train.learning_rate == 1e-4 and cfg.mesh.fsdp == 2 and cfg.logging.every == 5
  assert cfg.model_config().use_memory is False
  # base: + include: compose an experiment from another one and a partly overridden preset.
  _write(tmp_path / "child.yaml", {"base": "exp.yaml", "name": "child",
                                   "model": {"include": "model/m.yaml", "num_slots": 4},
                                   "train": {"steps": 7}})
  child = config_lib.load_config(tmp_path / "child.yaml")
  assert child.name == "child" and child.train.steps == 7 and child.train.batch_size == 8
  assert child.model["num_slots"] == 4 and child.logging.every == 5


def test_resolved_config_round_trips(experiment, tmp_path):
  cfg = config_lib.load_config(experiment, ["train.steps=3"])
  config_lib.save_config(cfg, tmp_path / "resolved.yaml")
  assert config_lib.load_config(tmp_path / "resolved.yaml") == cfg


@pytest.mark.parametrize("override, match", [
    ("train.stepz=3", r"unknown key\(s\) train.stepz"),
    ("bogus.x=1", r"unknown key\(s\) bogus"),
    ("train.steps=abc", r"train.steps: expected int, got str"),
    ("train.steps=1.5", r"train.steps: expected int"),
    ("checkpoint.enabled=3", r"checkpoint.enabled: expected bool"),
    ("data.kind=images", r"data.kind: 'images' is not one of"),
    ("train.micro_batches=3", r"micro_batches=3 must be >= 1 and divide"),
    ("mesh.data=0", r"mesh.data=0"),
    ("model.d_model=-4", r"model section: .*d_model"),
    ("model.not_a_field=1", r"model section: .*not_a_field"),
    ("train.steps", r"expected dotted key=value"),
])
def test_bad_values_fail_with_the_key(experiment, override, match):
  with pytest.raises(config_lib.ConfigError, match=match):
    config_lib.load_config(experiment, [override])


def test_missing_file_and_bad_yaml(tmp_path):
  with pytest.raises(config_lib.ConfigError, match="cannot read config file"):
    config_lib.load_config(tmp_path / "nope.yaml")
  (tmp_path / "bad.yaml").write_text("train: [1, 2\n")
  with pytest.raises(config_lib.ConfigError, match="bad.yaml: invalid YAML"):
    config_lib.load_config(tmp_path / "bad.yaml")


def test_default_experiments_are_valid_twins():
  lm2 = config_lib.load_config(REPO / "configs/experiment/default.yaml")
  nomem = config_lib.load_config(REPO / "configs/experiment/default-nomem.yaml")
  assert lm2.model_config().use_memory and not nomem.model_config().use_memory
  assert lm2.data == nomem.data and lm2.train == nomem.train
  assert {k: v for k, v in nomem.model.items() if k != "use_memory"} == {
      k: v for k, v in lm2.model.items() if k != "use_memory"}
  assert lm2.data.kind == "qa" and lm2.data.num_segments == 4 and lm2.data.loss_on == "answer"
  # Word tokens: a 16-token segment holds one or two facts, so facts lie in earlier segments than the
  # question and only the memory can carry them (segment-local attention).
  assert lm2.model_config().segment_length == 16 and lm2.model_config().attention == "segment"
  assert lm2.data.tokenizer == "words"


def test_entry_point_reports_config_errors():
  out = subprocess.run([sys.executable, str(REPO / "train.py"), "train.stepz=3"], cwd=REPO,
                       capture_output=True, text=True, timeout=120)
  assert out.returncode == 2
  assert "config error" in out.stderr and "train.stepz" in out.stderr


def test_every_segment_questions_reach_training_rows_only():
  data = config_lib.DataConfig(task="qa1", tokenizer="words", num_sentences=2, max_sentences=6,
                               train_size=64, eval_size=64, questions="every")
  train, held_out = inputs.make_sources(data, 16, 384)

  def answers(src):  # answers per row: each loss span ends with EOS
    return [int(np.sum(src[i]["targets"][src[i]["loss_mask"] > 0] == src.tokenizer.eos_id)) for i in range(64)]

  assert max(answers(train)) > 1 and set(answers(held_out)) == {1}


def test_a_text_run_names_data_on_error_and_skips_with_it(tmp_path, capsys):
  (tmp_path / "good.txt").write_text("a readable document " * 20)
  (tmp_path / "bad.txt").write_bytes(b"fine so far \xff\xfe not UTF-8")
  data = config_lib.DataConfig(kind="text", train_files=str(tmp_path / "*.txt"),
                               eval_files=str(tmp_path / "good.txt"), num_segments=2)
  with pytest.raises(config_lib.ConfigError, match=r"data.train_files: .*bad.txt: invalid UTF-8 at byte "
                     r"offset 12 \(set data.on_error=skip"):
    inputs.make_sources(data, 8, 260)
  train_rows, _ = inputs.make_sources(dataclasses.replace(data, on_error="skip"), 8, 260)
  assert train_rows.corpus_stats.skipped == {"decode_error": 1} and len(train_rows) > 0
  assert "data.train_files: skipped 1 decode_error; first: " in capsys.readouterr().err
