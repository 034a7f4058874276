"""The bound (latest-actor) channel of qa1 rows, replayed from the decoded words; its config errors."""

import numpy as np
import pytest

from lm2_jax.data import babi, qa, tokenizers
from lm2_jax.train import config as config_lib
from lm2_jax.train import inputs

TOK = tokenizers.make_tokenizer("words")
C, T = 4, 16
NAMES = {"John", "Mary", "Sandra", "Daniel"}  # the qa1 actors, written out here on purpose


def _source(split="train", **kw):
  return qa.QASource("qa1", split, 0, TOK, C, T, 64, num_sentences=(2, 6), bind=True, **kw)


def replay_actor(inputs):
  """At each position the id of the latest actor name read so far (from the decoded words), else -1."""
  out, current = [], -1
  for token in inputs.tolist():
    if TOK.decode([token]) in NAMES:
      current = token
    out.append(current)
  return np.asarray(out)


@pytest.mark.parametrize("questions", ["final", "every"])
def test_bound_is_the_latest_actor_and_never_an_answer(questions):
  src = _source(questions=questions, filler_density=0.5)
  answers = {i for a in babi.answer_vocab("qa1") for i in TOK.encode(a)}
  assert not answers & {TOK.encode(n)[0] for n in NAMES}
  for i in range(24):
    row = src[i]
    bound = row["bound"]
    assert bound.dtype == np.int32 and bound.shape == (C * T,)
    np.testing.assert_array_equal(bound, replay_actor(row["inputs"]))
    assert not answers & set(bound.tolist())
    # At each scored position the channel names the actor the question asks about.
    words = [TOK.decode([t]) for t in row["inputs"].tolist()]
    for pos in np.flatnonzero(row["loss_mask"]):
      asked = max(j for j in range(pos + 1) if words[j] in NAMES)
      assert words[asked - 2:asked] == ["Where", "is"] and bound[pos] == row["inputs"][asked]
  assert any(src[i]["bound"][0] == -1 for i in range(24))  # rows opening with filler: nothing bound yet
  assert "bound" not in qa.QASource("qa1", "train", 0, TOK, C, T, 4, num_sentences=2)[0]


def test_held_out_rows_carry_the_same_channel():
  row = _source("validation")[3]
  np.testing.assert_array_equal(row["bound"], replay_actor(row["inputs"]))


def test_latest_actor_fill_and_batch_axis():
  mary, john = TOK.encode("Mary")[0], TOK.encode("John")[0]
  tokens = np.asarray([[5, mary, 7, john, 9], [john, 4, 4, 4, mary]])
  out = qa.latest_actor(tokens, qa.actor_ids("qa1", TOK), fill=TOK.pad_id)
  assert out.tolist() == [[TOK.pad_id, mary, mary, john, john], [john, john, john, john, mary]]


def test_bind_refuses_other_tasks_and_split_names():
  with pytest.raises(ValueError, match="qa1 only"):
    qa.QASource("qa2", "train", 0, TOK, C, T, 4, bind=True)
  with pytest.raises(ValueError, match="one token"):
    qa.QASource("qa1", "train", 0, tokenizers.ByteTokenizer(), C, 64, 4, bind=True)


@pytest.mark.parametrize("data, match", [
    (dict(kind="text", bind=True), "data.bind"),
    (dict(kind="qa", task="qa2", bind=True), "data.bind"),
])
def test_bind_config_errors_name_the_key(data, match):
  with pytest.raises(config_lib.ConfigError, match=match):
    config_lib.from_dict({"data": data})


def test_bound_qa1_config_reaches_the_rows():
  cfg = config_lib.from_dict({"data": dict(kind="qa", task="qa1", bind=True, tokenizer="words",
                                           num_sentences=2, train_size=8, eval_size=8)})
  train, held_out = inputs.make_sources(cfg.data, T, 384)
  assert train[0]["bound"].shape == held_out[0]["bound"].shape == (C * T,)
  with pytest.raises(config_lib.ConfigError, match="one token"):
    inputs.make_sources(config_lib.DataConfig(kind="qa", task="qa1", bind=True), 64, 384)
