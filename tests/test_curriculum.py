"""`data.curriculum` (story length) and `data.segment_curriculum` (how far back the facts lie) by training
step, read through the pipeline; deterministic, exactly resumable (iterator state, re-derived position, a
trainer resumed mid-run), and validated with the key."""

import numpy as np
import pytest

from lm2_jax.data import pipeline, qa, tokenizers
from lm2_jax.train import config as config_lib
from lm2_jax.train import inputs
from lm2_jax.train import metrics as metrics_lib
from lm2_jax.train.loop import train
from test_train_evaluate import TINY_MODEL, tiny_config

WORDS = tokenizers.make_tokenizer("words")
C, T = 4, 16
SWITCH = 3                                       # the curriculum's second entry starts at this step
CURRICULUM = ((0, (1, 2)), (SWITCH, (1, 6)))     # 1-2 sentences, then 1-6
SEGMENTS = ((0, 1), (SWITCH, C - 1))             # facts in the last context segment, then in any


def _source(num_sentences=(1, 6), curriculum=CURRICULUM, rows=48, segment_curriculum=()):
  return qa.QASource("qa1", "train", 0, WORDS, C, T, rows, num_sentences=num_sentences,
                     curriculum=curriculum, segment_curriculum=segment_curriculum)


def _sentences(batch):
  """Facts per row: the full stops in the context segments (no filler, one final question)."""
  return np.sum(batch["inputs"][:, :(C - 1) * T] == WORDS.encode(".")[0], axis=1)


def _batches(iterator, n):
  return [next(iterator) for _ in range(n)]


def _assert_same(a, b):
  assert len(a) == len(b)
  for x, y in zip(a, b):
    assert sorted(x) == sorted(y)
    for k in x:
      np.testing.assert_array_equal(x[k], y[k], err_msg=k)


def test_rows_follow_the_curriculum_by_step():
  kwargs = dict(batch_size=8, seed=5)
  batches = _batches(pipeline.make_iterator(_source(), **kwargs), 7)
  before = np.concatenate([_sentences(b) for b in batches[:SWITCH]])
  after = np.concatenate([_sentences(b) for b in batches[SWITCH:]])
  assert before.max() <= 2 and before.min() >= 1
  assert after.max() > 2
  # Which rows are drawn does not change: step s's batch is the same rows of the source whose story
  # length is the curriculum's at s.
  short = _batches(pipeline.make_iterator(_source((1, 2), ()), **kwargs), 7)
  full = _batches(pipeline.make_iterator(_source((1, 6), ()), **kwargs), 7)
  _assert_same(batches, short[:SWITCH] + full[SWITCH:])
  # source[i] is row i at step 0.
  np.testing.assert_array_equal(_source()[5]["inputs"], _source().row_at_step(5, 0)["inputs"])


def test_facts_follow_the_segment_curriculum_by_step():
  """Both curricula at once: 1-2 facts in the last context segment up to the switch, then 1-6 facts in any
  of them; the rows drawn are those of a source with the step's settings fixed."""
  kwargs = dict(batch_size=8, seed=5)
  batches = _batches(pipeline.make_iterator(_source(segment_curriculum=SEGMENTS), **kwargs), 7)
  first = np.concatenate([b["fact_segment"] for b in batches[:SWITCH]])
  later = np.concatenate([b["fact_segment"] for b in batches[SWITCH:]])
  assert first.min() >= C - 2 and later.min() < C - 2
  for b in batches[:SWITCH]:   # nothing at all before the last context segment
    assert np.all(b["inputs"][:, :(C - 2) * T] == WORDS.pad_id)
  near = qa.QASource("qa1", "train", 0, WORDS, C, T, 48, num_sentences=(1, 2), fact_segments=(C - 2, C - 2))
  near_batches = _batches(pipeline.make_iterator(near, **kwargs), 7)
  full = _batches(pipeline.make_iterator(_source((1, 6), ()), **kwargs), 7)
  _assert_same(batches, near_batches[:SWITCH] + full[SWITCH:])


