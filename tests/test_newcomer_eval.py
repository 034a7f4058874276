"""What a newcomer hit running the README's eval.py commands (issue 19): `--data` without `--tasks`, a
shell-expanded `--files` glob, an ambiguous multiple-choice answer, error hints naming flags that do not
exist, unknown words scored silently, an unreadable heatmap, stale predictions files."""

import itertools
import json
import re

import jax
import jax.numpy as jnp
import matplotlib
import matplotlib.figure
import pytest
from matplotlib.backends.backend_agg import FigureCanvasAgg

from lm2_jax.data import babi, babilong, tokenizers
from lm2_jax.data.words import WordTokenizer
from lm2_jax.eval import babilong_eval, cli, multiple_choice, tables
from lm2_jax.eval.checkpoints import EvalModel
from lm2_jax.model import LM2, ModelConfig

T = 8


def _model(name, tokenizer, vocab_size=None):
  cfg = ModelConfig.from_yaml("configs/model/tiny.yaml", segment_length=T,
                              **({"vocab_size": vocab_size} if vocab_size else {}))
  variables = LM2(cfg).init(jax.random.key(3), jnp.zeros((1, T), jnp.int32))
  return EvalModel(name, cfg, variables, tokenizer)


@pytest.fixture(scope="module")
def byte_model():
  return _model("bytes", tokenizers.ByteTokenizer())


@pytest.fixture(scope="module")
def word_model():
  return _model("words", WordTokenizer.babi(), vocab_size=384)


def _use_models(monkeypatch, *models):
  monkeypatch.setattr(cli, "_load_models", lambda args: list(models))


def _counting_evaluate(model, rows, **kwargs):
  """Stands in for `babilong_eval.evaluate` (what is tested here is which rows it gets): answers nothing."""
  del kwargs
  report = babilong_eval.ModelReport(model.name, "", None, None)
  for r in rows:
    report.cells.setdefault((r["task"], r["length"]), babilong_eval.Cell()).total += 1
    report.predictions.append({"task": r["task"], "length": r["length"], "prediction": "", "correct": False})
  return report


def _write_jsonl(path, rows):
  path.write_text("".join(json.dumps(r) + "\n" for r in rows))
  return path


def test_babilong_data_file_supplies_the_tasks_and_lengths(tmp_path, monkeypatch, byte_model):
  """The README builds `--tasks qa1,qa2 --lengths 0k,1k,4k` and evaluates it with `--data` alone."""
  rows = babilong_eval.build_rows(["qa2", "qa1"], ["1k", "0k"], 1, 0, tokenizers.ByteTokenizer())
  data = _write_jsonl(tmp_path / "babilong.jsonl", rows)
  _use_models(monkeypatch, byte_model)
  monkeypatch.setattr(babilong_eval, "evaluate", _counting_evaluate)
  assert cli.main(["--run", "r", "--data", str(data), "--out", str(tmp_path / "a"), "--no-progress"]) == 0
  results = json.loads((tmp_path / "a" / "babilong.json").read_text())
  assert results["tasks"] == ["qa1", "qa2"] and results["lengths"] == ["0k", "1k"]
  assert results["models"]["bytes"]["counts"]["qa2"]["1k"]["total"] == 1
  # Given flags still choose among the file's cells; one the file lacks is named.
  assert cli.main(["--run", "r", "--data", str(data), "--tasks", "qa2", "--out", str(tmp_path / "b"),
                   "--no-progress"]) == 0
  results = json.loads((tmp_path / "b" / "babilong.json").read_text())
  assert results["tasks"] == ["qa2"] and results["lengths"] == ["0k", "1k"]
  with pytest.raises(babilong_eval.EvalDataError, match="no samples for: qa3"):
    babilong_eval.select(rows, ["qa1", "qa3"], None)


