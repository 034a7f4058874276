"""BABILong evaluation end to end through eval.py's command line, answers counted with an oracle model,
the full-attention baseline's context cap, and bad-input errors."""

import json
import pathlib

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
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


class Oracle:
  """Stands in for the model's `Decoder` (patched into `babilong_eval`): a model that answers right.

  It keeps the real (valid) tokens each row was fed; `generate` answers with the answer of the row whose
  whole prompt (context, question, SEP) it saw, and with a wrong answer when it saw no such prompt (a
  context cut to the model's limit). It checks that a full-attention decoder's cache (`max_length`)
  holds everything fed to it, and records the `max_length` of every decoder built.
  """

  WRONG = "nowhere"

  def __init__(self, rows, tok):
    self.tok = tok
    self.answers = {self.prompt(r): r["answer"] for r in rows}
    assert len(self.answers) == len(rows)          # every prompt names its row
    self.max_lengths = []

  def prompt(self, row) -> tuple:
    tok = self.tok
    return tuple(tok.encode(row["input"] + " ") + tok.encode(row["question"]) + [tok.sep_id])

  def decoder(self, cfg, variables, max_length=None):
    del variables
    self.max_lengths.append(max_length)
    oracle = self

    class Decoder:
      def __init__(self):
        self.cfg = cfg

      def init_state(self, batch_size):
        return {"seen": [[] for _ in range(batch_size)], "fed": 0}

      def feed(self, state, tokens, valid):
        tokens, valid = np.asarray(tokens), np.asarray(valid, bool)
        fed = state["fed"] + tokens.shape[1]
        assert max_length is None or fed <= max_length, (fed, max_length)
        seen = [s + t[v].tolist() for s, t, v in zip(state["seen"], tokens, valid)]
        return np.zeros(tokens.shape + (1,), np.float32), {"seen": seen, "fed": fed}

      def generate(self, state, last_logits, max_new_tokens, *, eos_id, **sampling):
        del last_logits, sampling
        out = np.full((len(state["seen"]), max_new_tokens), eos_id, np.int32)
        for i, seen in enumerate(state["seen"]):
          ids = oracle.tok.encode(oracle.answers.get(tuple(seen), oracle.WRONG))[:max_new_tokens - 1]
          out[i, :len(ids)] = ids
        return out, state

    return Decoder()


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


@pytest.mark.parametrize("oracle", [False, True])
def test_end_to_end_table_json_png(runs, tmp_path, capsys, monkeypatch, oracle):
  """The checkpoints load for real; they answer with their own (random) weights, or through the oracle:
  then the memory model, which streams every context, answers all right, and the memory-less one, which
  sees the last (SEGMENTS - 1) * T context tokens, answers right exactly the rows whose context fits."""
  root, data = runs
  rows = [json.loads(l) for l in data.read_text().splitlines()]
  if oracle:
    monkeypatch.setattr(babilong_eval, "Decoder", Oracle(rows, tokenizers.ByteTokenizer()).decoder)
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
        if oracle:
          cell = [r for r in rows if r["task"] == task and r["length"] == length]
          fits = [name == "mem" or len((r["input"] + " ").encode()) <= (SEGMENTS - 1) * T for r in cell]
          assert entry["counts"][task][length]["correct"] == sum(fits)
          assert all(p["correct"] == (p["prediction"] == p["answer"]) for p in mine)
    assert entry["average"]["0k"] == pytest.approx(
        (entry["accuracy"]["qa1"]["0k"] + entry["accuracy"]["qa6"]["0k"]) / 2)
  # The memory model streams everything; the memory-less one is cut to its training context at 1k.
  assert results["models"]["mem"]["max_context"] is None
  assert results["models"]["mem"]["truncated_lengths"] == []
  assert results["models"]["nomem"]["max_context"] == (SEGMENTS - 1) * T
  too_long = sorted({r["length"] for r in rows if len((r["input"] + " ").encode()) > (SEGMENTS - 1) * T})
  assert "1k" in too_long
  assert results["models"]["nomem"]["truncated_lengths"] == too_long
  assert "1k*" in printed and "truncated to their last 64 tokens" in printed
  assert "average over qa1, qa6" in printed
  png = (out / "babilong.png").read_bytes()
  assert png[:8] == b"\x89PNG\r\n\x1a\n" and len(png) > 5000


