"""Property-based fuzz of the config loader and of the command lines of train.py, eval.py,
`python -m lm2_jax.data.babilong` and `python -m lm2_jax.convert`: any input gives a result, or an error
message (naming the bad key or value for the config) with exit code 2; never an uncaught exception.

Examples are derandomized (the same ones every CI run); `bench/faults.py --fuzz-examples N` draws more,
with a fresh seed.
"""

import contextlib
import dataclasses
import importlib.util
import io
import os
import pathlib

import hypothesis
import pytest
import yaml
from hypothesis import strategies as st

import harness
from lm2_jax.convert import __main__ as convert_cli
from lm2_jax.data import babilong
from lm2_jax.train import config as config_lib
from lm2_jax.train import loop

EXAMPLES = int(os.environ.get("LM2_FUZZ_EXAMPLES", "0"))  # bench/faults.py sets it; 0 = each test's own
SETTINGS = dict(deadline=None, database=None, derandomize=not EXAMPLES,
                suppress_health_check=[hypothesis.HealthCheck.too_slow])


def _settings(examples: int):
  return hypothesis.settings(max_examples=EXAMPLES or examples, **SETTINGS)


def _entry(name: str):
  spec = importlib.util.spec_from_file_location(f"{name}_entry", harness.REPO / f"{name}.py")
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  return module


train_entry, eval_entry = _entry("train"), _entry("eval")

SECTIONS = {f.name: f.type for f in dataclasses.fields(config_lib.RunConfig)}
SECTION_KEYS = {name: [f.name for f in dataclasses.fields(getattr(config_lib, cls))]
                for name, cls in (("train", "TrainConfig"), ("data", "DataConfig"), ("mesh", "MeshConfig"),
                                  ("checkpoint", "CheckpointConfig"), ("logging", "LoggingConfig"))}
MODEL_KEYS = ["vocab_size", "d_model", "num_layers", "num_heads", "segment_length", "use_memory",
              "memory_flow", "num_slots", "dtype", "attention", "remat"]
DOTTED = ([f"{s}.{k}" for s, keys in SECTION_KEYS.items() for k in keys] + [f"model.{k}" for k in MODEL_KEYS]
          + ["name", "runs_dir", "compare_to"])
WORD = st.text(alphabet="abcdefghijklmnopqrstuvwxyz_.-=:/0123456789 ", max_size=10)
SCALARS = st.one_of(st.integers(-3, 3), st.integers(-2**40, 2**40), st.floats(allow_nan=True), WORD,
                    st.booleans(), st.none(), st.sampled_from(["-1", "1e-4", "bfloat16", "segment", "qa1",
                                                               "text", "words", "[1, 2]", "{a: 1}", "~"]))
VALUES = st.one_of(SCALARS, st.lists(SCALARS, max_size=2), st.dictionaries(WORD, SCALARS, max_size=2))
KEY = st.one_of(st.sampled_from(DOTTED), WORD)
YAML_KEY = st.one_of(WORD, st.integers(-2, 2), st.none(), st.booleans())   # YAML keys need not be strings


def _override(key: str, value) -> str:
  text = value if isinstance(value, str) else yaml.safe_dump(value, default_flow_style=True).strip()
  return f"{key}={text}"


OVERRIDES = st.lists(st.one_of(st.builds(_override, KEY, VALUES), WORD), max_size=4)


@st.composite
def _documents(draw):
  """A config mapping: known sections with known or unknown keys, values of any type; or not a mapping."""
  doc = {}
  for section in draw(st.lists(st.one_of(st.sampled_from(sorted(SECTIONS)), YAML_KEY), max_size=5,
                               unique=True)):
    if section in SECTION_KEYS or section == "model":
      keys = SECTION_KEYS.get(section, MODEL_KEYS)
      doc[section] = draw(st.dictionaries(st.one_of(st.sampled_from(keys), YAML_KEY), VALUES, max_size=3))
    else:
      doc[section] = draw(VALUES)
  return draw(st.one_of(st.just(doc), VALUES))


