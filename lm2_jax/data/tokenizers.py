"""Tokenizers behind one small interface.

`Tokenizer` (defined in `tokenizer_base`, re-exported here) is what the rest of the project relies on:
`encode`, `decode`, `vocab_size` and the special ids `bos_id`, `eos_id`, `pad_id`, `sep_id` (the answer
separator of QA prompts). `ByteTokenizer` needs no files and is the default: ids 0..255 are raw UTF-8
bytes, then PAD, BOS, EOS, SEP. `WordTokenizer` (`words`) has one id per word of a fixed vocabulary;
`SentencePieceTokenizer` and `HFTokenizer` read local files; `make_tokenizer` builds one from a config and
`check_vocab` checks it against the model's vocabulary size.
"""

from __future__ import annotations

import inspect
import os

from lm2_jax.data.tokenizer_base import Tokenizer
from lm2_jax.data.words import WordTokenizer


class ByteTokenizer(Tokenizer):
  """UTF-8 bytes as tokens (ids 0..255) plus PAD=256, BOS=257, EOS=258, SEP=259; vocab_size 260."""

  vocab_size = 260
  pad_id = 256
  bos_id = 257
  eos_id = 258
  sep_id = 259

  def encode(self, text: str) -> list[int]:
    return list(text.encode("utf-8"))

  def decode(self, ids) -> str:
    return bytes(int(i) for i in ids if 0 <= int(i) < 256).decode("utf-8", errors="replace")


def _filter_ids(ids, drop: set[int]) -> list[int]:
  return [int(i) for i in ids if int(i) not in drop]


def _check_file(path, kind: str) -> str:
  """Returns `path` as a string, or raises a clear error if it is not a readable file."""
  if path is None:
    raise ValueError(f"tokenizer kind {kind!r} needs a file: set `path` (tokenizer.path in the config).")
  path = os.fspath(path)
  if not os.path.isfile(path):
    raise FileNotFoundError(f"{kind} tokenizer file {path!r} does not exist (tokenizer.path in the config).")
  if not os.access(path, os.R_OK):
    raise PermissionError(f"{kind} tokenizer file {path!r} is not readable.")
  return path


class SentencePieceTokenizer(Tokenizer):
  """A SentencePiece `.model` file.

  Special ids, in order of preference:
    * `bos_id`, `eos_id`, `pad_id`: the model's own ids (set at training time with `bos_id=`, `eos_id=`,
      `pad_id=`). SentencePiece trains with no PAD by default; then PAD falls back to EOS, and a model without
      BOS uses EOS as BOS. A model without EOS is an error. Because PAD may equal EOS, consumers must tell
      padding apart with the pipelines' `valid` / `loss_mask` arrays, never by comparing ids with `pad_id`.
    * `sep_id`: the id of the piece `sep_piece` (e.g. a `user_defined_symbols` entry such as "<sep>"); it
      must exist in the model (a piece SentencePiece does not know is an error, not a silent UNK). With no
      `sep_piece` the separator is EOS.

  Attributes:
    model_file: the path the model was loaded from.
    processor: the `sentencepiece.SentencePieceProcessor`.
  """

  def __init__(self, model_file, sep_piece: str | None = None):
    import sentencepiece as spm  # pylint: disable=g-import-not-at-top

    self.model_file = _check_file(model_file, "sentencepiece")
    try:
      self.processor = spm.SentencePieceProcessor(model_file=self.model_file)
    except (RuntimeError, OSError) as e:
      raise ValueError(f"{self.model_file!r} is not a SentencePiece model file: {e}") from e
    sp = self.processor
    self.vocab_size = sp.get_piece_size()
    if sp.eos_id() < 0:
      raise ValueError(
          f"SentencePiece model {self.model_file!r} has no EOS piece; retrain it with eos_id >= 0.")
    self.eos_id = sp.eos_id()
    self.bos_id = sp.bos_id() if sp.bos_id() >= 0 else self.eos_id
    self.pad_id = sp.pad_id() if sp.pad_id() >= 0 else self.eos_id
    if sep_piece is None:
      self.sep_id = self.eos_id
    else:
      sep = sp.piece_to_id(sep_piece)
      if sp.id_to_piece(sep) != sep_piece:
        raise ValueError(
            f"SentencePiece model {self.model_file!r} has no piece {sep_piece!r} (tokenizer.sep_piece); "
            "train it with user_defined_symbols=[...] or leave sep_piece unset to use EOS.")
      self.sep_id = sep
    self._special = {self.bos_id, self.eos_id, self.pad_id, self.sep_id}

  def encode(self, text: str) -> list[int]:
    return self.processor.encode(text)

  def encode_batch(self, texts: list[str]) -> list[list[int]]:
    """Token ids of each text (one call into the C++ library)."""
    return self.processor.encode(list(texts))

  def decode(self, ids) -> str:
    return self.processor.decode(_filter_ids(ids, self._special))


