"""BABILong-style builder: lengths near the target, facts intact and in order, clean filler, skips, CLI."""

import json
import time

import numpy as np
import pytest

from lm2_jax.data import babi, babilong, filler
from lm2_jax.data import tokenizers

TOK = tokenizers.ByteTokenizer()


@pytest.mark.parametrize("length", ["1k", "4k", "16k"])
def test_length_within_and_close_to_target(length):
  target = babilong.LENGTHS[length]
  for index in range(5):
    row = babilong.build_sample("qa2", length, 0, index, TOK)
    exact = len(TOK.encode(row.input + " " + row.question))
    assert exact == row.num_tokens
    assert 0.9 * target <= row.num_tokens <= target, (row.num_tokens, target)


def test_facts_in_order_intact_and_filler_clean():
  for task in ("qa1", "qa3", "qa10"):
    for index in range(10):
      row = babilong.build_sample(task, "2k", 1, index, TOK)
      story = babi.generate(task, 1, index, split="test")
      assert row.facts == story.sentences and row.answer == story.answer
      parts = filler.split_sentences(row.input)
      facts = [p for p in parts if filler.mentions_babi(p)]
      assert facts == list(story.sentences)
      assert len(parts) > 3 * len(facts)
      # Facts are spread: not all glued at the start or end.
      spots = [i for i, p in enumerate(parts) if p in story.sentences]
      assert spots[0] < len(parts) - 1


def test_zero_length_is_facts_only():
  row = babilong.build_sample("qa1", "0k", 0, 4, TOK)
  assert row.input == " ".join(row.facts)


def test_template_filler_never_mentions_babi():
  for seed in range(3):
    stream = filler.TemplateFiller().stream(seed)
    sentences = [next(stream) for _ in range(3000)]
    assert not any(filler.mentions_babi(s) for s in sentences)
    assert len(set(sentences)) > 1000
  a, b = filler.TemplateFiller().stream(5), filler.TemplateFiller().stream(5)
  assert [next(a) for _ in range(50)] == [next(b) for _ in range(50)]


def test_mentions_babi_catches_entities():
  for s in ("Mary sat.", "The KITCHEN is big.", "It went away.", "A ball to the north."):
    assert filler.mentions_babi(s)
  assert not filler.mentions_babi("The sky is grey today.")


def test_skips_are_counted():
  built = [babilong.build_sample("qa3", "1k", 0, i, TOK, target_tokens=300) for i in range(60)]
  skipped = sum(r is None for r in built)
  assert 0 < skipped < 60
  for r in built:
    if r is not None:
      assert r.num_tokens <= 300
  rows, skips = babilong.build_set(["qa3"], ["0k", "1k"], 5, 0, TOK)
  assert len(rows) == 10 and skips == {("qa3", "0k"): 0, ("qa3", "1k"): 0}


def test_text_file_filler(tmp_path):
  book = tmp_path / "book.txt"
  book.write_text("The lamp was lit. Mary went home!\nA quiet hour ended.  Rain fell softly? Yes.\n")
  source = filler.TextFileFiller([book])
  assert source.sentences == ["The lamp was lit.", "A quiet hour ended.", "Rain fell softly?"]
  row = babilong.build_sample("qa1", "1k", 0, 0, TOK, filler=source)
  assert "A quiet hour ended." in row.input and row.num_tokens <= 1024
  empty = tmp_path / "empty.txt"
  empty.write_text("  \n")
  with pytest.raises(ValueError, match="empty"):
    filler.TextFileFiller([empty])
  with pytest.raises(FileNotFoundError, match="missing.txt"):
    filler.TextFileFiller([tmp_path / "missing.txt"])


def test_64k_sample_is_fast():
  babilong.build_sample("qa1", "1k", 0, 0, TOK)
  start = time.perf_counter()
  row = babilong.build_sample("qa5", "64k", 0, 0, TOK)
  assert time.perf_counter() - start < 1.0
  assert row.num_tokens >= 0.99 * 65536


def test_bad_names_list_valid_ones(capsys):
  with pytest.raises(ValueError, match="valid lengths: 0k, 1k"):
    babilong.build_sample("qa1", "3k", 0, 0, TOK)
  with pytest.raises(ValueError, match="valid tasks"):
    babilong.build_sample("qa0", "1k", 0, 0, TOK)
  assert babilong.main(["--lengths", "5k", "--out", "/dev/null"]) == 2
  assert "valid lengths: 0k" in capsys.readouterr().err


def test_cli_writes_jsonl(tmp_path, capsys):
  out = tmp_path / "set.jsonl"
  assert babilong.main(["--tasks", "qa1,qa4", "--lengths", "0k,1k", "--samples", "3", "--out", str(out)]) == 0
  rows = [json.loads(line) for line in out.read_text().splitlines()]
  assert len(rows) == 12
  assert {(r["task"], r["length"]) for r in rows} == {(t, l) for t in ("qa1", "qa4") for l in ("0k", "1k")}
  for r in rows:
    assert {"task", "length", "input", "question", "answer", "supporting", "num_tokens"} <= set(r)
    assert r["answer"] in babi.answer_vocab(r["task"])
  assert "skipped" in capsys.readouterr().err
  assert np.mean([r["num_tokens"] for r in rows if r["length"] == "1k"]) > 900
