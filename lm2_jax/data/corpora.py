"""Local text corpora: files in, documents (strings) out, with counts of everything read and skipped.

Formats, chosen by file name:
  * `.txt`: by default one document per file (`txt_split="file"`); with `txt_split="blank_lines"` a file
    holds many documents separated by one or more blank lines (lines of only whitespace).
  * `.jsonl`, `.jsonl.gz`: one JSON object per line; the document is the string at `text_field` (a dotted
    path such as "meta.text" reaches into nested objects). Blank lines are ignored.
  * `.array_record`: one document per record; a record is UTF-8 text (`array_record_format="text"`) or a
    UTF-8 JSON object read like a JSONL line (`array_record_format="json"`).
  * `.py`: source code, one document per file; read when a path or a glob ending in `.py` names it, never
    found by a directory search or another glob (a directory of text data is not also one of its scripts).

Paths may be files, directories (searched recursively for the formats above but `.py`, in sorted order),
glob patterns, or `stdlib:train` / `stdlib:held_out`: the two splits of the running Python's standard
library sources (`lm2_jax.data.stdlib`). A path or pattern that matches nothing is an error, and so is a
corpus with no documents.

Bad input never crashes deep inside the pipeline and is never silently dropped: undecodable UTF-8 (reported
with file and byte offset; in a `.jsonl.gz` the offset counts decompressed bytes), a JSONL line that is not
JSON or lacks the text field (file and line number), or a corrupt gzip or ArrayRecord file either raise
`CorpusError` (`on_error="fail"`) or are skipped and counted in `CorpusStats.skipped` (`on_error="skip"`),
with the first messages kept in `CorpusStats.examples`.
Empty documents carry no tokens and are always skipped and counted as "empty".
"""

from __future__ import annotations

import dataclasses
import glob
import gzip
import json
import os
import re
from collections.abc import Iterator, Sequence

from lm2_jax.data import stdlib

TXT_SPLITS = ("file", "blank_lines")
ON_ERROR = ("fail", "skip")
ARRAY_RECORD_FORMATS = ("text", "json")
_SUFFIXES = (".txt", ".jsonl", ".jsonl.gz", ".array_record")
_SOURCE_SUFFIXES = (".py",)  # read when named, not found by a directory search
_BLANK_LINES = re.compile(rb"\n[ \t\r\f\v]*\n[ \t\r\f\v\n]*")
_MAX_EXAMPLES = 20


class CorpusError(ValueError):
  """A corpus file that cannot be read as configured; the message names the file and the place in it."""


@dataclasses.dataclass
class CorpusStats:
  """Counts of one pass over a corpus.

  Attributes:
    files: files read.
    documents: documents produced.
    skipped: documents (or lines / records) skipped, by reason: "decode_error", "bad_json",
      "missing_field", "not_text", "bad_file", "empty".
    examples: the first messages of skipped items (file and place), for logs.
    tokens: tokens of the produced documents, EOS included (filled in by packing).
  """

  files: int = 0
  documents: int = 0
  skipped: dict[str, int] = dataclasses.field(default_factory=dict)
  examples: list[str] = dataclasses.field(default_factory=list)
  tokens: int = 0

  def skip(self, reason: str, message: str) -> None:
    self.skipped[reason] = self.skipped.get(reason, 0) + 1
    if len(self.examples) < _MAX_EXAMPLES:
      self.examples.append(message)


