"""Bad input met at start-up or on resume: a corpus whose last line is cut short, a corpus that changed under
a resumed run, an unreadable tokenizer, a mesh that does not fit the devices, a metrics.jsonl row cut short.
Each is one line on stderr naming what to fix and exit code 2 (or a counted skip), never a traceback."""

import importlib.util
import json
import logging

import pytest

import harness
from lm2_jax.train import metrics as metrics_lib

_spec = importlib.util.spec_from_file_location("train_entry", harness.REPO / "train.py")
train_entry = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(train_entry)


def _corpus(path, documents, offset=0):
  with open(path, "w", encoding="utf-8") as f:
    for i in range(documents):
      f.write(json.dumps({"text": f"document {i + offset}: the fox jumps over the lazy dog. " * 3}) + "\n")
  return path


def _text_config(tmp_path, **data):
  """A tiny text run over two JSONL files (byte tokenizer), 2 steps, a checkpoint at step 2."""
  cfg = harness.experiment(tmp_path / "runs", "text", steps=2)
  cfg["model"]["vocab_size"] = 260
  cfg["data"] = {"kind": "text", "num_segments": 2, "tokenizer": "byte",
                 "train_files": str(_corpus(tmp_path / "train.jsonl", 60)),
                 "eval_files": str(_corpus(tmp_path / "eval.jsonl", 12, offset=100)), **data}
  cfg["checkpoint"]["every"] = 2
  return harness.write_config(tmp_path / "text.yaml", cfg)


def _main(capsys, config, *overrides):
  """(exit code, stderr) of train.py in this process; stderr must be one line without a traceback."""
  code = train_entry.main(["--config", str(config), *overrides])
  err = capsys.readouterr().err
  assert "Traceback" not in err, err
  return code, err.strip()


def test_a_corpus_whose_last_line_is_cut_short_is_one_error_naming_the_line(tmp_path, capsys):
  config = _text_config(tmp_path)
  train = tmp_path / "train.jsonl"
  train.write_bytes(train.read_bytes()[:-25])        # the last document stops mid-string
  code, err = _main(capsys, config)
  assert code == 2 and err.count("\n") == 0
  assert f"data.train_files: {train}:60: not JSON" in err and "cut short" in err
  assert not (tmp_path / "runs" / "text").exists()


@pytest.mark.parametrize("kind, content, says", [
    ("hf", "not json at all", "is not a Hugging Face tokenizer.json"),
    ("hf", None, "does not exist"),
    ("sentencepiece", "\x00\x01 garbage", "is not a SentencePiece model file"),
    ("hf", "DIR", "tokenizer"),
])
def test_an_unreadable_tokenizer_is_one_error_naming_the_key(tmp_path, capsys, kind, content, says):
  path = tmp_path / "tokenizer.bin"
  if content == "DIR":
    path.mkdir()
  elif content is not None:
    path.write_text(content)
  code, err = _main(capsys, _text_config(tmp_path), f"data.tokenizer={kind}", f"data.tokenizer_path={path}")
  assert code == 2 and err.count("\n") == 0, err
  assert err.startswith("config error: data.tokenizer") and says in err, err


@pytest.mark.parametrize("mesh", ["mesh.data=3", "mesh.tensor=3", "mesh.num_devices=99"])
def test_a_mesh_that_does_not_fit_the_devices_is_one_error(tmp_path, capsys, mesh):
  code, err = _main(capsys, _text_config(tmp_path), "mesh.num_devices=0", mesh)
  assert code == 2 and err.count("\n") == 0 and "config error: mesh" in err, err


@pytest.mark.slow
def test_a_corpus_changed_under_a_resumed_run_is_refused_before_anything_changes(tmp_path, capsys):
  config = _text_config(tmp_path)
  assert train_entry.main(["--config", str(config)]) == 0
  run = tmp_path / "runs" / "text"
  before = {p.name: p.read_bytes() for p in (run / "metrics.jsonl", run / "data_fingerprint.json")}
  # One more document: every row after it shifts, so the saved data position would point elsewhere.
  with open(tmp_path / "train.jsonl", "a", encoding="utf-8") as f:
    f.write(json.dumps({"text": "a document added after the run started"}) + "\n")
  capsys.readouterr()
  code, err = _main(capsys, config, "train.steps=4")
  assert code == 2 and err.count("\n") == 0
  assert "data.train_files changed since this run started" in err and "step 2" in err, err
  assert {p: (run / p).read_bytes() for p in before} == before
  assert harness.finished_steps(run) == [2]
  # The same files again: the run resumes.
  _corpus(tmp_path / "train.jsonl", 60)
  assert train_entry.main(["--config", str(config), "train.steps=4"]) == 0
  assert "resumed" in capsys.readouterr().out


def test_a_metrics_row_cut_short_is_a_counted_skip_at_the_end_and_an_error_inside(tmp_path, caplog):
  rows = [{"step": s, "split": "train", "loss": 1.0 / s} for s in (1, 2, 3)]
  lines = [json.dumps(r) for r in rows]
  (tmp_path / "metrics.jsonl").write_text("\n".join(lines) + "\n" + lines[0][:17])
  with caplog.at_level(logging.WARNING):
    assert metrics_lib.read_metrics(tmp_path) == rows
  assert "skipped line 4, cut short" in caplog.text
  (tmp_path / "metrics.jsonl").write_text(lines[0][:17] + "\n" + "\n".join(lines) + "\n")
  with pytest.raises(ValueError, match="metrics.jsonl:1: not a metrics row"):
    metrics_lib.read_metrics(tmp_path)