# Special-token names tried in order when the caller names none (first match wins).
_HF_DEFAULT_NAMES = {
    "bos": ("<|begin_of_text|>", "<s>", "<bos>", "[BOS]"),
    "eos": ("<|end_of_text|>", "</s>", "<eos>", "[EOS]", "<|endoftext|>"),
    "pad": ("<|finetune_right_pad_id|>", "<pad>", "[PAD]", "<|pad|>"),
    "sep": ("<|reserved_special_token_0|>", "<sep>", "[SEP]"),
}


class HFTokenizer(Tokenizer):
  """A Hugging Face `tokenizer.json`, through the `tokenizers` library.

  Special tokens are looked up by name. A name given explicitly (`bos_token=...`) must exist in the file.
  With no name, the first of a list of usual names that exists is used (Llama-3 first:
  "<|begin_of_text|>", "<|end_of_text|>", "<|finetune_right_pad_id|>", "<|reserved_special_token_0|>"; then
  "<s>"/"</s>"/"<pad>"/"<sep>" styles). When none exists: EOS is an error; BOS, PAD and SEP fall back to EOS
  (so Llama-3.0, which has no pad token, pads with "<|end_of_text|>"). Because PAD may equal EOS, consumers
  must tell padding apart with the `valid` / `loss_mask` arrays, never by comparing ids with `pad_id`.

  `encode` adds no special tokens (the file's post-processor, e.g. Llama-3's BOS, is not applied); `decode`
  drops the four special ids and every token the file marks special.

  Attributes:
    tokenizer_json: the path the tokenizer was loaded from.
    backend: the `tokenizers.Tokenizer`.
  """

  def __init__(self, tokenizer_json, bos_token: str | None = None, eos_token: str | None = None,
               pad_token: str | None = None, sep_token: str | None = None):
    import tokenizers  # pylint: disable=g-import-not-at-top

    self.tokenizer_json = _check_file(tokenizer_json, "hf")
    try:
      self.backend = tokenizers.Tokenizer.from_file(self.tokenizer_json)
    except Exception as e:  # The library raises a bare Exception for malformed files.
      raise ValueError(f"{self.tokenizer_json!r} is not a Hugging Face tokenizer.json: {e}") from e
    self.vocab_size = self.backend.get_vocab_size(with_added_tokens=True)
    self.eos_id = self._lookup("eos", eos_token)
    if self.eos_id is None:
      raise ValueError(
          f"{self.tokenizer_json!r} has none of the EOS tokens {_HF_DEFAULT_NAMES['eos']}; name one with "
          "tokenizer.eos_token.")
    self.bos_id = self._lookup_or_eos("bos", bos_token)
    self.pad_id = self._lookup_or_eos("pad", pad_token)
    self.sep_id = self._lookup_or_eos("sep", sep_token)
    self._special = {self.bos_id, self.eos_id, self.pad_id, self.sep_id}

  def _lookup(self, role: str, name: str | None) -> int | None:
    if name is not None:
      token_id = self.backend.token_to_id(name)
      if token_id is None:
        raise ValueError(f"{self.tokenizer_json!r} has no token {name!r} (tokenizer.{role}_token).")
      return token_id
    for candidate in _HF_DEFAULT_NAMES[role]:
      token_id = self.backend.token_to_id(candidate)
      if token_id is not None:
        return token_id
    return None

  def _lookup_or_eos(self, role: str, name: str | None) -> int:
    token_id = self._lookup(role, name)
    return self.eos_id if token_id is None else token_id

  def encode(self, text: str) -> list[int]:
    return self.backend.encode(text, add_special_tokens=False).ids

  def encode_batch(self, texts: list[str]) -> list[list[int]]:
    """Token ids of each text (the library encodes the batch in parallel)."""
    return [e.ids for e in self.backend.encode_batch(list(texts), add_special_tokens=False)]

  def decode(self, ids) -> str:
    return self.backend.decode(_filter_ids(ids, self._special), skip_special_tokens=True)


