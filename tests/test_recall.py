"""Recall rows: answers replayed independently from the tokens, the bound channel, layout, trainer wiring.

The replay below knows only the documented id layout (0 PAD, 1 QUERY, then keys, values, filler ids) and
reads a row's tokens left to right; it shares no code with `lm2_jax.data.recall`.
"""

import numpy as np
import pytest

from lm2_jax.data import recall
from lm2_jax.train import config as config_lib
from lm2_jax.train import evaluate as eval_lib
from lm2_jax.train import inputs

C, T, K, V = 4, 16, 16, 16


def _source(split="train", **kw):
  kw = {"num_segments": C, "segment_length": T, "num_keys": K, "num_values": V, **kw}
  return recall.RecallSource(split, 0, 64, **kw)


def _kind(token, num_keys=K, num_values=V):
  if token == 0:
    return "pad"
  if token == 1:
    return "query"
  if token < 2 + num_keys:
    return "key"
  return "value" if token < 2 + num_keys + num_values else "filler"


def replay(row, num_segments=C):
  """(latest, pairs, queries) of a row.

  latest: key -> (value, segment, times assigned), reading the context segments left to right; pairs and
  queries: [(key position, key, value)] of the facts and of the queries.
  """
  tokens = row["inputs"].reshape(num_segments, T)
  latest, pairs = {}, []
  for c in range(num_segments - 1):
    t = 0
    while t < T:
      if _kind(tokens[c, t]) == "key":
        assert t + 1 < T and _kind(tokens[c, t + 1]) == "value", f"pair straddles segment {c} at {t}"
        key, value = int(tokens[c, t]), int(tokens[c, t + 1])
        assert latest.get(key, (None,))[0] != value, "a reassignment keeps the key's value"
        latest[key] = (value, c, latest.get(key, (0, 0, 0))[2] + 1)
        pairs.append((c * T + t, key, value))
        t += 2
      else:
        assert _kind(tokens[c, t]) in ("pad", "filler"), f"stray {tokens[c, t]} at segment {c}, {t}"
        t += 1
  last, queries = tokens[-1], []
  for t in range(0, T, 3):
    if last[t] == 1:
      queries.append(((num_segments - 1) * T + t + 1, int(last[t + 1]), int(last[t + 2])))
  return latest, pairs, queries


BEDS = [dict(), dict(overwrite_rate=0.5, filler=3), dict(pairs_per_segment=3, overwrite_rate=1.0, queries=2),
        dict(num_segments=6, fact_segments=2, filler=2, overwrite_rate=0.3)]


@pytest.mark.parametrize("kw", BEDS)
def test_every_loss_target_is_the_latest_assignment(kw):
  src, n = _source(**kw), kw.get("num_segments", C)
  for i in range(24):
    row = src[i]
    latest, _, queries = replay(row, n)
    scored = np.flatnonzero(row["loss_mask"])
    assert len(queries) == src.queries and [q[0] for q in queries] == scored.tolist()
    assert len({q[1] for q in queries}) == len(queries)
    for pos in scored:
      key = int(row["inputs"][pos])
      assert row["targets"][pos] == latest[key][0]
    value, segment, times = latest[queries[0][1]]
    assert row["fact_segment"] == segment and row["question_segment"] == n - 1
    assert row["overwritten"] == (times > 1) and row["answer_id"] == value - 2 - K


def test_overwrites_happen_at_the_rate_and_never_without_it():
  flags = [int(_source(overwrite_rate=0.5)[i]["overwritten"]) for i in range(64)]
  assert 0 < sum(flags) < 64
  assert all(replay(_source()[i])[0][k][2] == 1 for i in range(16) for k in replay(_source()[i])[0])
  times = [t for i in range(32) for _, _, t in replay(_source(overwrite_rate=0.5)[i])[0].values()]
  assert max(times) > 1


@pytest.mark.parametrize("split", ["validation", "test"])
def test_held_out_rows_score_only_the_first_query(split):
  src = _source(split, overwrite_rate=0.3)
  for i in range(16):
    row = src[i]
    _, _, queries = replay(row)
    assert len(queries) == 4 and np.flatnonzero(row["loss_mask"]).tolist() == [queries[0][0]]


def test_bound_never_reveals_a_value():
  for kw in BEDS:
    n = kw.get("num_segments", C)
    src, plain = _source(bind=True, **kw), _source(**kw)
    assert "bound" not in plain[0]
    for i in range(16):
      row = src[i]
      bound = row["bound"]
      assert not any(_kind(b) == "value" for b in bound if b >= 0)
      expected = np.full(n * T, -1)
      _, pairs, queries = replay(row, n)
      for pos, key, _ in pairs:
        expected[pos] = expected[pos + 1] = key
      for pos, key, _ in queries:
        expected[pos] = key
      np.testing.assert_array_equal(bound, expected)
      assert bound.dtype == np.int32


def test_rows_are_deterministic_and_splits_differ():
  a, b = _source(overwrite_rate=0.3, filler=2), _source(overwrite_rate=0.3, filler=2)
  for i in (0, 5, 63):
    for key, value in a[i].items():
      np.testing.assert_array_equal(value, b[i][key])
  val = _source("validation", overwrite_rate=0.3, filler=2)
  assert not any(np.array_equal(a[i]["inputs"], val[i]["inputs"]) for i in range(16))
  assert not np.array_equal(a[0]["inputs"], a[1]["inputs"])
  with pytest.raises(IndexError):
    a[64]


