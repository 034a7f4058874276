"""Loading a trained model for evaluation: its parameters, model config and tokenizer.

Reading checkpoints (path resolution, the run config, the shape-checked partial restore of `params`) lives in
`lm2_jax.checkpoints`, below train/, eval/ and convert/; `CheckpointError` and `run_config` are
re-exported here for evaluation's callers.
This module adds what evaluation needs on top: the run's tokenizer and trained length (`EvalModel`).

Accepted paths: a run directory, its `checkpoints/` directory (newest step), or one step directory.
"""

from __future__ import annotations

import dataclasses
import pathlib

from lm2_jax.checkpoints import CheckpointError, model_config_from_run, resolve, restore_params, run_config
from lm2_jax.data import tokenizers as tokenizers_lib
from lm2_jax.model import ModelConfig
from lm2_jax.typing import PyTree


@dataclasses.dataclass(frozen=True)
class EvalModel:
  """A model ready for evaluation.

  Attributes:
    name: the label of this model in tables (the run name, or the directory name).
    cfg: its ModelConfig.
    variables: {"params": ...} of `LM2(cfg)`, unboxed, on the default device.
    tokenizer: the tokenizer the run trained with.
    trained_length: tokens of one training row (data.num_segments * segment_length); None if unknown.
    step: the checkpoint step (None for a model that was never saved).
    source: where it was loaded from.
  """

  name: str
  cfg: ModelConfig
  variables: PyTree
  tokenizer: tokenizers_lib.Tokenizer
  trained_length: int | None = None
  step: int | None = None
  source: str = ""


def load_model(path: str | pathlib.Path, name: str | None = None,
               model_config: ModelConfig | None = None) -> EvalModel:
  """Loads the newest (or the named) checkpoint of a run for evaluation.

  Args:
    path: a run directory, its checkpoints directory or a step directory.
    name: the label in tables; default the run directory's name.
    model_config: overrides the checkpoint's own model config (it must still match the parameters).

  Raises:
    CheckpointError: see `resolve`, `restore_params`; also a tokenizer the run names but that is missing.
  """
  step_dir, run_dir = resolve(path)
  try:
    run, where = run_config(step_dir, run_dir)
  except CheckpointError:
    if model_config is None:
      raise
    run, where = {}, "--model-config"
  cfg = model_config or model_config_from_run(run, where)
  params = restore_params(step_dir, cfg)
  data = run.get("data") or {}
  try:
    tokenizer = tokenizers_lib.make_tokenizer(data.get("tokenizer", "byte"),
                                              data.get("tokenizer_path") or None)
  except (ValueError, FileNotFoundError) as e:
    raise CheckpointError(f"{where}: data.tokenizer: {e}") from e
  if tokenizer.vocab_size > cfg.vocab_size:
    raise CheckpointError(f"{where}: the tokenizer has {tokenizer.vocab_size} ids but model.vocab_size is "
                          f"{cfg.vocab_size}")
  segments = data.get("num_segments")
  trained = int(segments) * cfg.segment_length if isinstance(segments, int) else None
  label = name or (run_dir.name if run_dir is not None else step_dir.name)
  return EvalModel(label, cfg, {"params": params}, tokenizer, trained, int(step_dir.name)
                   if step_dir.name.isdigit() else None, str(step_dir))