@dataclasses.dataclass(frozen=True)
class CorpusConfig:
  """How to read a corpus.

  Attributes:
    paths: files, directories or glob patterns.
    txt_split: "file" (one document per .txt file) or "blank_lines" (documents separated by blank lines).
    text_field: the (dotted) key of the document text in JSONL lines and JSON ArrayRecord records.
    array_record_format: "text" (records are UTF-8 text) or "json" (records are UTF-8 JSON objects).
    on_error: "fail" (raise CorpusError) or "skip" (skip the item and count it).
  """

  paths: tuple[str, ...]
  txt_split: str = "file"
  text_field: str = "text"
  array_record_format: str = "text"
  on_error: str = "fail"

  def __post_init__(self):
    if isinstance(self.paths, (str, os.PathLike)):
      object.__setattr__(self, "paths", (os.fspath(self.paths),))
    else:
      object.__setattr__(self, "paths", tuple(os.fspath(p) for p in self.paths))
    if not self.paths:
      raise ValueError("corpus.paths is empty; give at least one file, directory or glob pattern.")
    for key, value, allowed in (("txt_split", self.txt_split, TXT_SPLITS),
                                ("on_error", self.on_error, ON_ERROR),
                                ("array_record_format", self.array_record_format, ARRAY_RECORD_FORMATS)):
      if value not in allowed:
        raise ValueError(f"corpus.{key} is {value!r}; use one of {allowed}.")


def _kind(path: str, named: bool = True) -> str | None:
  """The format of `path` by its suffix; source files only when `named` (not from a directory search)."""
  for suffix in _SUFFIXES + (_SOURCE_SUFFIXES if named else ()):
    if path.endswith(suffix):
      return suffix
  return None


def resolve_paths(paths: Sequence[str]) -> list[str]:
  """Expands files, directories and glob patterns into a sorted, de-duplicated list of corpus files.

  Raises:
    FileNotFoundError: a path or pattern matches no corpus file.
    CorpusError: a file named explicitly has a suffix this module cannot read.
  """
  files: list[str] = []
  seen: set[str] = set()
  for path in paths:
    if stdlib.is_alias(path):
      try:
        found = stdlib.expand(path)
      except ValueError as e:
        raise CorpusError(f"corpus path {path!r}: {e}") from e
    elif os.path.isdir(path):
      found = sorted(os.path.join(root, name) for root, _, names in os.walk(path) for name in names
                     if _kind(name, named=False))
    elif os.path.isfile(path):
      if not _kind(path):
        raise CorpusError(f"corpus file {path!r} has an unknown suffix; use one of "
                          f"{_SUFFIXES + _SOURCE_SUFFIXES}.")
      found = [path]
    elif glob.has_magic(path):
      found = sorted(p for p in glob.glob(path, recursive=True) if os.path.isfile(p)
                     and _kind(p, named=path.endswith(_SOURCE_SUFFIXES)))
    else:
      raise FileNotFoundError(f"corpus path {path!r} does not exist (corpus.paths).")
    if not found:
      raise FileNotFoundError(f"corpus path {path!r} matches no {'/'.join(_SUFFIXES + _SOURCE_SUFFIXES)} "
                              "file (corpus.paths).")
    files += [f for f in found if f not in seen]
    seen.update(found)
  return files


def _decode(data: bytes, where: str, offset: int, config: CorpusConfig, stats: CorpusStats) -> str | None:
  """UTF-8 text of `data`, or None (counted) when it is not UTF-8 and errors are skipped."""
  try:
    return data.decode("utf-8")
  except UnicodeDecodeError as e:
    message = f"{where}: invalid UTF-8 at byte offset {offset + e.start}"
    if config.on_error == "fail":
      raise CorpusError(message + " (set corpus.on_error='skip' to skip such documents)") from e
    stats.skip("decode_error", message)
    return None


def _field(obj, field: str, where: str, config: CorpusConfig, stats: CorpusStats) -> str | None:
  """The text at dotted `field` of a parsed JSON object, or None (counted)."""
  value = obj
  for key in field.split("."):
    if not isinstance(value, dict) or key not in value:
      message = f"{where}: no field {field!r} (corpus.text_field)"
      return _fail_or_skip("missing_field", message, config, stats)
    value = value[key]
  if not isinstance(value, str):
    return _fail_or_skip("not_text", f"{where}: field {field!r} is {type(value).__name__}, not a string",
                         config, stats)
  return value


def _fail_or_skip(reason: str, message: str, config: CorpusConfig, stats: CorpusStats) -> None:
  if config.on_error == "fail":
    raise CorpusError(message + " (set corpus.on_error='skip' to skip and count such items)")
  stats.skip(reason, message)
  return None


