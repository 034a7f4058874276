"""The Python standard library's own source files: a corpus of long real documents on every machine.

The running interpreter's stdlib directory (`sysconfig.get_paths()["stdlib"]`) holds a few hundred `.py`
files of real, long text (median ~7 KB, up to ~800 KB), with nothing to download. One file is one document.
Left out: anything under a directory named in `EXCLUDED_DIRS` (installed packages, the test suites, byte
code) and the files the interpreter's build generated for its own machine (`_sysconfigdata_*.py`, the
`config-*` directory), which differ between machines with the same Python version.

The split is by a hash of each file's path relative to that directory (POSIX separators): a file is
held out when the first 8 bytes of sha256(path), as an integer, fall in the lowest `HELD_OUT_PERCENT`
percent. It needs no file list and no seed, so every machine with the same Python version gets the same
split, and a file added by a later version joins a split without moving any other.

Corpus paths `stdlib:train` and `stdlib:held_out` name the two splits wherever corpus paths are accepted
(`data.train_files` / `data.eval_files` of a `text` run, `eval.py perplexity --files`).
"""

from __future__ import annotations

import hashlib
import pathlib
import sysconfig

PREFIX = "stdlib:"
SPLITS = ("train", "held_out")
HELD_OUT_PERCENT = 10
EXCLUDED_DIRS = frozenset({"site-packages", "dist-packages", "test", "tests", "idle_test", "__pycache__"})


def stdlib_dir() -> pathlib.Path:
  """The running interpreter's standard library directory."""
  return pathlib.Path(sysconfig.get_paths()["stdlib"])


def split_of(relative_path: str) -> str:
  """"held_out" or "train" for a path relative to the stdlib directory, with POSIX separators."""
  digest = hashlib.sha256(relative_path.encode("utf-8")).digest()
  return "held_out" if int.from_bytes(digest[:8], "big") % 100 < HELD_OUT_PERCENT else "train"


def _excluded(relative: pathlib.PurePath) -> bool:
  directories = relative.parts[:-1]
  return (any(part in EXCLUDED_DIRS for part in directories)
          or (directories and directories[0].startswith("config-"))
          or relative.name.startswith("_sysconfigdata_"))


def stdlib_files(split: str, root: str | pathlib.Path | None = None) -> list[str]:
  """The `.py` files of one split, sorted by relative path.

  Args:
    split: "train" or "held_out".
    root: the directory to read (default `stdlib_dir()`; tests pass a small tree).
  Returns:
    Absolute paths.
  Raises:
    ValueError: an unknown split.
    FileNotFoundError: `root` is not a directory.
  """
  if split not in SPLITS:
    raise ValueError(f"stdlib split {split!r} is unknown; use one of {SPLITS} ({PREFIX}<split>).")
  root = (stdlib_dir() if root is None else pathlib.Path(root)).absolute()
  if not root.is_dir():
    raise FileNotFoundError(f"the standard library directory {str(root)!r} does not exist.")
  found = []
  for path in root.rglob("*.py"):
    relative = path.relative_to(root)
    if path.is_file() and not _excluded(relative) and split_of(relative.as_posix()) == split:
      found.append((relative.as_posix(), str(path)))
  return [path for _, path in sorted(found)]


def is_alias(path: str) -> bool:
  """Whether a corpus path is `stdlib:<split>`."""
  return path.startswith(PREFIX)


def expand(path: str) -> list[str]:
  """The files of a `stdlib:<split>` corpus path."""
  return stdlib_files(path[len(PREFIX):])