def _names_the_input(message: str, doc, overrides: list[str], path: pathlib.Path) -> bool:
  """Does an error message name something the user wrote: a dotted key, an override, or the file?

  Bare names count from 3 characters (a 1-letter key is in any sentence), shorter ones when quoted ('x')
  or followed by ':', ';', ',' or '='.
  """
  names, quoted = {str(path)}, {f"override {item!r}" for item in overrides}
  for item in overrides:
    key = item.split("=", 1)[0].strip()
    names.add(key)
    quoted.update(repr(".".join(key.split(".")[:n])) for n in range(1, key.count(".") + 2))
  if isinstance(doc, dict):
    for section, value in doc.items():
      names.add(str(section))
      quoted.add(repr(str(section)))
      if isinstance(value, dict):
        names.update(f"{section}.{k}" for k in value)
        quoted.update(repr(f"{section}.{k}") for k in value)
        if section == "model":  # ModelConfig names its own fields without the section
          names.update(f"{k}" for k in value)
  short = {f"{n}{end}" for n in names for end in ":;,="}  # a short key as the subject of the message
  return (any(len(n) > 2 and n in message for n in names) or any(q in message for q in quoted | short)
          or message.startswith("model section"))


@pytest.fixture(scope="module")
def scratch(tmp_path_factory):
  return tmp_path_factory.mktemp("fuzz")


def test_the_config_loader_returns_a_config_or_a_config_error_naming_the_input(scratch):
  path = scratch / "fuzz.yaml"
  seen = {"configs": 0, "errors": 0}

  @_settings(300)
  @hypothesis.given(doc=_documents(), overrides=OVERRIDES, raw=st.booleans(), text=st.text(max_size=40))
  def check(doc, overrides, raw, text):
    path.write_text(text if raw else yaml.safe_dump(doc))
    try:
      cfg = config_lib.load_config(path, overrides)
    except config_lib.ConfigError as e:
      seen["errors"] += 1
      written = yaml.safe_load(text) if raw and e.__cause__ is None else doc   # parsed, if it parses
      assert _names_the_input(str(e), written, overrides, path), str(e)
      return
    seen["configs"] += 1
    assert isinstance(cfg, config_lib.RunConfig)

  check()
  assert seen["configs"] > 0 and seen["errors"] > 0, seen   # both outcomes were exercised


def _exit_code(main, argv) -> tuple[int, str]:
  """(exit code, stderr) of a command-line main; SystemExit (argparse) counts as its code."""
  err = io.StringIO()
  with contextlib.redirect_stderr(err), contextlib.redirect_stdout(io.StringIO()):
    try:
      code = main(argv)
    except SystemExit as e:
      code = e.code if isinstance(e.code, int) else 1
  return code, err.getvalue()


def _check_exit(code: int, err: str, ok=(0, 2)) -> None:
  assert code in ok, (code, err)
  assert "Traceback" not in err, err
  if code == 2:
    assert err.strip(), "exit 2 without a message"


def test_train_py_starts_or_stops_with_exit_2(scratch, monkeypatch):
  """Everything up to the first step runs (config, validation, mesh, data sources); the steps do not."""
  base = harness.write_config(scratch / "base.yaml", harness.experiment(scratch / "runs"))
  (scratch / "garbage.yaml").write_text("model: [unclosed\n")
  configs = [str(base), str(scratch / "garbage.yaml"), str(scratch / "missing.yaml"), str(scratch)]
  started = []

  def no_steps(cfg, *args, **kwargs):
    started.append(cfg.name)
    return loop.RunResult("completed", 0, cfg.run_dir)

  monkeypatch.setattr(loop, "_train", no_steps)
  flags = st.one_of(st.builds(lambda c: ["--config", c], st.sampled_from(configs)),
                    st.just(["--reshard-data"]), st.just(["--help"]), st.builds(lambda w: [w], WORD),
                    st.builds(lambda o: [o], st.builds(_override, KEY, VALUES)))

  @_settings(80)
  @hypothesis.given(parts=st.lists(flags, max_size=4), overrides=OVERRIDES)
  def check(parts, overrides):
    argv = ["--config", str(base)] + [a for p in parts for a in p] + overrides
    _check_exit(*_exit_code(train_entry.main, argv))

  check()
  assert started   # some inputs reached the training loop


RUN_FLAGS = ["--run", "--checkpoint", "--model-config", "--out", "--data", "--file", "--files", "--tasks",
             "--lengths", "--samples", "--batch-size", "--index", "--block", "--rows", "--pairs",
             "--max-unknown", "--top-p", "--temperature", "--split", "--on-error", "--no-progress", "--help"]


