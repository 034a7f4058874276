"""Reading a YAML file whose top level is a mapping: the one reader under the config and checkpoint layers."""

from __future__ import annotations

import pathlib

import yaml


def read_mapping(path: str | pathlib.Path, error: type[Exception] = ValueError) -> dict:
  """The top-level mapping of a YAML file ({} for an empty file).

  Raises:
    `error` (naming the file and why): unreadable, invalid YAML, or a top level that is not a mapping.
  """
  path = pathlib.Path(path)
  try:
    text = path.read_text()
  except OSError as e:
    raise error(f"cannot read config file {path}: {e}") from e
  try:
    data = yaml.safe_load(text)
  except yaml.YAMLError as e:
    raise error(f"{path}: invalid YAML: {e}") from e
  if data is None:
    return {}
  if not isinstance(data, dict):
    raise error(f"{path}: expected a mapping at the top level, got {type(data).__name__}")
  return data
