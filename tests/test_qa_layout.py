"""QA row layout: shapes, shifted targets, answer decoding, fixed question offset, fact placement, no leak."""

import collections

import numpy as np
import pytest

from lm2_jax.data import babi, qa, tokenizers
from tests import babi_replay

TOK = tokenizers.ByteTokenizer()
C, T = 4, 64


def _segments(row):
  return row["inputs"].reshape(C, T)


def _source(task="qa1", **kw):
  kw = {"num_samples": 400, **kw}
  return qa.QASource(task, "train", 0, TOK, kw.pop("num_segments", C), kw.pop("segment_length", T), **kw)


def test_shapes_dtypes_and_shifted_targets():
  row = _source()[3]
  for key in ("inputs", "targets", "loss_mask", "valid"):
    assert row[key].shape == (C * T,), key
  assert (row["inputs"].dtype, row["targets"].dtype, row["loss_mask"].dtype, row["valid"].dtype) == (
      np.int32, np.int32, np.float32, np.bool_)
  assert row["resets"].tolist() == [True, False, False, False]
  np.testing.assert_array_equal(row["targets"][:-1], row["inputs"][1:])
  assert row["targets"][-1] == TOK.pad_id
  np.testing.assert_array_equal(row["valid"], row["inputs"] != TOK.pad_id)
  assert row["question_segment"] == C - 1 and row["answer_id"].dtype == np.int32


@pytest.mark.parametrize("task", ["qa1", "qa2", "qa5", "qa8", "qa10"])
def test_answer_tokens_decode_to_answer_and_offset_is_fixed(task):
  """The question of the row's own story starts at T - (longest question + longest answer of the task
  + SEP + EOS), computed here from the task's question and answer lists; only PAD comes before it."""
  t = 96
  longest_q = max(len(TOK.encode(q)) for q in babi.all_questions(task))
  longest_a = max(len(TOK.encode(a)) for a in babi.answer_vocab(task))
  offset = t - (longest_q + 1 + longest_a + 1)
  src = _source(task, num_segments=6, segment_length=t, num_sentences=(3, 6))
  assert src.offset == offset
  vocab = babi.answer_vocab(task)
  for i in range(40):
    row, sample = src[i], _sample_of(src, i)
    last = _segments_of(row, 6, t)[-1]
    question, answer = TOK.encode(sample.question), TOK.encode(sample.answer)
    assert np.all(last[:offset] == TOK.pad_id)
    np.testing.assert_array_equal(last[offset:offset + len(question)], question)
    end = offset + len(question)
    assert last[end] == TOK.sep_id
    np.testing.assert_array_equal(last[end + 1:end + 1 + len(answer)], answer)
    assert last[end + 1 + len(answer)] == TOK.eos_id
    masked = row["targets"][row["loss_mask"] > 0]
    assert masked[-1] == TOK.eos_id
    assert TOK.decode(masked[:-1]) == vocab[row["answer_id"]] == sample.answer


def _segments_of(row, c, t):
  return row["inputs"].reshape(c, t)


def test_loss_on_all_covers_real_targets():
  row = _source(loss_on="all", filler_density=1.0)[5]
  mask = row["loss_mask"] > 0
  np.testing.assert_array_equal(mask, row["valid"] & (row["targets"] != TOK.pad_id))
  answer_row = _source(filler_density=1.0)[5]
  assert answer_row["loss_mask"].sum() < mask.sum()
  assert np.all(mask[answer_row["loss_mask"] > 0])


def test_facts_in_context_segments_never_straddle():
  src = _source("qa2", num_segments=5, segment_length=80, num_sentences=(3, 8), filler_density=0.5)
  for i in range(60):
    row = src[i]
    sample = _sample_of(src, i)
    segs = _segments_of(row, 5, 80)
    texts = [TOK.decode(s) for s in segs]
    positions = []
    for fact in sample.sentences:
      hits = [c for c in range(4) if fact in texts[c]]
      assert hits, (fact, texts)
      positions.append(hits)
    assert fact not in texts[4]
    # In order: the facts appear in order within the concatenated context.
    context = "|".join(texts[:4])
    cursor = 0
    for fact in sample.sentences:
      cursor = context.index(fact, cursor) + len(fact)
    assert row["fact_segment"] in positions[max(sample.supporting)]