def test_layout_padding_filler_segments_and_vocab():
  src = _source(num_segments=7, fact_segments=2, filler=3, bind=True)
  vocab = recall.recall_vocab_size(K, V)
  first_keys = set()
  for i in range(8):
    row = src[i]
    np.testing.assert_array_equal(row["valid"], row["inputs"] != 0)
    np.testing.assert_array_equal(row["targets"], np.append(row["inputs"][1:], 0))
    assert row["resets"].tolist() == [True] + [False] * 6 and row["loss_mask"].dtype == np.float32
    assert row["inputs"].max() < vocab and src.vocab_size == vocab == 2 + K + V + recall.NUM_FILLER
    segments = row["inputs"].reshape(7, T)
    for c in range(2, 6):
      assert [_kind(t) for t in segments[c]] == ["filler"] * 3 + ["pad"] * (T - 3)
    for c in range(2):
      kinds = [_kind(t) for t in segments[c]]
      assert kinds.count("key") == 2 and kinds.count("filler") == 3 and kinds[7:] == ["pad"] * (T - 7)
      first_keys.add(kinds.index("key"))
    assert 0 <= row["fact_segment"] < 2
  assert len(first_keys) > 1  # filler lands in different gaps
  no_filler = _source(num_segments=6, fact_segments=1, queries=2)[0]["inputs"].reshape(6, T)
  assert not no_filler[1:5].any()


@pytest.mark.parametrize("kw, match", [
    (dict(pairs_per_segment=8, filler=1), "do not fit in a segment"),
    (dict(queries=6), "queries .3 tokens each"),
    (dict(num_keys=5), "distinct keys"),
    (dict(num_values=1), "num_values must be >= 2"),
    (dict(overwrite_rate=1.5), r"overwrite_rate must be in \[0, 1\]"),
    (dict(fact_segments=1, pairs_per_segment=2, queries=3), "queries=3 ask distinct keys"),
    (dict(fact_segments=4), "fact_segments=4"),
    (dict(num_segments=1), "num_segments >= 2"),
])
def test_bad_parameters_are_refused_with_the_reason(kw, match):
  with pytest.raises(ValueError, match=match):
    _source(**kw)
  with pytest.raises(ValueError, match="unknown split"):
    _source("dev")


def test_recall_config_builds_the_sources():
  cfg = config_lib.load_config("configs/experiment/recall.yaml", ["data.train_size=32", "data.eval_size=8"])
  model = cfg.model_config()
  assert cfg.data.kind == "recall" and cfg.data.bind
  train, held_out = inputs.make_sources(cfg.data, model.segment_length, model.vocab_size)
  assert (len(train), len(held_out), held_out.split) == (32, 8, "validation")
  row = train[0]
  for key in ("inputs", "targets", "loss_mask", "valid", "bound"):
    assert row[key].shape == (cfg.data.num_segments * model.segment_length,), key
  assert row["loss_mask"].sum() == cfg.data.recall_queries and held_out[0]["loss_mask"].sum() == 1
  assert train.overwrite_rate == cfg.data.recall_overwrite and train.num_keys == cfg.data.recall_keys
  assert inputs.chance_level(cfg.data) == 1 / cfg.data.recall_values
  assert inputs.chance_level(config_lib.DataConfig(kind="qa", task="qa1")) == 1 / 6
  assert inputs.chance_level(config_lib.DataConfig(kind="text")) is None


def test_recall_vocab_and_parameter_errors_name_the_keys():
  data = config_lib.DataConfig(kind="recall", train_size=8, eval_size=8, recall_keys=32)
  with pytest.raises(config_lib.ConfigError,
                     match="model.vocab_size=64.*data.recall_keys=32.*data.recall_values"):
    inputs.make_sources(data, T, 64)
  with pytest.raises(config_lib.ConfigError, match=r"data section \(recall\).*queries"):
    inputs.make_sources(config_lib.DataConfig(kind="recall", recall_queries=6), T, 64)


def _report_of(answered, overwritten):
  answered = np.asarray(answered)
  n = len(answered)
  batch = {"fact_segment": np.zeros(n, np.int32), "question_segment": np.ones(n, np.int32),
           "overwritten": np.asarray(overwritten, np.int32)}
  stats = {"nll_sum": np.ones(n), "weight_sum": np.ones(n),
           "correct_sum": answered.astype(float)}
  return eval_lib.evaluate(lambda b: stats, [batch])


def test_evaluate_splits_accuracy_by_overwritten():
  result = _report_of([1, 0, 0, 1, 1], [1, 1, 1, 0, 0])
  assert result["accuracy_overwritten"] == pytest.approx(1 / 3)
  assert result["accuracy_not_overwritten"] == 1.0
  only = _report_of([1, 0], [0, 0])
  assert "accuracy_overwritten" not in only and only["accuracy_not_overwritten"] == 0.5
  report = eval_lib.final_report(result, True, chance=1 / 16)
  assert report["chance"] == 1 / 16 and report["accuracy_overwritten"] == pytest.approx(1 / 3)
  assert "chance" not in eval_lib.final_report(result, True)
  table = eval_lib.comparison_table({"a": report, "b": eval_lib.final_report(only, False)})
  lines = {line[:22].strip(): line[22:].split() for line in table.splitlines()}
  assert lines["overwritten"] == ["0.333", "-"] and lines["not overwritten"] == ["1.000", "0.500"]
  assert lines["chance"] == ["0.062", "-"]
  plain = eval_lib.comparison_table({"a": eval_lib.final_report(_report_of([1], [0]), True)})
  assert "chance" not in plain and "last fact elsewhere" not in table + plain