@pytest.fixture(scope="module")
def oracle_rows():
  """6 rows per cell, in the builder's order (not sorted by length), answers varied."""
  rows = babilong_eval.build_rows(["qa1", "qa6"], ["0k", "1k"], 6, 0, tokenizers.ByteTokenizer())
  qa1 = [len((r["input"] + " ").encode()) for r in rows if r["task"] == "qa1" and r["length"] == "0k"]
  assert qa1 != sorted(qa1)
  return rows


def _eval_model(name, **model):
  cfg = ModelConfig.from_yaml("configs/model/tiny.yaml", segment_length=T, **model)
  return checkpoints.EvalModel(name, cfg, None, tokenizers.ByteTokenizer(), trained_length=7 * T)


def test_babilong_counts_the_answers_of_a_model_that_answers_right(oracle_rows, monkeypatch):
  """Batches of 2 after sorting each cell by length: every answer still goes to its own row."""
  oracle = Oracle(oracle_rows, tokenizers.ByteTokenizer())
  monkeypatch.setattr(babilong_eval, "Decoder", oracle.decoder)
  report = babilong_eval.evaluate(_eval_model("mem"), oracle_rows, batch_size=2, progress=False)
  assert report.max_context is None and oracle.max_lengths == [None]
  assert len(report.predictions) == len(oracle_rows) == 24
  assert all(p["correct"] and p["prediction"] == p["answer"] and not p["truncated"]
             for p in report.predictions)
  asked = sorted((r["task"], r["length"], r["question"], r["answer"]) for r in oracle_rows)
  assert sorted((p["task"], p["length"], p["question"], p["answer"]) for p in report.predictions) == asked
  assert {k: (c.correct, c.total, c.truncated) for k, c in report.cells.items()} == {
      (task, length): (6, 6, 0) for task in ("qa1", "qa6") for length in ("0k", "1k")}
  table = babilong_eval.report_dict(report)
  assert table["accuracy"] == {"qa1": {"0k": 1.0, "1k": 1.0}, "qa6": {"0k": 1.0, "1k": 1.0}}


def test_babilong_full_attention_baseline_sees_its_training_context(oracle_rows, monkeypatch):
  """A full-attention model trained on 7 segments of T sees the last 6 * T context tokens (a segment
  is left for the question and answer) in a cache of 7 * T: rows whose context fits are answered right,
  the others are cut and (to the oracle) unanswerable."""
  oracle = Oracle(oracle_rows, tokenizers.ByteTokenizer())
  monkeypatch.setattr(babilong_eval, "Decoder", oracle.decoder)
  model = _eval_model("full", use_memory=False, attention="full")
  report = babilong_eval.evaluate(model, oracle_rows, batch_size=2, progress=False)
  cap = 6 * T
  assert report.max_context == cap and oracle.max_lengths == [cap + T]
  expected = {}
  for r in oracle_rows:
    fits = len((r["input"] + " ").encode()) <= cap
    right, total, cut = expected.get((r["task"], r["length"]), (0, 0, 0))
    expected[(r["task"], r["length"])] = (right + fits, total + 1, cut + (not fits))
  assert {k: (c.correct, c.total, c.truncated) for k, c in report.cells.items()} == expected
  assert 0 < expected[("qa1", "0k")][0] < 6 and 0 < expected[("qa6", "0k")][0] < 6
  assert all(p["correct"] == (not p["truncated"]) for p in report.predictions)


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
