"""Perplexity and multiple choice: streamed segment-by-segment likelihoods equal the full forward pass."""

import json
import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from lm2_jax.data import tokenizers
from lm2_jax.eval import multiple_choice, perplexity
from lm2_jax.eval.checkpoints import CheckpointError, EvalModel, run_config
from lm2_jax.model import LM2, ModelConfig

T = 8


@pytest.fixture(scope="module")
def model():
  cfg = ModelConfig.from_yaml("configs/model/tiny.yaml", segment_length=T)
  variables = LM2(cfg).init(jax.random.key(3), jnp.zeros((1, T), jnp.int32))
  return EvalModel("tiny", cfg, variables, tokenizers.ByteTokenizer())


def _full_log_probs(model, ids):
  """log p(token i+1 | tokens <= i) [n-1] of one token list, by one full forward (padded at the end)."""
  n = len(ids)
  pad = -n % T
  tokens = jnp.asarray([ids + [256] * pad], jnp.int32)
  valid = jnp.asarray([[True] * n + [False] * pad])
  logits, _ = LM2(model.cfg).apply(model.variables, tokens, valid=valid)
  log_probs = jax.nn.log_softmax(logits[0, :n - 1], axis=-1)
  return np.asarray(jnp.take_along_axis(log_probs, jnp.asarray(ids[1:])[:, None], axis=-1)[:, 0])


def test_perplexity_is_exp_mean_nll_of_the_full_forward(model, tmp_path):
  docs = ["Mary went to the kitchen. The sky is grey today.", "John took the apple there."]
  for i, d in enumerate(docs):
    (tmp_path / f"doc{i}.txt").write_text(d)
  result = perplexity.corpus_perplexity(model, [str(tmp_path)], progress=False)
  nll = np.concatenate([-_full_log_probs(model, list(d.encode()) + [258]) for d in docs])
  assert result["tokens"] == len(nll) == sum(len(d) for d in docs)
  assert result["documents"] == 2
  assert result["perplexity"] == pytest.approx(math.exp(nll.mean()), rel=1e-4)
  assert result["perplexity"] > 1.0


def test_choice_scores_equal_full_forward_log_likelihood(model):
  scorer = perplexity.SegmentScorer(model.cfg, model.variables)
  question, choices = "Where is the milk?", ["kitchen", "the garden", "x"]
  scores = multiple_choice.choice_scores(scorer, model.tokenizer, question, choices)
  prompt = list(f"{question}\nAnswer:".encode())
  for score, choice in zip(scores, choices):
    cont = list(f" {choice}".encode())
    expected = _full_log_probs(model, prompt + cont)[len(prompt) - 1:].sum()
    assert score == pytest.approx(expected, rel=1e-4)


def _write(path, items):
  path.write_text("".join(json.dumps(i) + "\n" for i in items))
  return path


def test_multiple_choice_accuracy_and_subjects(model, tmp_path):
  """Answers set to the choice the model ranks first (subject a) or last (subject b)."""
  scorer = perplexity.SegmentScorer(model.cfg, model.variables)
  questions = [("Which colour?", ["red", "blue", "green"]), ("Pick one.", ["apple", "milk"]),
               ("Where?", ["hallway", "office", "garden", "bedroom"])]
  items = []
  for q, choices in questions:
    scores = multiple_choice.choice_scores(scorer, model.tokenizer, q, choices)
    assert len(set(np.round(scores, 4))) == len(choices)   # a strict ranking exists
    items.append({"question": q, "choices": choices, "answer": int(np.argmax(scores)), "subject": "a"})
    worst = int(np.argmin(scores))
    items.append({"question": q, "choices": choices, "answer": "ABCD"[worst], "subject": "b"})
  result = multiple_choice.evaluate(model, multiple_choice.read_jsonl(_write(tmp_path / "mc.jsonl", items)),
                                    progress=False)
  assert result["by_subject"] == {"a": 1.0, "b": 0.0}
  assert result["accuracy"] == 0.5 and result["items"] == 6


@pytest.mark.parametrize("line, message", [
    ('{"question": "q", "choices": ["a"], "answer": 0}', "at least 2 strings"),
    ('{"question": "q", "choices": ["a", "b"], "answer": 5}', "out of range"),
    ('{"question": "q", "choices": ["a", "b"], "answer": "zz"}', "neither a choice index"),
    ('{"question": "q", "choices": ["a", "b"]}', "missing `answer`"),
    ('not json', "not valid JSON"),
])
def test_malformed_multiple_choice_lines(tmp_path, line, message):
  path = tmp_path / "bad.jsonl"
  path.write_text('{"question": "q", "choices": ["a", "b"], "answer": "b"}\n' + line + "\n")
  with pytest.raises(multiple_choice.MCDataError, match=f"bad.jsonl:2: .*{message}"):
    multiple_choice.read_jsonl(path)


def test_run_config_falls_back_to_the_run_yaml_and_names_a_broken_one(tmp_path):
  step_dir = tmp_path / "checkpoints" / "3"
  step_dir.mkdir(parents=True)                              # no saved `config` item
  (tmp_path / "config.yaml").write_text("model:\n  d_model: 64\n")
  data, where = run_config(step_dir, tmp_path)
  assert data == {"model": {"d_model": 64}} and where.endswith("config.yaml")
  (tmp_path / "config.yaml").write_text("model: [unclosed\n")
  with pytest.raises(CheckpointError, match="config.yaml: invalid YAML"):
    run_config(step_dir, tmp_path)
  (tmp_path / "config.yaml").write_text("- a list\n")
  with pytest.raises(CheckpointError, match="expected a mapping"):
    run_config(step_dir, tmp_path)
