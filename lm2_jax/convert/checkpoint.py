"""Reading LM2 parameters from any of the project's checkpoint layouts.

Two layouts hold parameters:
  - a params checkpoint, written by `python -m lm2_jax.convert import`: an Orbax PyTree {"params": ...}
    with the ModelConfig in `model.yaml` and the HF tokenizer files beside it;
  - the trainer's (`lm2_jax.train.checkpoint`): a run directory `runs/<name>/`, its `checkpoints/`
    directory (newest step) or one step directory `checkpoints/<step>/`, whose `state` item holds the
    whole TrainState and whose config sits in the step's `config` item or the run's `config.yaml`.

Both are read through `lm2_jax.eval.checkpoints` (path resolution, run config, shape-checked partial
restore of `params` only), so export, evaluation and warm starts agree on what a checkpoint is.
"""

from __future__ import annotations

import dataclasses
import pathlib

from lm2_jax.eval import checkpoints as eval_checkpoints
from lm2_jax.model import ModelConfig
from lm2_jax.typing import PyTree

MODEL_CONFIG_FILE = "model.yaml"


@dataclasses.dataclass(frozen=True)
class ParamsCheckpoint:
  """The parameters of a checkpoint and what describes them.

  Attributes:
    cfg: the checkpoint's ModelConfig.
    params: its unboxed parameters (jax arrays on the default device, or numpy arrays with host=True).
    source: the directory they were restored from (for messages).
    tokenizer: where an HF tokenizer lives: a directory of tokenizer files, a `tokenizer.json` file,
      or None when the checkpoint has none (byte, words or sentencepiece runs).
  """

  cfg: ModelConfig
  params: PyTree
  source: pathlib.Path
  tokenizer: pathlib.Path | None


def is_params_checkpoint(path: str | pathlib.Path) -> bool:
  """True for a directory written by `python -m lm2_jax.convert import` (it holds model.yaml)."""
  return (pathlib.Path(path) / MODEL_CONFIG_FILE).is_file()


def read_params(path: str | pathlib.Path, *, host: bool = False) -> ParamsCheckpoint:
  """Restores the parameters of a params checkpoint, a run, a checkpoints or a step directory.

  Args:
    path: any of the layouts in the module docstring.
    host: return numpy arrays (see `lm2_jax.eval.checkpoints.restore_params_item`).

  Raises:
    lm2_jax.eval.checkpoints.CheckpointError: the path is none of the layouts, or its config does not
      match its parameters.
  """
  path = pathlib.Path(path).absolute()
  if is_params_checkpoint(path):
    try:
      cfg = ModelConfig.from_yaml(path / MODEL_CONFIG_FILE)
    except (TypeError, ValueError) as e:
      raise eval_checkpoints.CheckpointError(str(e)) from e
    params = eval_checkpoints.restore_params_item(path, cfg, host=host)
    return ParamsCheckpoint(cfg, params, path, path)
  try:
    step_dir, run_dir = eval_checkpoints.resolve(path)
  except eval_checkpoints.CheckpointError as e:
    raise eval_checkpoints.CheckpointError(
        f"{e}; or pass a params checkpoint written by `python -m lm2_jax.convert import` (it "
        f"holds {MODEL_CONFIG_FILE})") from e
  run, where = eval_checkpoints.run_config(step_dir, run_dir)
  cfg = eval_checkpoints.model_config_from_run(run, where)
  params = eval_checkpoints.restore_params_item(step_dir / "state", cfg, host=host)
  return ParamsCheckpoint(cfg, params, step_dir, _run_tokenizer(run))


def _run_tokenizer(run: dict) -> pathlib.Path | None:
  """The HF tokenizer.json a trainer run used, if its data section names one."""
  data = run.get("data") or {}
  if data.get("tokenizer") != "hf" or not data.get("tokenizer_path"):
    return None
  return pathlib.Path(data["tokenizer_path"])
