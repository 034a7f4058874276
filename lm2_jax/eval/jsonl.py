"""Reading evaluation JSONL files: one JSON object per line, errors naming the file and line."""

from __future__ import annotations

import json
import pathlib
from typing import Iterator


def iter_objects(path: pathlib.Path, error: type[Exception],
                 expected: str = "a JSON object") -> Iterator[tuple[str, dict]]:
  """Yields ("file:line", object) for every non-blank line of `path`.

  Raises:
    error: a line that is not valid JSON, or not an object (the message says `expected`).
  """
  with open(path, encoding="utf-8") as f:
    for number, line in enumerate(f, 1):
      if not line.strip():
        continue
      where = f"{path}:{number}"
      try:
        row = json.loads(line)
      except json.JSONDecodeError as e:
        raise error(f"{where}: not valid JSON ({e.msg} at column {e.colno})") from None
      if not isinstance(row, dict):
        raise error(f"{where}: expected {expected}, got {type(row).__name__}")
      yield where, row
