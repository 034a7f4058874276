"""Tokenizers: round trips, special ids and clear errors, on tiny models trained offline in tmp dirs."""

import os
import pickle

import pytest
import sentencepiece as spm
import tokenizers
from tokenizers import decoders, models, pre_tokenizers, trainers

from lm2_jax.data import tokenizers as tok

_TEXT = [f"the cat number {i} sat on the mat while {i * 7} dogs ran home" for i in range(300)]


@pytest.fixture(scope="module")
def sp_model(tmp_path_factory):
  d = tmp_path_factory.mktemp("sp")
  (d / "corpus.txt").write_text("\n".join(_TEXT))
  spm.SentencePieceTrainer.train(
      input=str(d / "corpus.txt"), model_prefix=str(d / "m"), vocab_size=80, user_defined_symbols=["<sep>"],
      minloglevel=2)
  spm.SentencePieceTrainer.train(
      input=str(d / "corpus.txt"), model_prefix=str(d / "padded"), vocab_size=80, pad_id=3, bos_id=-1,
      minloglevel=2)
  return d


def _bpe_json(path, special):
  backend = tokenizers.Tokenizer(models.BPE())
  backend.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
  backend.decoder = decoders.ByteLevel()
  trainer = trainers.BpeTrainer(vocab_size=300, special_tokens=special,
                                initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
  backend.train_from_iterator(_TEXT, trainer)
  backend.save(str(path))
  return backend


@pytest.fixture(scope="module")
def hf_files(tmp_path_factory):
  d = tmp_path_factory.mktemp("hf")
  llama = _bpe_json(d / "llama.json",
                    ["<|begin_of_text|>", "<|end_of_text|>", "<|reserved_special_token_0|>"])
  custom = _bpe_json(d / "custom.json", ["<s>", "</s>", "<pad>", "<q>"])
  no_eos = _bpe_json(d / "no_eos.json", ["<unk>"])
  return d, llama, custom, no_eos


def test_sentencepiece_round_trip_and_model_special_ids(sp_model):
  t = tok.make_tokenizer("sentencepiece", str(sp_model / "m.model"), sep_piece="<sep>")
  sp = spm.SentencePieceProcessor(model_file=str(sp_model / "m.model"))
  text = "the cat number 12 sat on the mat"
  ids = t.encode(text)
  assert t.decode(ids) == text
  assert (t.bos_id, t.eos_id, t.vocab_size) == (sp.bos_id(), sp.eos_id(), 80)
  assert t.sep_id == sp.piece_to_id("<sep>") and t.sep_id not in (t.bos_id, t.eos_id)
  assert t.pad_id == t.eos_id  # the model has no PAD: documented fallback
  assert t.decode([t.bos_id] + ids + [t.sep_id, t.eos_id]) == text  # special ids are dropped
  assert t.encode_batch([text, "dogs ran"]) == [ids, t.encode("dogs ran")]
  assert pickle.loads(pickle.dumps(t)).encode(text) == ids  # sources holding it go to worker processes


def test_sentencepiece_own_pad_and_missing_bos(sp_model):
  t = tok.SentencePieceTokenizer(sp_model / "padded.model")
  assert t.pad_id == 3 and t.bos_id == t.eos_id and t.sep_id == t.eos_id


def test_sentencepiece_unknown_sep_piece_is_an_error(sp_model):
  with pytest.raises(ValueError, match="no piece '<answer>'"):
    tok.SentencePieceTokenizer(sp_model / "m.model", sep_piece="<answer>")


def test_hf_llama_style_names_and_pad_fallback(hf_files):
  d, llama, _, _ = hf_files
  t = tok.make_tokenizer("hf", str(d / "llama.json"))
  assert t.bos_id == llama.token_to_id("<|begin_of_text|>")
  assert t.eos_id == llama.token_to_id("<|end_of_text|>")
  assert t.sep_id == llama.token_to_id("<|reserved_special_token_0|>")
  assert t.pad_id == t.eos_id  # no pad token in the file: documented fallback
  text = "the cat number 12 sat on the mat, ünïcode too"
  ids = t.encode(text)
  assert t.bos_id not in ids  # encode adds no special tokens
  assert t.decode([t.bos_id] + ids + [t.eos_id]) == text
  assert t.vocab_size == llama.get_vocab_size(with_added_tokens=True)
  assert pickle.loads(pickle.dumps(t)).encode(text) == ids


def test_hf_explicit_names(hf_files):
  d, _, custom, _ = hf_files
  t = tok.HFTokenizer(d / "custom.json", sep_token="<q>")
  assert (t.bos_id, t.eos_id, t.pad_id, t.sep_id) == tuple(
      custom.token_to_id(n) for n in ("<s>", "</s>", "<pad>", "<q>"))
  with pytest.raises(ValueError, match=r"no token '<answer>' \(tokenizer.sep_token\)"):
    tok.HFTokenizer(d / "custom.json", sep_token="<answer>")


def test_hf_without_eos_is_an_error(hf_files):
  d = hf_files[0]
  with pytest.raises(ValueError, match="none of the EOS tokens"):
    tok.HFTokenizer(d / "no_eos.json")
  t = tok.HFTokenizer(d / "no_eos.json", eos_token="<unk>")
  assert t.eos_id == t.bos_id == t.pad_id == t.sep_id


def test_make_tokenizer_errors(tmp_path, sp_model):
  with pytest.raises(ValueError, match="unknown tokenizer kind 'bpe'"):
    tok.make_tokenizer("bpe", "x")
  with pytest.raises(FileNotFoundError, match="missing.model"):
    tok.make_tokenizer("sentencepiece", str(tmp_path / "missing.model"))
  with pytest.raises(ValueError, match="needs a file"):
    tok.make_tokenizer("hf")
  garbage = tmp_path / "garbage.model"
  garbage.write_bytes(b"not a model")
  with pytest.raises(ValueError, match="garbage.model.*not a SentencePiece model"):
    tok.make_tokenizer("sentencepiece", str(garbage))
  with pytest.raises(ValueError, match="not a Hugging Face tokenizer.json"):
    tok.make_tokenizer("hf", str(garbage))
  with pytest.raises(ValueError, match=r"does not take options \['sep_token'\]"):
    tok.make_tokenizer("sentencepiece", str(sp_model / "m.model"), sep_token="<sep>")
  with pytest.raises(ValueError, match="takes no path"):
    tok.make_tokenizer("byte", "some/file")
  assert isinstance(tok.make_tokenizer(), tok.ByteTokenizer)


@pytest.mark.skipif(os.geteuid() == 0, reason="root reads files without read permission")
def test_unreadable_file(tmp_path):
  f = tmp_path / "locked.json"
  f.write_text("{}")
  f.chmod(0)
  with pytest.raises(PermissionError, match="locked.json"):
    tok.make_tokenizer("hf", str(f))


def test_check_vocab(sp_model):
  t = tok.SentencePieceTokenizer(sp_model / "m.model")
  tok.check_vocab(t, 80)
  tok.check_vocab(t, 128)  # a padded model vocabulary is fine
  with pytest.raises(ValueError, match="vocab_size 80.*model's vocab_size is 64"):
    tok.check_vocab(t, 64)
  tok.check_vocab(tok.ByteTokenizer(), 260)
  with pytest.raises(ValueError, match="set model vocab_size >= 260"):
    tok.check_vocab(tok.ByteTokenizer(), 259)
