"""Loading a trained model for evaluation: the parameters of an Orbax checkpoint and the run's config.

The trainer (`lm2_jax.train.checkpoint`) writes `<run_dir>/config.yaml` and
`<run_dir>/checkpoints/<step>/{state,data,config}`, where `state` is the whole `TrainState` and `config`
the resolved run config as JSON. Evaluation restores `state.params` only (partial restore: the optimizer
moments, twice the size of the parameters, are never read), and checks every parameter's shape against the
model config before restoring, so a config that does not match the checkpoint fails with the names of the
parameters that differ.

Accepted paths: a run directory, its `checkpoints/` directory (newest step), or one step directory.
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

from lm2_jax.data import tokenizers as tokenizers_lib
from lm2_jax.model import LM2, ModelConfig
from lm2_jax.train.config import ConfigError, read_yaml
from lm2_jax.typing import PyTree


class CheckpointError(ValueError):
  """A path that is not a loadable checkpoint, or a config that does not match it."""


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
    try:
      return read_yaml(path), str(path)
    except ConfigError as e:
      raise CheckpointError(str(e)) from e
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