def test_a_rerun_with_fewer_models_removes_the_others_predictions(tmp_path, monkeypatch, byte_model):
  rows = babilong_eval.build_rows(["qa1"], ["0k"], 1, 0, tokenizers.ByteTokenizer())
  data = _write_jsonl(tmp_path / "babilong.jsonl", rows)
  monkeypatch.setattr(babilong_eval, "evaluate", _counting_evaluate)
  out = tmp_path / "eval"
  argv = ["--run", "r", "--data", str(data), "--out", str(out), "--no-progress"]
  other = EvalModel("nomem", byte_model.cfg, None, byte_model.tokenizer)
  _use_models(monkeypatch, byte_model, other)
  assert cli.main(argv) == 0
  (out / "notes.txt").write_text("not eval.py's")
  _use_models(monkeypatch, byte_model)
  assert cli.main(argv) == 0
  assert sorted(p.name for p in out.iterdir()) == [
      "babilong.json", "babilong.png", "babilong.txt", "babilong_predictions_bytes.jsonl", "notes.txt"]
  assert list(json.loads((out / "babilong.json").read_text())["models"]) == ["bytes"]


def _perplexity_flags() -> set[str]:
  sub = next(a for a in cli._parser()._actions if a.dest == "command")
  return set(sub.choices["perplexity"]._option_string_actions)


def test_perplexity_files_takes_several_files_as_a_shell_glob_gives_them(tmp_path, monkeypatch,
                                                                            byte_model, capsys):
  (tmp_path / "a.txt").write_text("Mary went to the kitchen.")
  (tmp_path / "b.txt").write_text("John took the apple there.")
  (tmp_path / "c.txt").write_text("The sky is grey today.")
  _use_models(monkeypatch, byte_model)
  out = tmp_path / "out"
  assert cli.main(["perplexity", "--run", "r", "--files", str(tmp_path / "a.txt"), str(tmp_path / "b.txt"),
                   "--out", str(out), "--no-progress"]) == 0
  assert json.loads((out / "perplexity.json").read_text())["bytes"]["documents"] == 2
  # Comma-separated still works, mixed with separate arguments.
  assert cli.main(["perplexity", "--run", "r", "--files", f"{tmp_path / 'a.txt'},{tmp_path / 'b.txt'}",
                   str(tmp_path / "c.txt"), "--out", str(out), "--no-progress"]) == 0
  assert json.loads((out / "perplexity.json").read_text())["bytes"]["documents"] == 3
  capsys.readouterr()


def test_perplexity_errors_name_flags_that_exist(tmp_path, monkeypatch, byte_model, capsys):
  bad = tmp_path / "docs.jsonl"
  bad.write_text('{"text": "Mary went to the kitchen."}\n{not json\n')
  _use_models(monkeypatch, byte_model)
  flags = _perplexity_flags()
  for files in ([str(bad)], [str(tmp_path / "missing.txt")]):
    assert cli.main(["perplexity", "--run", "r", "--files", *files, "--out", str(tmp_path),
                     "--no-progress"]) == 2
    err = capsys.readouterr().err
    named = set(re.findall(r"--[a-z][a-z-]*", err))
    assert named and named <= flags, (named - flags, err)
    assert "corpus." not in err and "on_error" not in err
  assert cli.main(["perplexity", "--run", "r", "--files", str(bad), "--on-error", "skip", "--out",
                   str(tmp_path), "--no-progress"]) == 0
  assert "skipped {'bad_json': 1}" in capsys.readouterr().out


def test_perplexity_reports_unknown_words_and_refuses_text_made_of_them(tmp_path, monkeypatch, word_model,
                                                                         capsys):
  """The built-in word vocabulary is bAbI's: "quantum chromodynamics" is two UNK ids of 6 tokens."""
  known, foreign = "Mary went to the kitchen.", "Mary went to quantum chromodynamics."
  tok = word_model.tokenizer
  assert tok.encode(foreign).count(tok.unk_id) == 2 and tok.unk_id not in tok.encode(known)
  (tmp_path / "known.txt").write_text(known)
  (tmp_path / "foreign.txt").write_text(foreign)
  _use_models(monkeypatch, word_model)
  out = tmp_path / "out"
  assert cli.main(["perplexity", "--run", "r", "--files", str(tmp_path / "known.txt"), "--out", str(out),
                   "--no-progress"]) == 0
  assert json.loads((out / "perplexity.json").read_text())["words"]["unknown_share"] == 0.0
  assert "0.0% of the tokens are the tokenizer's unknown id" in capsys.readouterr().out
  files = [str(tmp_path / "known.txt"), str(tmp_path / "foreign.txt")]
  assert cli.main(["perplexity", "--run", "r", "--files", *files, "--out", str(out), "--no-progress"]) == 2
  err = capsys.readouterr().err
  assert "2 of the 12 tokens" in err and "--max-unknown" in err
  assert set(re.findall(r"--[a-z][a-z-]*", err)) <= _perplexity_flags()
  assert cli.main(["perplexity", "--run", "r", "--files", *files, "--max-unknown", "1", "--out", str(out),
                   "--no-progress"]) == 0
  result = json.loads((out / "perplexity.json").read_text())["words"]
  assert result["unknown_tokens"] == 2 and result["unknown_share"] == pytest.approx(2 / 12)
  assert "16.7% of the tokens are the tokenizer's unknown id" in capsys.readouterr().out