@pytest.mark.parametrize("stop", [0, 2, 3, 5])
@pytest.mark.parametrize("segments", [(), SEGMENTS], ids=["length", "length+segments"])
def test_resume_from_saved_state_is_exact(stop, segments):
  kwargs = dict(batch_size=4, seed=11, process_index=1, process_count=2)
  def source():
    return _source(segment_curriculum=segments)
  reference = _batches(pipeline.make_iterator(source(), **kwargs), stop + 4)
  it = pipeline.make_iterator(source(), **kwargs)
  _assert_same(_batches(it, stop), reference[:stop])
  state = it.get_state()
  _batches(it, 2)  # the interrupted run goes on a little before dying
  _assert_same(_batches(pipeline.make_iterator(source(), state=state, **kwargs), 4), reference[stop:])
  # The position re-derived from the step (`reshard_data`) reads the same rows.
  _assert_same(_batches(pipeline.make_iterator(source(), state={"next_index": stop}, **kwargs), 4),
               reference[stop:])


def test_workers_read_the_same_rows():
  kwargs = dict(batch_size=4, seed=2)
  reference = _batches(pipeline.make_iterator(_source(), **kwargs), SWITCH + 2)
  it = pipeline.make_iterator(_source(), worker_count=1, **kwargs)
  try:
    _assert_same(_batches(it, SWITCH + 2), reference)
  finally:
    it.close()


def _data(**overrides):
  return {"kind": "qa", "task": "qa1", "tokenizer": "words", "num_segments": C, "train_size": 64,
          "eval_size": 8, "num_sentences": 1, "max_sentences": 6, **overrides}


@pytest.mark.parametrize("key, schedule, match", [
    ("curriculum", [[0, 2], [300]], r"data\.curriculum\[1\]"),
    ("curriculum", [0, 2], r"data\.curriculum\[0\]: expected a list"),
    ("curriculum", "0,2", r"data\.curriculum: expected a list"),
    ("curriculum", [[0, "two"]], r"data\.curriculum\[0\]\[1\]"),
    ("curriculum", [[5, 2], [300, 4]], r"data\.curriculum: the steps must start at 0 and increase"),
    ("curriculum", [[0, 2], [300, 4], [300, 6]], r"data\.curriculum: the steps must start at 0 and increase"),
    ("curriculum", [[0, 0]], r"data\.curriculum: max_sentences=0"),
    ("segment_curriculum", [[0, 1], [200]], r"data\.segment_curriculum\[1\]"),
    ("segment_curriculum", [[0, "one"]], r"data\.segment_curriculum\[0\]\[1\]"),
    ("segment_curriculum", [[1, 1], [200, 2]],
     r"data\.segment_curriculum: the steps must start at 0 and increase"),
    ("segment_curriculum", [[0, 1], [200, 2], [100, 3]],
     r"data\.segment_curriculum: the steps must start at 0 and increase"),
    ("segment_curriculum", [[0, 0]],
     r"data\.segment_curriculum: n=0 at step 0 must be in 1\.\.data\.num_segments - 1 = 3"),
    ("segment_curriculum", [[0, 1], [200, C]], r"data\.segment_curriculum: n=4 at step 200 must be in 1\.\."),
])
def test_bad_curricula_name_the_key(tmp_path, key, schedule, match):
  with pytest.raises(config_lib.ConfigError, match=match):
    tiny_config(tmp_path, data=_data(**{key: schedule}))


def test_curriculum_needs_qa_rows_and_room_for_the_shortest_story(tmp_path):
  with pytest.raises(config_lib.ConfigError, match="data.curriculum .*data.kind=recall"):
    tiny_config(tmp_path, data={"kind": "recall", "curriculum": [[0, 2]]})
  with pytest.raises(config_lib.ConfigError, match="data.curriculum: max_sentences=2 .*data.num_sentences=3"):
    tiny_config(tmp_path, data=_data(num_sentences=3, curriculum=[[0, 2]]))
  # num_sentences 0: the qa1 default minimum (2) is the floor.
  cfg = tiny_config(tmp_path, data=_data(num_sentences=0, max_sentences=0, curriculum=[[0, 1]]))
  with pytest.raises(config_lib.ConfigError, match="data.curriculum: max_sentences=1 .*minimum of 2"):
    inputs.make_sources(cfg.data, T, 384)


