"""Reading LM2 parameters from any of the project's checkpoint layouts: the one home for it.

It sits below `train/`, `eval/` and `convert/` (it imports only the model), so the trainer's warm start,
evaluation and export agree on what a checkpoint is without a lower layer importing a higher one.

Two layouts hold parameters:
  - the trainer's (`lm2_jax.train.checkpoint`): a run directory `runs/<name>/`, its `checkpoints/`
    directory (newest step) or one step directory `checkpoints/<step>/`. The step's `state` item is the
    whole TrainState; the resolved run config is its `config` item (JSON) or the run's `config.yaml`;
  - a params checkpoint, written by `python -m lm2_jax.convert import`: an Orbax PyTree {"params": ...}
    with the ModelConfig in `model.yaml` and the HF tokenizer files beside it.

Only `params` is ever restored (partial restore: the optimizer moments, twice the size of the parameters,
are never read), after every parameter's shape is checked against the model config, so a config that does
not match the checkpoint fails with the names of the parameters that differ.
"""

from __future__ import annotations

import dataclasses
import logging
import pathlib
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import orbax.checkpoint as ocp

from lm2_jax import yaml_io
from lm2_jax.model import LM2, ModelConfig
from lm2_jax.typing import PyTree

MODEL_CONFIG_FILE = "model.yaml"


class CheckpointError(ValueError):
  """A path that is not a loadable checkpoint, or a config that does not match it."""


def _step_dirs(checkpoints: pathlib.Path) -> list[int]:
  """Finished steps under a checkpoints directory (integer names holding a `state` item)."""
  steps = []
  for child in checkpoints.iterdir():
    if child.is_dir() and child.name.isdigit() and (child / "state").is_dir():
      steps.append(int(child.name))
  return sorted(steps)


def resolve(path: str | pathlib.Path) -> tuple[pathlib.Path, pathlib.Path | None]:
  """(step directory to restore, run directory or None) for a run, checkpoints or step directory.

  Raises:
    CheckpointError: the path does not exist or holds no checkpoint.
  """
  path = pathlib.Path(path)
  if not path.exists():
    raise CheckpointError(f"checkpoint path {path} does not exist; pass a run directory (runs/NAME), "
                          "its checkpoints/ directory, or one step directory (runs/NAME/checkpoints/STEP)")
  if not path.is_dir():
    raise CheckpointError(f"checkpoint path {path} is a file; pass a run, checkpoints or step directory")
  if (path / "state").is_dir():
    run_dir = path.parent.parent if path.parent.name == "checkpoints" else None
    return path, run_dir
  checkpoints = path / "checkpoints" if (path / "checkpoints").is_dir() else path
  steps = _step_dirs(checkpoints)
  if not steps:
    raise CheckpointError(
        f"{path} is not a checkpoint: no <step>/state directory in {checkpoints} (a run directory of "
        "train.py holds checkpoints/<step>/state once a checkpoint has been saved)")
  run_dir = checkpoints.parent if checkpoints.name == "checkpoints" else None
  return checkpoints / str(steps[-1]), run_dir


def _read_yaml(path: pathlib.Path) -> dict:
  """The top-level mapping of a run's config.yaml ({} when empty); CheckpointError names the file."""
  return yaml_io.read_mapping(path, CheckpointError)


def run_config(step_dir: pathlib.Path, run_dir: pathlib.Path | None) -> tuple[dict, str]:
  """The run config mapping of a checkpoint (its saved `config` item, else the run's config.yaml)."""
  if (step_dir / "config").is_dir():
    try:
      restored = ocp.Checkpointer(ocp.JsonCheckpointHandler()).restore(step_dir / "config")
      if isinstance(restored, dict):
        return restored, str(step_dir / "config")
    except (OSError, ValueError) as e:
      logging.warning("cannot read %s (%s); trying config.yaml", step_dir / "config", e)
  if run_dir is not None and (run_dir / "config.yaml").is_file():
    path = run_dir / "config.yaml"
    return _read_yaml(path), str(path)
  raise CheckpointError(f"{step_dir} has no saved config (neither {step_dir / 'config'} nor a run "
                        "directory config.yaml): pass --model-config FILE.yaml to say which model it is")


def model_config_from_run(run: dict, where: str) -> ModelConfig:
  """The ModelConfig of a run config mapping; errors name the file."""
  try:
    return ModelConfig.from_dict(dict(run.get("model") or {}))
  except (TypeError, ValueError) as e:
    raise CheckpointError(f"{where}: model section: {e}") from e


def abstract_params(cfg: ModelConfig) -> PyTree:
  """ShapeDtypeStructs of `LM2(cfg)`'s params (no allocation)."""
  tokens = jax.ShapeDtypeStruct((1, cfg.segment_length), jnp.int32)
  boxed = jax.eval_shape(lambda t: LM2(cfg).init(jax.random.key(0), t), tokens)
  return nn.unbox(boxed["params"])


