"""Perplexity by segment index within a document: the streamed per-segment sums equal those of one
non-streamed forward pass, sum back to the whole-document NLL, and reach past the trained length."""

import json
import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from lm2_jax.data import tokenizers
from lm2_jax.eval import cli, perplexity
from lm2_jax.eval.checkpoints import EvalModel
from lm2_jax.model import LM2, ModelConfig

T = 8
# The four models of configs/sweep/stdlib-lm.yaml, test-sized.
KINDS = {
    "lm2": {},
    "rmt": {"memory_kind": "rmt", "memory_flow": "chained", "memory_init": "learned"},
    "llama": {"use_memory": False},
    "llama-full": {"use_memory": False, "attention": "full"},
}


def _model(kind: str, trained_segments: int = 2) -> EvalModel:
  cfg = ModelConfig.from_yaml("configs/model/tiny.yaml", segment_length=T, **KINDS[kind])
  variables = LM2(cfg).init(jax.random.key(3), jnp.zeros((1, T), jnp.int32))
  return EvalModel(kind, cfg, variables, tokenizers.ByteTokenizer(), trained_segments * T)


@pytest.fixture(scope="module", params=list(KINDS))
def model(request):
  return _model(request.param)


def _direct_nll(model, tokens, valid):
  """NLL [B, N] of each position's next token, by one forward pass over the whole rows (no streaming:
  the model's own scan carries the memory; full attention sees everything before)."""
  b, n = tokens.shape
  pad = -n % T
  tokens = np.pad(tokens, ((0, 0), (0, pad)))
  valid = np.pad(valid, ((0, 0), (0, pad)))
  logits, _ = LM2(model.cfg).apply(model.variables, jnp.asarray(tokens), valid=jnp.asarray(valid))
  log_probs = jax.nn.log_softmax(logits[:, :n - 1], axis=-1)
  nll = -np.asarray(jnp.take_along_axis(log_probs, jnp.asarray(tokens[:, 1:n])[..., None], axis=-1)[..., 0])
  return np.pad(nll, ((0, 0), (0, 1)))


def test_by_segment_equals_the_per_segment_sums_of_one_forward_pass(model):
  rng = np.random.default_rng(0)
  b, n = 3, 5 * T - 3
  tokens = rng.integers(0, 256, (b, n)).astype(np.int32)
  lengths = np.array([n, 3 * T + 2, T - 1])  # shorter rows end in padding, as in a batch of documents
  valid = np.arange(n)[None] < lengths[:, None]
  weights = (np.arange(n)[None] < lengths[:, None] - 1).astype(np.float32)
  scorer = perplexity.SegmentScorer(model.cfg, model.variables)
  nll, count = scorer.by_segment(tokens, weights, valid)
  assert nll.shape == count.shape == (b, 5)
  direct = _direct_nll(model, tokens, valid) * weights
  expected = np.pad(direct, ((0, 0), (0, 5 * T - n))).reshape(b, 5, T).sum(-1)
  np.testing.assert_allclose(nll, expected, rtol=2e-5, atol=2e-5)
  np.testing.assert_array_equal(count, np.pad(weights, ((0, 0), (0, 3))).reshape(b, 5, T).sum(-1))
  total, total_count = scorer(tokens, weights, valid)
  np.testing.assert_allclose(nll.sum(1), total, rtol=2e-5)
  np.testing.assert_array_equal(count.sum(1), total_count)
  if model.cfg.use_memory:
    # The check has power: scored with the memory restarted at every segment, the sums differ.
    fresh = np.concatenate([scorer.by_segment(tokens[:, s * T:(s + 1) * T], weights[:, s * T:(s + 1) * T],
                                              valid[:, s * T:(s + 1) * T])[0] for s in range(4)], axis=1)
    assert np.abs(fresh - nll[:, :4]).max() > 100 * 2e-5