def test_segment_curriculum_needs_qa_rows_and_room_for_the_stories(tmp_path):
  with pytest.raises(config_lib.ConfigError, match="data.segment_curriculum .*data.kind=recall"):
    tiny_config(tmp_path, data={"kind": "recall", "segment_curriculum": [[0, 1]]})
  # 5-6 facts of 6 tokens never fit in one segment of 16: refused at start-up, not at the step.
  cfg = tiny_config(tmp_path, data=_data(num_sentences=5, segment_curriculum=[[0, 3], [SWITCH, 1]]))
  with pytest.raises(config_lib.ConfigError, match=r"at step 3 \(story length \(5, 6\), fact segments "
                                                   r"\(2, 2\)\).*no story fits"):
    inputs.make_sources(cfg.data, T, 384)


def test_held_out_rows_keep_the_configured_length(tmp_path):
  cfg = tiny_config(tmp_path, data=_data(curriculum=[[0, 1], [SWITCH, 2]],
                                         segment_curriculum=[[0, 1], [SWITCH, 2]]))
  assert cfg.data.curriculum == ((0, 1), (SWITCH, 2))
  train_source, held_out = inputs.make_sources(cfg.data, T, 384)
  assert train_source.story_length(0) == (1, 1) and train_source.story_length(SWITCH + 9) == (1, 2)
  assert train_source.fact_range(SWITCH - 1) == (2, 2) and train_source.fact_range(SWITCH) == (1, 2)
  assert held_out.story_length(0) == held_out.story_length(10**6) == (1, 6)
  assert held_out.fact_range(0) is None and held_out.fact_range(10**6) is None
  config_lib.save_config(cfg, tmp_path / "config.yaml")
  assert config_lib.load_config(tmp_path / "config.yaml") == cfg


@pytest.mark.slow
def test_a_resumed_run_trains_on_the_rows_of_an_uninterrupted_one(tmp_path):
  """Stopped at step 2, before the switch at 3: the resumed run's losses equal the uninterrupted run's
  bit for bit, past the switch (the data position, not only the state, restored)."""
  def config(name):
    return tiny_config(tmp_path, name, model=dict(TINY_MODEL, vocab_size=384, segment_length=T),
                       train={"steps": 6}, data=_data(curriculum=[[0, 2], [SWITCH, 6]],
                                                      segment_curriculum=[[0, 1], [SWITCH, C - 1]]),
                       checkpoint={"every": 2}, logging={"memory_diagnostics": False})

  def losses(name):
    return [r["loss"] for r in metrics_lib.read_metrics(tmp_path / name, "train")]

  full = train(config("full"), echo=lambda s: None)
  stopped = train(config("split"), stop_requested=lambda step: step == 2, echo=lambda s: None)
  assert stopped.status == "interrupted" and stopped.step == 2
  resumed = train(config("split"), echo=lambda s: None)
  assert full.status == resumed.status == "completed"
  assert losses("full") == losses("split") and len(losses("full")) == 6
  assert full.final_eval == resumed.final_eval


def test_qa_source_refuses_bad_segment_curricula():
  with pytest.raises(ValueError, match="segment_curriculum: n=4 context segments must be in 1..num_segments"):
    _source(segment_curriculum=((0, 1), (5, C)))
  with pytest.raises(ValueError, match="segment_curriculum steps must start at 0"):
    _source(segment_curriculum=((2, 1),))
  with pytest.raises(ValueError, match="fact_segments or segment_curriculum"):
    qa.QASource("qa1", "train", 0, WORDS, C, T, 8, fact_segments=(0, 1), segment_curriculum=((0, 1),))