def _sample_of(src, i):
  k = src.rejections(i)
  return babi.generate(src.task, src.seed, i + k * src.num_samples, num_sentences=src.num_sentences,
                       split=src.split)


def replay_row(row, num_segments, segment_length, offset, tok=TOK):
  """What a row's tokens say, read back independently: (answer, last supporting sentence's segment,
  whether the story's last sentence is that sentence, the story's sentences), from replaying its context
  sentences (`babi_replay`) and its question (at `offset` of the last segment). Needs filler_density 0."""
  segments = row["inputs"].reshape(num_segments, segment_length)
  sentences, segment_of = [], []
  for c, seg in enumerate(segments[:-1]):
    text = tok.decode(seg[seg != tok.pad_id])
    for sentence in (s.strip() + "." for s in text.split(".") if s.strip()):
      sentences.append(sentence)
      segment_of.append(c)
  last = segments[-1]
  sep = offset + int(np.flatnonzero(last[offset:] == tok.sep_id)[0])
  answer, support = babi_replay.solve(sentences, tok.decode(last[offset:sep]))
  return answer, segment_of[max(support)], max(support) == len(sentences) - 1, sentences


@pytest.mark.parametrize("task", ["qa1", "qa2"])
def test_fact_segment_and_last_fact_supports_match_an_independent_replay(task):
  """qa2 asks where an object is: two supporting facts (who got it, where that one went), so the
  supporting sentence that matters is the later one."""
  c, t = 5, 80
  src = _source(task, num_segments=c, segment_length=t, num_sentences=(2, 8))
  flags = collections.Counter()
  for i in range(80):
    row = src[i]
    answer, fact_segment, last_supports, _ = replay_row(row, c, t, src.offset)
    assert babi.answer_vocab(task)[row["answer_id"]] == answer
    assert row["fact_segment"] == fact_segment
    assert row["last_fact_supports"] == int(last_supports)
    flags[last_supports] += 1
  assert min(flags[True], flags[False]) >= 10, flags


def test_supporting_fact_distance_varies():
  src = _source()
  counts = collections.Counter(int(src[i]["fact_segment"]) for i in range(200))
  assert set(counts) == {0, 1, 2} and min(counts.values()) > 20, counts
  narrow = _source(fact_segments=(2, 2))
  assert {int(narrow[i]["fact_segment"]) for i in range(20)} == {2}


def test_deterministic_random_access():
  a, b = _source(filler_density=0.7), _source(filler_density=0.7)
  for i in (7, 0, 123):
    for k, v in a[i].items():
      np.testing.assert_array_equal(v, b[i][k])
  assert not np.array_equal(a[1]["inputs"], a[2]["inputs"])


def test_no_answer_leak_through_layout():
  """Everything in the last segment before the question is independent of the story and its answer."""
  for density in (0.0, 1.0):
    src = _source(filler_density=density, segment_length=96, num_segments=3)
    first_real = collections.defaultdict(list)
    for i in range(300):
      row = src[i]
      last = row["inputs"].reshape(3, 96)[-1]
      real = np.flatnonzero(last != TOK.pad_id)
      first_real[int(row["answer_id"])].append(int(real[0]))
      sep = int(np.flatnonzero(last == TOK.sep_id)[0])
      # The answer starts right after SEP, at offset + question length: the answer never moves it.
      assert sep == src.offset + len(TOK.encode(TOK.decode(last[src.offset:sep])))
    assert len(first_real) >= 5
    if density == 0.0:
      assert {p for ps in first_real.values() for p in ps} == {src.offset}
    else:
      means = [np.mean(ps) for ps in first_real.values()]
      assert max(means) - min(means) < 3.0, first_real
  # Stronger: the same row of two different tasks has the same tokens before the question.
  one = _source("qa1", filler_density=1.0, segment_length=96, num_segments=3)
  six = _source("qa6", filler_density=1.0, segment_length=96, num_segments=3)
  off = min(one.offset, six.offset)
  heads = [(one[i]["inputs"][192:192 + off], six[i]["inputs"][192:192 + off]) for i in range(30)]
  assert any(np.any(h != TOK.pad_id) for h, _ in heads)
  compared = 0
  for h1, h6 in heads:
    f1, f6 = h1[h1 != TOK.pad_id], h6[h6 != TOK.pad_id]
    n = min(len(f1), len(f6))
    np.testing.assert_array_equal(f1[:n], f6[:n])
    compared += n > 0
  assert compared >= 10