def _documents(tmp_path, lengths):
  rng = np.random.default_rng(1)
  texts = []
  for i, n in enumerate(lengths):
    texts.append("".join(chr(c) for c in rng.integers(97, 123, n)))
    (tmp_path / f"doc{i}.txt").write_text(texts[-1])
  return texts


def test_segment_perplexity_by_index_past_the_trained_length(model, tmp_path):
  texts = _documents(tmp_path, [6 * T + 5, 2 * T + 3, T // 2, 4 * T])
  max_segments = 4  # trained on 2: segments 2 and 3 lie past it; the first document is cut
  result = perplexity.segment_perplexity(model, [str(tmp_path)], max_segments=max_segments, batch_size=3,
                                         progress=False)
  seg = result["segments"]
  assert [s["segment"] for s in seg] == [0, 1, 2, 3] and result["trained_segments"] == 2
  assert [s["past_trained_length"] for s in seg] == [False, False, True, True]
  nll, count = np.zeros(max_segments), np.zeros(max_segments)
  for text in texts:
    ids = (list(text.encode()) + [258])[:max_segments * T + 1]
    row = np.asarray([ids], np.int32)
    direct = _direct_nll(model, row, np.ones(row.shape, bool))[0, :len(ids) - 1]
    for s in range(max_segments):
      nll[s] += direct[s * T:(s + 1) * T].sum()
      count[s] += len(direct[s * T:(s + 1) * T])
  assert [s["tokens"] for s in seg] == count.tolist() == [3 * T + 4, 3 * T, 2 * T + 3, 2 * T]
  assert [s["documents"] for s in seg] == [4, 3, 3, 2]
  np.testing.assert_allclose([s["nll"] for s in seg], nll / count, rtol=2e-5)
  np.testing.assert_allclose([s["perplexity"] for s in seg], np.exp(nll / count), rtol=2e-5)
  assert seg[3]["bits_per_token"] == pytest.approx(seg[3]["nll"] / math.log(2))
  # Long enough for every whole document, the segments sum back to the whole-stream perplexity.
  whole = perplexity.segment_perplexity(model, [str(tmp_path)], max_segments=8, batch_size=2, progress=False)
  flat = perplexity.corpus_perplexity(model, [str(tmp_path)], progress=False)
  assert whole["tokens"] == flat["tokens"] == sum(s["tokens"] for s in whole["segments"])
  assert whole["nll"] == pytest.approx(flat["nll"], rel=2e-5)
  assert whole["segments"][7]["tokens"] == 0 and math.isnan(whole["segments"][7]["perplexity"])


def test_eval_cli_by_segment_table_and_json(tmp_path, monkeypatch, capsys):
  _documents(tmp_path, [5 * T, 3 * T])
  models = [_model("lm2"), _model("llama")]
  monkeypatch.setattr(cli, "_load_models", lambda args: models)
  out = tmp_path / "out"
  args = ["perplexity", "--run", "a", "--run", "b", "--files", str(tmp_path), "--out", str(out),
          "--no-progress", "--by-segment", "--max-segments", "6", "--baseline", "llama"]
  assert cli.main(args) == 0
  printed = capsys.readouterr().out
  report = json.loads((out / "perplexity_by_segment.json").read_text())
  assert report["baseline"] == "llama" and list(report["models"]) == ["lm2", "llama"]
  assert len(report["models"]["lm2"]["segments"]) == 6
  assert report["models"]["lm2"]["segments"][5]["past_trained_length"] is True
  assert report["models"]["lm2"]["segments"][5]["perplexity"] is None  # no document reaches it
  assert "lm2 vs llama: lower perplexity at" in printed and "bits/byte" in printed
  assert "     5>     0" in printed and (out / "perplexity_by_segment.txt").read_text().strip() in printed
  assert cli.main(["perplexity", "--run", "a", "--files", str(tmp_path), "--max-segments", "4"]) == 2
  assert "--max-segments: only with --by-segment" in capsys.readouterr().err
  assert cli.main(args[:-1] + ["gpt"]) == 2
  assert "--baseline gpt: not one of the models" in capsys.readouterr().err
