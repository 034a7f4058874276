"""The `Tokenizer` interface every tokenizer implements (its own module so that `tokenizers`, which builds
every kind, and `words`, which defines one, both import it without importing each other)."""

from __future__ import annotations

import abc


class Tokenizer(abc.ABC):
  """Text <-> token ids, with the special ids the pipelines and the model need."""

  vocab_size: int
  bos_id: int
  eos_id: int
  pad_id: int
  sep_id: int

  @abc.abstractmethod
  def encode(self, text: str) -> list[int]:
    """Token ids of `text`, without BOS/EOS."""

  @abc.abstractmethod
  def decode(self, ids) -> str:
    """Text of `ids`; special ids are dropped."""
