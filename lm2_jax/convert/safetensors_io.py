"""Tensor-by-tensor reading and shard-by-shard writing of Hugging Face safetensors checkpoints.

A Hugging Face checkpoint directory holds either one `model.safetensors` or several shards listed in
`model.safetensors.index.json` ({"weight_map": {tensor name: file name}}). Reading goes one tensor at a
time through `safetensors.safe_open` (memory-mapped), so a converter can place each tensor on its
destination before it reads the next, and never holds the whole checkpoint twice. Writing streams
(name, array) pairs into shards of bounded size, so only one shard is ever assembled in host memory.
"""

from __future__ import annotations

import json
import os
import pathlib
from collections.abc import Iterable, Iterator

import numpy as np
import safetensors
import safetensors.numpy

SINGLE_FILE = "model.safetensors"
INDEX_FILE = "model.safetensors.index.json"
# Transformers refuses safetensors files whose metadata lacks a known "format".
_METADATA = {"format": "pt"}


class SafetensorsCheckpoint:
  """The tensors of one safetensors checkpoint (single file or sharded), read one at a time.

  Each read opens its file, copies one tensor out and closes (unmaps) the file again: a file kept
  mapped would leave every page already read resident, so host RSS would grow to the checkpoint's
  size on top of the converted parameters.

  Attributes:
    directory: the checkpoint directory.
    files: tensor name -> path of the file that holds it.
  """

  def __init__(self, directory: str | os.PathLike, single_file: str = SINGLE_FILE,
               index_file: str | None = INDEX_FILE):
    self.directory = pathlib.Path(directory)
    self.files = _tensor_files(self.directory, single_file, index_file)

  @property
  def names(self) -> list[str]:
    return sorted(self.files)

  def _path(self, name: str) -> pathlib.Path:
    if name not in self.files:
      raise KeyError(f"{self.directory}: no tensor named {name!r} in the checkpoint")
    return self.files[name]

  def shape(self, name: str) -> tuple[int, ...]:
    """The tensor's shape, read from the file header (no data read)."""
    with safetensors.safe_open(self._path(name), "numpy") as handle:
      if name not in handle.keys():
        raise KeyError(f"{self.files[name]}: the index lists {name!r} in this file but it is "
                       "not there")
      return tuple(handle.get_slice(name).get_shape())

  def read(self, name: str) -> np.ndarray:
    """Reads one tensor into a fresh host array (bfloat16 comes back as ml_dtypes.bfloat16)."""
    with safetensors.safe_open(self._path(name), "numpy") as handle:
      if name not in handle.keys():
        raise KeyError(f"{self.files[name]}: the index lists {name!r} in this file but it is "
                       "not there")
      return handle.get_tensor(name)


def _tensor_files(directory: pathlib.Path, single_file: str,
                  index_file: str | None) -> dict[str, pathlib.Path]:
  """Maps every tensor name of the checkpoint in `directory` to the file that holds it."""
  if not directory.is_dir():
    raise FileNotFoundError(f"checkpoint directory not found: {directory}")
  index_path = directory / index_file if index_file else None
  if index_path is not None and index_path.is_file():
    try:
      weight_map = json.loads(index_path.read_text())["weight_map"]
    except (json.JSONDecodeError, KeyError, TypeError) as e:
      raise ValueError(f"{index_path}: not a safetensors index (needs a 'weight_map' mapping): "
                       f"{e}") from None
    files = {}
    for name, file_name in weight_map.items():
      path = directory / file_name
      if not path.is_file():
        raise FileNotFoundError(f"{index_path}: tensor {name!r} is mapped to {file_name}, which "
                                f"is missing from {directory}")
      files[name] = path
    return files
  path = directory / single_file
  if path.is_file():
    with safetensors.safe_open(path, "numpy") as handle:
      return {name: path for name in handle.keys()}
  others = sorted(p.name for p in directory.iterdir() if p.suffix in (".bin", ".pt", ".pth"))
  hint = (f" (found {others}: only safetensors checkpoints are supported; re-save with "
          f"save_pretrained(..., safe_serialization=True))" if others else "")
  expected = f"{single_file}" + (f" or {index_file}" if index_file else "")
  raise FileNotFoundError(f"{directory}: no {expected}{hint}")


def write_safetensors(tensors: Iterable[tuple[str, np.ndarray]], directory: str | os.PathLike,
                      max_shard_bytes: int = 2 << 30, single_file: str = SINGLE_FILE,
                      index_file: str = INDEX_FILE) -> list[str]:
  """Streams named arrays into `directory` as one file, or as shards plus an index.

  Arrays are consumed lazily: at most one shard (about `max_shard_bytes`) is held at a time. Shards are
  named like Hugging Face's (`model-00001-of-00003.safetensors`); with a single shard the file is
  `single_file` and no index is written.

  Args:
    tensors: (name, host array) pairs; names must be unique.
    directory: output directory (created if needed).
    max_shard_bytes: a shard is closed once it holds at least this many bytes.
    single_file: the file name used when everything fits in one shard.
    index_file: the index name used when there are several shards.

  Returns:
    The names of the files written, data files first.
  """
  directory = pathlib.Path(directory)
  directory.mkdir(parents=True, exist_ok=True)
  stem = single_file.removesuffix(".safetensors")
  temp_names: list[str] = []
  weight_map: dict[str, int] = {}
  total = 0

  def flush(shard: dict[str, np.ndarray]) -> None:
    temp = f".{stem}-partial-{len(temp_names):05d}.safetensors"
    safetensors.numpy.save_file(shard, str(directory / temp), metadata=_METADATA)
    temp_names.append(temp)

  shard: dict[str, np.ndarray] = {}
  shard_bytes = 0
  for name, array in _unique(tensors):
    array = np.ascontiguousarray(array)
    shard[name] = array
    weight_map[name] = len(temp_names)
    shard_bytes += array.nbytes
    total += array.nbytes
    if shard_bytes >= max_shard_bytes:
      flush(shard)
      shard, shard_bytes = {}, 0
  if shard or not temp_names:
    flush(shard)

  if len(temp_names) == 1:
    os.replace(directory / temp_names[0], directory / single_file)
    return [single_file]
  count = len(temp_names)
  final = [f"{stem}-{i + 1:05d}-of-{count:05d}.safetensors" for i in range(count)]
  for temp, name in zip(temp_names, final):
    os.replace(directory / temp, directory / name)
  index = {"metadata": {"total_size": total},
           "weight_map": {name: final[i] for name, i in sorted(weight_map.items())}}
  (directory / index_file).write_text(json.dumps(index, indent=2) + "\n")
  return final + [index_file]


def _unique(tensors: Iterable[tuple[str, np.ndarray]]) -> Iterator[tuple[str, np.ndarray]]:
  seen = set()
  for name, array in tensors:
    if name in seen:
      raise ValueError(f"tensor {name!r} given twice")
    seen.add(name)
    yield name, array