def _json_text(data: bytes, where: str, offset: int, config: CorpusConfig,
               stats: CorpusStats, jsonl_line: bool = False) -> str | None:
  line = _decode(data, where, offset, config, stats)
  if line is None:
    return None
  try:
    obj = json.loads(line)
  except json.JSONDecodeError as e:
    # A JSONL line without its line break (only a file's last can lack it): cut short while written.
    cut = (" - the file's last line, without a line break: the file was cut short (a copy or write that "
           "did not finish); restore the file") if jsonl_line and not data.endswith(b"\n") else ""
    return _fail_or_skip("bad_json", f"{where}: not JSON ({e.msg} at column {e.colno}){cut}", config,
                         stats)
  return _field(obj, config.text_field, where, config, stats)


def _read_txt(path: str, config: CorpusConfig, stats: CorpusStats) -> Iterator[str | None]:
  with open(path, "rb") as f:
    data = f.read()
  if config.txt_split == "file" or path.endswith(_SOURCE_SUFFIXES):
    yield _decode(data, path, 0, config, stats)
    return
  # Blank lines separate documents and belong to none; so does a file's final line break.
  start = 0
  for match in _BLANK_LINES.finditer(data):
    if data[start:match.start()].strip():
      yield _decode(data[start:match.start()], path, start, config, stats)
    start = match.end()
  if data[start:].strip():
    yield _decode(data[start:].rstrip(b"\r\n"), path, start, config, stats)


def _read_jsonl(path: str, config: CorpusConfig, stats: CorpusStats) -> Iterator[str | None]:
  opener = gzip.open if path.endswith(".gz") else open
  offset = 0
  try:
    with opener(path, "rb") as f:
      for number, line in enumerate(f, start=1):
        if line.strip():
          yield _json_text(line, f"{path}:{number}", offset, config, stats, jsonl_line=True)
        offset += len(line)
  except (OSError, EOFError) as e:  # gzip.BadGzipFile is an OSError; a truncated stream raises EOFError.
    _fail_or_skip("bad_file", f"{path}: unreadable after byte {offset} of its content: {e}", config, stats)


def _read_array_record(path: str, config: CorpusConfig, stats: CorpusStats) -> Iterator[str | None]:
  from array_record.python import array_record_module  # pylint: disable=g-import-not-at-top

  reader = array_record_module.ArrayRecordReader(path)
  if not reader.ok():  # the reader reports a bad file here; its close() would raise
    _fail_or_skip("bad_file", f"{path}: not a readable ArrayRecord file", config, stats)
    return
  try:
    records = reader.read_all()
  except RuntimeError as e:
    _fail_or_skip("bad_file", f"{path}: corrupt ArrayRecord file: {e}", config, stats)
    return
  finally:
    reader.close()
  for number, record in enumerate(records):
    where = f"{path}: record {number}"
    if config.array_record_format == "json":
      yield _json_text(record, where, 0, config, stats)
    else:
      yield _decode(record, where, 0, config, stats)


_READERS = {".txt": _read_txt, ".py": _read_txt, ".jsonl": _read_jsonl, ".jsonl.gz": _read_jsonl,
            ".array_record": _read_array_record}


def iter_documents(config: CorpusConfig, stats: CorpusStats | None = None) -> Iterator[str]:
  """Yields the documents of the corpus, in file order, counting into `stats`.

  Args:
    config: what to read and how.
    stats: where to count files, documents and skips; a fresh one if None.

  Yields:
    The non-empty documents.

  Raises:
    FileNotFoundError: a path matches no file.
    CorpusError: bad input with `on_error="fail"`, or no document at all.
  """
  stats = CorpusStats() if stats is None else stats
  for path in resolve_paths(config.paths):
    stats.files += 1
    for text in _READERS[_kind(path)](path, config, stats):
      if text is None:
        continue
      if not text.strip():
        stats.skip("empty", f"{path}: an empty document")
        continue
      stats.documents += 1
      yield text
  if stats.documents == 0:
    raise CorpusError(f"corpus {list(config.paths)} has no documents (skipped: {stats.skipped}).")