TOKENIZER_KINDS = ("byte", "words", "sentencepiece", "hf")


def make_tokenizer(kind: str = "byte", path: str | None = None, **options) -> Tokenizer:
  """Builds the tokenizer a config names.

  Args:
    kind: "byte" (no file), "words" (a vocabulary file, one token per line; None = the built-in bAbI
      vocabulary), "sentencepiece" (a `.model` file) or "hf" (a `tokenizer.json`).
    path: the tokenizer file; must be None for "byte".
    **options: keyword arguments of the tokenizer class: `sep_piece` for "sentencepiece"; `bos_token`,
      `eos_token`, `pad_token`, `sep_token` for "hf".

  Returns:
    The tokenizer.

  Raises:
    ValueError: an unknown kind, an option the kind does not take, or a file that is not a tokenizer.
    FileNotFoundError: `path` does not exist.
  """
  if kind == "byte":
    if path is not None or options:
      raise ValueError(f"tokenizer kind 'byte' takes no path or options (got path={path!r}, {options}).")
    return ByteTokenizer()
  if kind == "words":
    if options:
      raise ValueError(f"tokenizer kind 'words' takes no options (got {options}).")
    return WordTokenizer.babi() if path is None else WordTokenizer.from_file(path)
  classes = {"sentencepiece": SentencePieceTokenizer, "hf": HFTokenizer}
  if kind not in classes:
    raise ValueError(f"unknown tokenizer kind {kind!r} (tokenizer.kind); use one of {TOKENIZER_KINDS}.")
  cls = classes[kind]
  allowed = set(inspect.signature(cls.__init__).parameters) - {"self", "model_file", "tokenizer_json"}
  unknown = set(options) - allowed
  if unknown:
    raise ValueError(
        f"tokenizer kind {kind!r} does not take options {sorted(unknown)}; it takes {sorted(allowed)}.")
  return cls(path, **options)


def check_vocab(tokenizer: Tokenizer, model_vocab_size: int) -> None:
  """Raises ValueError unless every id `tokenizer` can produce is below `model_vocab_size`.

  A model vocabulary larger than the tokenizer's is allowed (vocabularies are often padded to a multiple of
  128 for speed); a smaller one would index the embedding out of range, which JAX does not report.
  """
  special = {"bos_id": tokenizer.bos_id, "eos_id": tokenizer.eos_id, "pad_id": tokenizer.pad_id,
             "sep_id": tokenizer.sep_id}
  bad = {name: i for name, i in special.items() if not 0 <= i < model_vocab_size}
  if tokenizer.vocab_size > model_vocab_size or bad:
    raise ValueError(
        f"{type(tokenizer).__name__} has vocab_size {tokenizer.vocab_size} (special ids {special}) but the "
        f"model's vocab_size is {model_vocab_size}; set model vocab_size >= {tokenizer.vocab_size}.")
