"""BABILong evaluation end to end through eval.py's command line, and its bad-input errors."""

import json
import pathlib

import flax.linen as nn
import jax
import jax.numpy as jnp
import optax
import pytest

from lm2_jax.data import tokenizers
from lm2_jax.eval import babilong_eval, checkpoints, cli
from lm2_jax.model import LM2, ModelConfig
from lm2_jax.train.checkpoint import Checkpointer
from lm2_jax.train.config import CheckpointConfig, RunConfig, save_config
from lm2_jax.train.state import TrainState

T = 32   # room for qa1 / qa6 questions and answers in one segment
SEGMENTS = 3


def make_run(run_dir: pathlib.Path, **model) -> ModelConfig:
  """A train.py-style run directory holding one checkpoint of a randomly initialised tiny model."""
  cfg = ModelConfig.from_yaml("configs/model/tiny.yaml", segment_length=T, **model)
  params = nn.unbox(LM2(cfg).init(jax.random.key(0), jnp.zeros((1, T), jnp.int32))["params"])
  tx = optax.sgd(1e-3)
  state = TrainState(step=jnp.int32(7), params=params, opt_state=tx.init(params), rng=jax.random.PRNGKey(1))
  run = RunConfig(name=run_dir.name, runs_dir=str(run_dir.parent), model=cfg.to_dict(),
                  data={"num_segments": SEGMENTS})
  run_dir.mkdir(parents=True)
  save_config(run, run_dir / "config.yaml")
  saver = Checkpointer(run_dir / "checkpoints", CheckpointConfig(async_save=False))
  saver.save(7, state, None, run.to_dict())
  saver.close()
  return cfg


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
  root = tmp_path_factory.mktemp("runs")
  make_run(root / "mem")
  make_run(root / "nomem", use_memory=False)
  rows = babilong_eval.build_rows(["qa1", "qa6"], ["0k", "1k"], 2, 0, tokenizers.ByteTokenizer())
  data = root / "babilong.jsonl"
  data.write_text("".join(json.dumps(r) + "\n" for r in rows))
  return root, data


def test_restored_params_equal_the_saved_ones(runs):
  root, _ = runs
  model = checkpoints.load_model(root / "mem")
  cfg = ModelConfig.from_yaml("configs/model/tiny.yaml", segment_length=T)
  fresh = nn.unbox(LM2(cfg).init(jax.random.key(0), jnp.zeros((1, T), jnp.int32))["params"])
  assert model.step == 7 and model.trained_length == SEGMENTS * T and model.name == "mem"
  same = jax.tree.map(lambda a, b: bool(jnp.array_equal(a, b)), model.variables["params"], fresh)
  assert all(jax.tree.leaves(same))


def test_a_relative_run_path_loads(runs, monkeypatch):
  """Orbax needs absolute paths; `eval.py --run runs/NAME` is relative to the working directory."""
  root, _ = runs
  monkeypatch.chdir(root)
  model = checkpoints.load_model("mem")
  assert model.step == 7 and model.name == "mem"


def test_end_to_end_table_json_png(runs, tmp_path, capsys):
  root, data = runs
  out = tmp_path / "out"
  rc = cli.main(["--run", str(root / "mem"), "--checkpoint", str(root / "nomem" / "checkpoints" / "7"),
                 "--data", str(data), "--tasks", "qa1,qa6", "--lengths", "0k,1k", "--batch-size", "2",
                 "--out", str(out), "--no-progress"])
  printed = capsys.readouterr().out
  assert rc == 0
  results = json.loads((out / "babilong.json").read_text())
  assert results["tasks"] == ["qa1", "qa6"] and results["lengths"] == ["0k", "1k"]
  assert set(results["models"]) == {"mem", "nomem"}
  for name in ("mem", "nomem"):
    entry = results["models"][name]
    predictions = [json.loads(l) for l in (out / f"babilong_predictions_{name}.jsonl").read_text().splitlines()]
    assert len(predictions) == 8
    for task in ("qa1", "qa6"):
      for length in ("0k", "1k"):
        mine = [p for p in predictions if p["task"] == task and p["length"] == length]
        assert entry["counts"][task][length]["total"] == 2
        assert entry["accuracy"][task][length] == sum(p["correct"] for p in mine) / 2
    assert entry["average"]["0k"] == pytest.approx(
        (entry["accuracy"]["qa1"]["0k"] + entry["accuracy"]["qa6"]["0k"]) / 2)
  # The memory model streams everything; the memory-less one is cut to its training context at 1k.
  assert results["models"]["mem"]["max_context"] is None
  assert results["models"]["mem"]["truncated_lengths"] == []
  assert results["models"]["nomem"]["max_context"] == (SEGMENTS - 1) * T
  rows = [json.loads(l) for l in data.read_text().splitlines()]
  too_long = sorted({r["length"] for r in rows if len((r["input"] + " ").encode()) > (SEGMENTS - 1) * T})
  assert "1k" in too_long
  assert results["models"]["nomem"]["truncated_lengths"] == too_long
  assert "1k*" in printed and "truncated to their last 64 tokens" in printed
  assert "average over qa1, qa6" in printed
  png = (out / "babilong.png").read_bytes()
  assert png[:8] == b"\x89PNG\r\n\x1a\n" and len(png) > 5000


def _error(capsys, argv) -> str:
  assert cli.main(argv) == 2
  return capsys.readouterr().err


def test_missing_and_non_checkpoint_dirs(runs, tmp_path, capsys):
  assert "does not exist" in _error(capsys, ["--run", str(tmp_path / "nope")])
  (tmp_path / "empty").mkdir()
  assert "is not a checkpoint" in _error(capsys, ["--run", str(tmp_path / "empty")])


def test_config_checkpoint_mismatch(runs, tmp_path, capsys):
  root, data = runs
  other = tmp_path / "other.yaml"
  other.write_text((pathlib.Path("configs/model/tiny.yaml").read_text() + "d_model: 64\n"))
  err = _error(capsys, ["--run", str(root / "mem"), "--model-config", str(other), "--data", str(data)])
  assert "does not match the checkpoint" in err and "config expects (64," in err and "checkpoint has (32," in err


def test_unknown_task_and_length(runs, capsys):
  root, _ = runs
  assert "qa11" in _error(capsys, ["--run", str(root / "mem"), "--tasks", "qa1,qa11"])
  assert "3k" in _error(capsys, ["--run", str(root / "mem"), "--lengths", "0k,3k"])


@pytest.mark.parametrize("line, message", [
    ("{not json", "not valid JSON"),
    ('["a list"]', "expected a JSON object"),
    ('{"task": "qa1", "length": "0k", "input": "x", "question": "q"}', "'answer'"),
    ('{"task": "qa42", "length": "0k", "input": "x", "question": "q", "answer": "a"}', "unknown bAbI task"),
])
def test_malformed_eval_file_names_file_and_line(runs, tmp_path, capsys, line, message):
  root, data = runs
  bad = tmp_path / "bad.jsonl"
  bad.write_text(data.read_text().splitlines()[0] + "\n" + line + "\n")
  err = _error(capsys, ["--run", str(root / "mem"), "--data", str(bad), "--tasks", "qa1",
                        "--lengths", "0k"])
  assert f"{bad}:2" in err and message in err


def test_data_without_the_asked_cells(runs, capsys):
  root, data = runs
  err = _error(capsys, ["--run", str(root / "mem"), "--data", str(data), "--tasks", "qa1",
                        "--lengths", "2k"])
  assert "no samples for: qa1 2k" in err