def test_eval_py_stops_with_exit_2_without_a_usable_model(scratch):
  (scratch / "empty").mkdir(exist_ok=True)
  (scratch / "notes.txt").write_text("not a checkpoint\n")
  paths = [str(scratch / "empty"), str(scratch / "notes.txt"), str(scratch / "missing"), "runs/none"]
  value = st.one_of(st.sampled_from(paths), WORD, st.integers(-2, 3).map(str),
                    st.sampled_from(["qa1,qa2", "0k,1k", "9k", "1,4", "skip", "test", "0.5", "nan"]))
  item = st.one_of(st.sampled_from(["babilong", "perplexity", "mc", "attention", "recall"]),
                   st.sampled_from(RUN_FLAGS), value)

  @_settings(60)
  @hypothesis.given(argv=st.lists(item, max_size=7))
  def check(argv):
    _check_exit(*_exit_code(eval_entry.main, argv))

  check()


def test_the_babilong_builder_writes_a_set_or_stops_with_exit_2(scratch):
  (scratch / "filler.txt").write_text("The sky was grey. Nobody came.\n")
  (scratch / "blank.txt").write_text("")
  outs = [str(scratch / "set.jsonl"), str(scratch / "no" / "set.jsonl"), str(scratch)]
  choices = {
      "--tasks": st.sampled_from(["qa1", "qa1,qa2", "qa0", "", ",", "qa10"]),
      "--lengths": st.sampled_from(["0k", "0k,1k", "3k", "", "1k,1k"]),
      "--samples": st.sampled_from(["-1", "0", "1", "2", "x"]),
      "--seed": st.sampled_from(["0", "-5", "1.5"]),
      "--split": st.sampled_from(["test", "train", "dev"]),
      "--tokenizer-kind": st.sampled_from(["byte", "words", "hf", "sentencepiece", "gpt"]),
      "--tokenizer-path": st.sampled_from([str(scratch / "filler.txt"), str(scratch / "missing")]),
      "--filler-files": st.sampled_from([str(scratch / "filler.txt"), str(scratch / "blank.txt"),
                                         str(scratch / "missing.txt"), ","]),
      "--out": st.sampled_from(outs),
  }
  pairs = st.lists(st.sampled_from(sorted(choices)), max_size=5).flatmap(
      lambda flags: st.tuples(*[st.tuples(st.just(f), choices[f]) for f in flags]))

  @_settings(60)
  @hypothesis.given(pairs=pairs, extra=st.lists(WORD, max_size=1))
  def check(pairs, extra):
    argv = [a for pair in pairs for a in pair] + extra
    _check_exit(*_exit_code(babilong.main, argv))

  check()


def test_the_converter_converts_or_stops_with_exit_2(scratch):
  hf_bad = scratch / "hf_bad"
  hf_bad.mkdir(exist_ok=True)
  (hf_bad / "config.json").write_text('{"model_type": "llama", "hidden_size": "big"}')
  (scratch / "empty").mkdir(exist_ok=True)
  (scratch / "notes.txt").write_text("not a checkpoint\n")
  dirs = st.sampled_from([str(scratch / "missing"), str(scratch / "empty"), str(hf_bad),
                          str(scratch / "notes.txt"), str(scratch / "out")])
  flags = {"import": {"--hf": dirs, "--out": dirs},
           "export": {"--checkpoint": dirs, "--out": dirs,
                      "--max-shard-mb": st.sampled_from(["-1", "0", "1", "x"])}}
  argv = st.sampled_from(sorted(flags)).flatmap(lambda command: st.tuples(
      st.just([command]),
      st.lists(st.sampled_from(sorted(flags[command])), max_size=3).flatmap(
          lambda names: st.tuples(*[st.tuples(st.just(n), flags[command][n]) for n in names])),
      st.lists(st.one_of(st.builds(_override, st.sampled_from(MODEL_KEYS), VALUES), WORD, st.just("--help")),
               max_size=2)))

  @_settings(60)
  @hypothesis.given(parts=argv)
  def check(parts):
    command, pairs, extra = parts
    _check_exit(*_exit_code(convert_cli.main, command + [a for pair in pairs for a in pair] + extra))

  check()