def test_default_run_fits_facts_and_pad_only():
  src = _source(num_samples=100)
  for i in range(100):
    row = src[i]
    context = row["inputs"][:(C - 1) * T]
    text = TOK.decode(context)
    assert src.rejections(i) < 20
    # No filler at density 0: every context sentence is a bAbI move.
    assert all(" to the " in s for s in text.strip().split(".") if s.strip())


def test_errors():
  sample = babi.BabiSample("qa1", ("Mary went to the kitchen.",) * 6, "Where is Mary?", "kitchen", (5,))
  with pytest.raises(qa.QALayoutError, match="do not fit"):
    qa.encode_qa_row(sample, TOK, 2, 64, np.random.default_rng(0))
  with pytest.raises(qa.QALayoutError, match="too short"):
    qa.question_offset("qa5", TOK, 20)
  with pytest.raises(ValueError, match="fact_segments"):
    qa.encode_qa_row(sample, TOK, 4, 64, np.random.default_rng(0), fact_segments=(1, 3))
  with pytest.raises(ValueError, match="no story fits"):
    qa.QASource("qa3", "train", 0, TOK, 2, 80, 5, num_sentences=(10, 12), max_attempts=3)[0]
  with pytest.raises(IndexError):
    _source(num_samples=5)[5]


def _every_source(n=200):
  words = tokenizers.make_tokenizer("words")
  return words, qa.QASource("qa1", "train", 0, words, 4, 16, n, num_sentences=(2, 6), questions="every")


def test_every_segment_questions_are_answered_from_the_facts_before_them():
  words, src = _every_source()
  answers_per_row = []
  for i in range(120):
    row = src[i]
    inputs, mask = row["inputs"], row["loss_mask"] > 0
    # Each loss span starts at a SEP; the question before it and the facts before that decide the answer.
    starts = [p for p in np.flatnonzero(mask) if not mask[p - 1]]
    answers_per_row.append(len(starts))
    for p in starts:
      assert inputs[p] == words.sep_id
      # Earlier question blocks end with EOS: read it as a full stop, then drop the questions.
      period = words.encode(".")[0]
      text = words.decode([period if t == words.eos_id else t for t in inputs[:p] if t != words.pad_id])
      *facts, question = [s.strip() for s in text.replace("?", "?.").split(".") if s.strip()]
      facts = [f for f in facts if "?" not in f and len(f.split()) > 1]
      actor = question.split()[-1].rstrip("?")
      truth = [f.split()[-1] for f in facts if f.split()[0] == actor][-1]
      n = int(np.argmax(~mask[p:]))          # answer tokens + EOS
      assert words.decode(row["targets"][p:p + n - 1]) == truth and row["targets"][p + n - 1] == words.eos_id
  assert np.mean(answers_per_row) > 1.5      # intermediate questions fit in most rows


def test_every_keeps_the_final_question_at_its_offset_and_its_metadata():
  words, src = _every_source()
  final = qa.QASource("qa1", "train", 0, words, 4, 16, 200, num_sentences=(2, 6))
  for i in range(50):
    a, b = src[i], final[i]
    last_a, last_b = a["inputs"].reshape(4, 16)[-1], b["inputs"].reshape(4, 16)[-1]
    np.testing.assert_array_equal(last_a[src.offset:], last_b[final.offset:])
    for key in ("answer_id", "fact_segment", "last_fact_supports"):
      assert a[key] == b[key], key
    # The final answer's span is in the loss of both layouts.
    assert np.all(a["loss_mask"][b["loss_mask"] > 0] > 0)


def test_every_needs_qa1():
  with pytest.raises(ValueError, match="qa1"):
    qa.QASource("qa2", "train", 0, TOK, 4, 64, 10, questions="every")[0]
  with pytest.raises(ValueError, match="questions"):
    qa.QASource("qa1", "train", 0, TOK, 4, 64, 10, questions="sometimes")[0]
