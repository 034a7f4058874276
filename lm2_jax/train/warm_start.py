"""`train.init_from`: start a run from the parameters of another checkpoint (a warm start).

The typical use is a pretrained Llama imported with `python -m lm2_jax.convert import` and trained
with fresh memory: the backbone comes from the checkpoint, the memory from the run's own init. Any
checkpoint `lm2_jax.checkpoints.read_params` reads works (a params checkpoint, or a train.py run,
checkpoints or step directory), so a run can also continue from another run's weights with a new
optimizer, schedule or data. Only parameters are taken: step, optimizer moments and RNG stay fresh.

Rules:
  - the backbone (every parameter with a Hugging Face name: embedding, attention, MLP, norms, head) must
    have the same shapes, so the architecture fields must agree; RoPE and norm settings may differ
    (e.g. a longer-context fine-tune) and are only reported;
  - memory parameters come from the checkpoint when it has them (same shapes required), and otherwise
    keep the fresh init; checkpoint memory the run does not use is dropped, with a log line;
  - the layouts may differ (scanned / unrolled, different `memory_layers` grouping of the scanned
    stacks): the parameters are re-laid out on the host with the converter's layout plan (derived from
    `lm2_jax.model.stack_layers`), so no accelerator ever holds a second whole copy, and each parameter
    is placed straight onto its mesh sharding.
"""

from __future__ import annotations

import logging
import pathlib

import jax
import numpy as np
from flax import traverse_util

from lm2_jax.checkpoints import read_params
from lm2_jax.convert import layout
from lm2_jax.convert.llama import hf_key_map
from lm2_jax.model import ModelConfig
from lm2_jax.typing import PyTree

log = logging.getLogger(__name__)

Path = tuple[str, ...]
# Fields that fix the backbone's parameter shapes (the checkpoint and the run must agree on them).
ARCHITECTURE_FIELDS = ("vocab_size", "d_model", "num_layers", "num_heads", "num_kv_heads", "mlp_dim",
                       "tie_embeddings")
# Fields that change what the backbone computes without changing its shapes: reported, not refused.
FUNCTION_FIELDS = ("rope_theta", "rope_scaling_factor", "rope_low_freq_factor",
                   "rope_high_freq_factor", "rope_original_max_position", "norm_eps")


class WarmStartError(ValueError):
  """`train.init_from` names a checkpoint whose parameters cannot start this run."""


def load_initial_params(path: str | pathlib.Path, model_cfg: ModelConfig, init_params: PyTree,
                        shardings: PyTree) -> PyTree:
  """The run's initial parameters: the checkpoint's where it has them, `init_params` elsewhere.

  Args:
    path: the checkpoint (`train.init_from`).
    model_cfg: the run's ModelConfig.
    init_params: the run's freshly initialised, unboxed parameters (`TrainState.params`); the memory
      parameters the checkpoint lacks are kept from here, and its tree structure is the result's.
    shardings: the NamedSharding of every parameter, shaped like `init_params` (the train state's
      `shardings.params`); each loaded parameter is placed with its sharding.

  Returns:
    A parameter tree shaped, typed and sharded like `init_params`.

  Raises:
    WarmStartError: an architecture field or a parameter shape differs between checkpoint and run.
    lm2_jax.checkpoints.CheckpointError: the path is not a readable checkpoint.
  """
  source = read_params(path, host=True)
  ckpt_cfg = source.cfg
  _check_fields(ckpt_cfg, model_cfg, source.source)
  ckpt_plan, run_plan = layout.plan_layout(ckpt_cfg), layout.plan_layout(model_cfg)
  taken = _taken_parts(ckpt_plan, run_plan, model_cfg, source.source)
  ckpt_flat = traverse_util.flatten_dict(source.params)
  init_flat = traverse_util.flatten_dict(init_params)
  sharding_flat = traverse_util.flatten_dict(shardings)
  missing = sorted(set(run_plan.targets) - set(init_flat))
  if missing:
    raise WarmStartError(f"init_params lack params/{'/'.join(missing[0])}; they are not the params of "
                         "LM2(model_cfg) (wrong config, or boxed / still a TrainState?)")

  out = {}
  for path_, target in run_plan.targets.items():
    if not any(part in taken for part in target.parts):
      out[path_] = init_flat[path_]
      continue

    def fetch(part: Path, path_=path_, target=target) -> np.ndarray:
      if part not in taken:
        return layout.part_of(init_flat[path_], target, run_plan.where[part][1])
      ckpt_path, index = ckpt_plan.where[part]
      array = ckpt_flat[ckpt_path]
      axis = ckpt_plan.targets[ckpt_path].axis
      return array if index is None else np.take(array, index, axis=axis)

    out[path_] = jax.device_put(layout.gather(target, fetch), sharding_flat[path_], may_alias=True)
  log.info("init_from %s: %d of %d parameter tensors from the checkpoint (step and optimizer fresh)",
           source.source, len(taken), len(run_plan.unrolled))
  return traverse_util.unflatten_dict(out)


def _check_fields(ckpt_cfg: ModelConfig, model_cfg: ModelConfig, source: pathlib.Path) -> None:
  """Architecture fields must agree (WarmStartError naming each); RoPE/norm differences are logged."""
  differ = [f"model.{name}={getattr(model_cfg, name)!r} but the checkpoint has "
            f"{getattr(ckpt_cfg, name)!r}" for name in ARCHITECTURE_FIELDS
            if getattr(model_cfg, name) != getattr(ckpt_cfg, name)]
  if differ:
    raise WarmStartError(f"train.init_from={source}: the checkpoint's backbone does not fit this "
                         f"run's model: {'; '.join(differ)}. Set these model fields to the "
                         "checkpoint's values (see its model.yaml or config.yaml)")
  changed = [f"{name}: checkpoint {getattr(ckpt_cfg, name)!r} -> run {getattr(model_cfg, name)!r}"
             for name in FUNCTION_FIELDS if getattr(model_cfg, name) != getattr(ckpt_cfg, name)]
  if changed:
    log.warning("init_from %s: the run changes what the backbone computes (%s); intended for "
                "context extension, otherwise match the checkpoint", source, "; ".join(changed))


def _taken_parts(ckpt_plan: layout.Layout, run_plan: layout.Layout, model_cfg: ModelConfig,
                 source: pathlib.Path) -> set[Path]:
  """The run's unrolled parameters to take from the checkpoint, after checking their shapes."""
  backbone = {path for path, _ in hf_key_map(model_cfg).values()}
  taken = set()
  for part, want in run_plan.unrolled.items():
    have = ckpt_plan.unrolled.get(part)
    if have is None:
      if part in backbone:
        raise WarmStartError(f"train.init_from={source}: the checkpoint has no params/"
                             f"{'/'.join(part)}, a backbone parameter of this run's model")
      continue
    if tuple(have.shape) != tuple(want.shape):
      kind = "backbone" if part in backbone else "memory"
      hint = ("" if part in backbone else "; the memory settings (num_slots, memory_heads, ...) must "
              "match the checkpoint's, or start from a checkpoint without memory")
      raise WarmStartError(f"train.init_from={source}: {kind} parameter params/{'/'.join(part)} has "
                           f"shape {list(have.shape)} in the checkpoint, {list(want.shape)} in this "
                           f"run{hint}")
    taken.add(part)
  dropped = sorted(set(ckpt_plan.unrolled) - set(run_plan.unrolled))
  if dropped:
    log.info("init_from %s: %d checkpoint parameter tensors unused by this run (e.g. params/%s)",
             source, len(dropped), "/".join(dropped[0]))
  return taken
