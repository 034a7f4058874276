"""The word-level tokenizer: built-in bAbI vocabulary covers every task; files; round trips."""

import pytest

from lm2_jax.data import babi, filler
from lm2_jax.data.tokenizers import check_vocab, make_tokenizer
from lm2_jax.data.words import WordTokenizer


def test_babi_vocabulary_covers_fresh_stories_of_every_task():
  tok = make_tokenizer("words")
  for task in babi.TASKS:
    for index in range(1000, 1100):                    # not among the stories the vocabulary saw
      sample = babi.generate(task, 7, index, split="test")
      text = " ".join((*sample.sentences, sample.question, sample.answer))
      ids = tok.encode(text)
      assert tok.unk_id not in ids, (task, text)
      assert all(i >= 5 for i in ids)


def test_filler_sentences_encode_without_unk():
  tok = make_tokenizer("words")
  stream = filler.TemplateFiller().stream(123)
  for _ in range(500):
    assert tok.unk_id not in tok.encode(next(stream))


def test_round_trip_and_specials():
  tok = WordTokenizer.babi()
  text = "Mary moved to the bathroom. Where is Mary?"
  assert tok.decode(tok.encode(text)) == text
  assert len(tok.encode("Sandra journeyed to the hallway.")) == 6
  assert tok.decode([tok.bos_id, *tok.encode("apple,milk"), tok.eos_id, tok.pad_id]) == "apple, milk"
  assert tok.encode("Gandalf went to the kitchen.")[0] == tok.unk_id
  assert len({tok.pad_id, tok.bos_id, tok.eos_id, tok.sep_id, tok.unk_id}) == 5
  check_vocab(tok, tok.vocab_size)
  with pytest.raises(ValueError):
    check_vocab(tok, tok.vocab_size - 1)


def test_vocabulary_file(tmp_path):
  path = tmp_path / "vocab.txt"
  path.write_text("# my words\nhello\nworld\n.\n\n")
  tok = make_tokenizer("words", str(path))
  assert tok.vocab_size == 8 and tok.decode(tok.encode("hello world.")) == "hello world."
  with pytest.raises(FileNotFoundError, match="missing.txt"):
    make_tokenizer("words", str(tmp_path / "missing.txt"))
  bad = tmp_path / "bad.txt"
  bad.write_text("two words\n")
  with pytest.raises(ValueError, match="bad.txt"):
    make_tokenizer("words", str(bad))
  empty = tmp_path / "empty.txt"
  empty.write_text("# nothing\n")
  with pytest.raises(ValueError, match="empty"):
    make_tokenizer("words", str(empty))