def _shape_mismatches(expected: PyTree, saved: Any) -> list[str]:
  """'path: expected X, checkpoint Y' for every parameter whose presence or shape differs."""
  def flat(tree):
    leaves = jax.tree_util.tree_flatten_with_path(tree, is_leaf=lambda x: hasattr(x, "shape"))[0]
    return {jax.tree_util.keystr(p): tuple(x.shape) for p, x in leaves}
  want, have = flat(expected), flat(saved)
  out = [f"{k}: config expects {want[k]}, checkpoint has {have.get(k, 'nothing')}"
         for k in sorted(want) if want[k] != have.get(k)]
  out += [f"{k}: in the checkpoint, not in the config" for k in sorted(set(have) - set(want))]
  return out


def restore_params(step_dir: pathlib.Path, cfg: ModelConfig) -> PyTree:
  """Restores `state.params` of a step directory onto the default device, after a shape check.

  Raises:
    CheckpointError: the state cannot be read, or its parameters do not match `cfg`.
  """
  return restore_params_item(step_dir / "state", cfg)


def restore_params_item(item_dir: pathlib.Path, cfg: ModelConfig, *, host: bool = False) -> PyTree:
  """Restores the `params` entry of an Orbax PyTree item (a train state, or {"params": ...}).

  Only `params` is read (partial restore), after every parameter's shape is checked against `cfg`.
  `host=True` gives numpy arrays instead of arrays on the default device, for callers that re-lay the
  parameters out or shard them themselves and must not hold a whole copy on one accelerator.

  Raises:
    CheckpointError: the item cannot be read, or its parameters do not match `cfg`.
  """
  # Orbax's tensorstore layer needs an absolute path; with a relative one it reports no metadata.
  item_dir = pathlib.Path(item_dir).absolute()
  checkpointer = ocp.PyTreeCheckpointer()
  try:
    metadata = checkpointer.metadata(item_dir)
  except Exception as e:  # pylint: disable=broad-except
    # Orbax raises many exception types for unreadable directories; all mean "not a checkpoint".
    raise CheckpointError(f"{item_dir} is not a readable Orbax checkpoint ({type(e).__name__}: "
                          f"{str(e).splitlines()[0][:200] if str(e) else ''})") from e
  tree = getattr(metadata, "item_metadata", metadata)
  tree = getattr(tree, "tree", tree)
  if not isinstance(tree, dict) or "params" not in tree:
    keys = sorted(tree) if isinstance(tree, dict) else type(tree).__name__
    raise CheckpointError(f"{item_dir} holds no `params` (found: {keys}); is this a train.py checkpoint?")
  expected = abstract_params(cfg)
  mismatches = _shape_mismatches(expected, tree["params"])
  if mismatches:
    shown = "\n  ".join(mismatches[:10])
    more = f"\n  ... and {len(mismatches) - 10} more" if len(mismatches) > 10 else ""
    raise CheckpointError(f"the model config does not match the checkpoint {item_dir}:\n  {shown}{more}")
  target = {"params": expected}
  if host:
    restore_args = jax.tree.map(lambda _: ocp.RestoreArgs(restore_type=np.ndarray), target)
  else:
    device = jax.sharding.SingleDeviceSharding(jax.local_devices()[0])
    restore_args = jax.tree.map(lambda _: ocp.ArrayRestoreArgs(sharding=device), target)
  restored = checkpointer.restore(
      item_dir, args=ocp.args.PyTreeRestore(item=target, restore_args=restore_args, partial_restore=True))
  return restored["params"]


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
    host: return numpy arrays (see `restore_params_item`).

  Raises:
    CheckpointError: the path is none of the layouts, or its config does not match its parameters.
  """
  path = pathlib.Path(path).absolute()
  if is_params_checkpoint(path):
    try:
      cfg = ModelConfig.from_yaml(path / MODEL_CONFIG_FILE)
    except (TypeError, ValueError) as e:
      raise CheckpointError(str(e)) from e
    params = restore_params_item(path, cfg, host=host)
    return ParamsCheckpoint(cfg, params, path, path)
  try:
    step_dir, run_dir = resolve(path)
  except CheckpointError as e:
    raise CheckpointError(f"{e}; or pass a params checkpoint written by `python -m lm2_jax.convert "
                          f"import` (it holds {MODEL_CONFIG_FILE})") from e
  run, where = run_config(step_dir, run_dir)
  cfg = model_config_from_run(run, where)
  params = restore_params_item(step_dir / "state", cfg, host=host)
  return ParamsCheckpoint(cfg, params, step_dir, _run_tokenizer(run))


def _run_tokenizer(run: dict) -> pathlib.Path | None:
  """The HF tokenizer.json a trainer run used, if its data section names one."""
  data = run.get("data") or {}
  if data.get("tokenizer") != "hf" or not data.get("tokenizer_path"):
    return None
  return pathlib.Path(data["tokenizer_path"])