@pytest.mark.parametrize("choices, answer, expected", [
    (["B", "A"], "A", 1),              # the text of a choice, not the letter of the first
    (["C", "D"], "D", 1),
    (["C", "D"], 0, 0),
    (["red", "blue"], "B", 1),         # a letter, when no choice is a letter
    (["red", "blue"], "b", 1),
    (["red", "blue"], "blue", 1),
    (["B", "A"], "C", "ambiguous"),    # a letter among letter choices that is none of them
    (["A", "apple"], "B", "ambiguous"),
    (["x", "x"], "x", "choices \\[0, 1\\]"),
    (["red", "blue"], "C", "out of range"),
    (["red", "blue"], True, "integer index"),
])
def test_multiple_choice_answers_name_one_choice_or_fail(tmp_path, choices, answer, expected):
  path = _write_jsonl(tmp_path / "mc.jsonl", [{"question": "q", "choices": choices, "answer": answer}])
  if isinstance(expected, int):
    assert multiple_choice.read_jsonl(path)[0]["answer"] == expected
  else:
    with pytest.raises(multiple_choice.MCDataError, match=f"mc.jsonl:1: .*{expected}"):
      multiple_choice.read_jsonl(path)


def _report(name, tasks, lengths, cut):
  report = babilong_eval.ModelReport(name, "", 1, 96 if cut else None)
  for i, task in enumerate(tasks):
    for j, length in enumerate(lengths):
      report.cells[(task, length)] = babilong_eval.Cell((i + j) % 5, 4, int(cut and j > 0))
  return report


@pytest.mark.parametrize("tasks, lengths, n", [
    *[(["qa1"], ["0k", "1k"], n) for n in (1, 2, 3, 4)],
    (list(babi.TASKS), list(babilong.LENGTHS), 4),
])
def test_babilong_heatmap_labels_overlap_nothing(tmp_path, monkeypatch, tasks, lengths, n):
  """No label (task, length, title, value, colorbar) overlaps another label or another panel, and every
  label lies inside the image."""
  figures = []
  save = matplotlib.figure.Figure.savefig
  monkeypatch.setattr(matplotlib.figure.Figure, "savefig",
                      lambda fig, *a, **k: (figures.append(fig), save(fig, *a, **k))[1])
  names = ["default", "default-nomem", "lm2-1.7b@12000", "llama-1.2b"][:n]
  tables.heatmap([_report(name, tasks, lengths, cut=k == 1) for k, name in enumerate(names)], tasks, lengths,
                 tmp_path / "babilong.png")
  (fig,) = figures
  canvas = FigureCanvasAgg(fig)
  canvas.draw()
  renderer = canvas.get_renderer()
  labels = [(t.get_text(), t.get_window_extent(renderer), t.axes) for t in fig.findobj(matplotlib.text.Text)
            if t.get_visible() and t.get_text().strip() and t.figure is fig]
  panels = [(ax, ax.get_window_extent(renderer)) for ax in fig.axes]
  assert {"qa1", "context length", *names} <= {text for text, _, _ in labels}
  clashes = [(a, b) for (a, box_a, _), (b, box_b, _) in itertools.combinations(labels, 2)
             if box_a.overlaps(box_b)]
  clashes += [(text, "a panel") for text, box, owner in labels for ax, panel in panels
              if ax is not owner and box.overlaps(panel)]
  width, height = fig.bbox.width, fig.bbox.height
  clashes += [(text, "the edge") for text, box, _ in labels
              if box.x0 < 0 or box.y0 < 0 or box.x1 > width or box.y1 > height]
  assert clashes == []
