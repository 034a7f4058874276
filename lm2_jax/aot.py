"""Compile the trainer's train step for a TPU slice on a CPU host, ahead of time, and size it.

    python -m lm2_jax.aot --topology v5e-256 --config configs/experiment/X.yaml [key=value ...]

The step is the trainer's own: the run config's model, optimizer, mesh rules, state shardings, remat,
micro-batching and donation, through the functions `train.loop` calls (`state.abstract_state`,
`step.make_train_step`, `step.lower_train_step`), over the devices of
`jax.experimental.topologies.get_topology_desc` (needs `libtpu`; nothing runs). The mesh is built the way a
pod run builds it (`jax.make_mesh` over the slice's devices), and each process of a multi-host slice reads
global batch / processes rows, as `train.inputs` does; a mesh that puts rows on a process that does not
read them is refused.

Reported per chip: memory (arguments, outputs, temporaries) against HBM with a fit verdict (XLA refuses
to compile a step whose temporaries exceed HBM; its figure is reported), FLOPs per step (compiled
`cost_analysis()` times the loop trip factor of `aot_hlo`) next to `model_flops_per_token`, the
collectives of the optimised program, and a roofline step time and MFU from the chip's figures
(`aot_chips`). Exit status: 0 fits, 1 does not fit, 2 bad topology, mesh or config.
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import gzip
import json
import math
import os
import re
import sys
import time

import jax
import numpy as np

from lm2_jax import aot_chips, aot_hlo
from lm2_jax.aot_report import format_report
from lm2_jax.train import config as config_lib
from lm2_jax.train import mesh as mesh_lib
from lm2_jax.train.config import ConfigError, RunConfig

GIB = aot_chips.GIB


@contextlib.contextmanager
def _quiet_stderr():
  """Silences file descriptor 2 (libtpu prints host-detection warnings while it loads)."""
  sys.stderr.flush()
  saved, null = os.dup(2), os.open(os.devnull, os.O_WRONLY)
  os.dup2(null, 2)
  try:
    yield
  finally:
    os.dup2(saved, 2)
    os.close(saved)
    os.close(null)


def slice_devices(target: aot_chips.Slice) -> list:
  """The compile-only devices of a slice (libtpu or the CUDA plugin is loaded here, once per process)."""
  os.environ.setdefault("ALLOW_MULTIPLE_LIBTPU_LOAD", "1")  # other jax processes may hold its lock file
  from jax.experimental import topologies  # pylint: disable=g-import-not-at-top

  with _quiet_stderr():
    return list(topologies.get_topology_desc(topology_name=target.topology, platform=target.platform,
                                             **target.kwargs).devices)


def _mesh_error(n: int, why: str) -> ConfigError:
  divisors = [d for d in range(1, n + 1) if n % d == 0]
  return ConfigError(f"{why}. Valid meshes for {n} chips: data * fsdp * tensor = {n} (one axis may be "
                     f"-1), each axis one of {divisors}; e.g. mesh.data=1 mesh.fsdp=-1 "
                     f"mesh.tensor=<one of {[d for d in divisors if d <= 16]}>")


@dataclasses.dataclass
class Plan:
  """A run config laid out on a slice, checked, before compiling.

  Attributes:
    cfg, target, mesh: the run config, the slice, the (data, fsdp, tensor) mesh over its devices.
    processes: hosts of the slice. rows_per_process: global batch / processes (what each reads).
    rows_per_chip: rows of one micro-batch on one chip.
  """

  cfg: RunConfig
  target: aot_chips.Slice
  mesh: jax.sharding.Mesh
  processes: int
  rows_per_process: int
  rows_per_chip: int


def plan(cfg: RunConfig, target: aot_chips.Slice, devices: list) -> Plan:
  """Builds the mesh and checks the batch layout; raises ConfigError naming the valid choices."""
  if cfg.mesh.num_devices:
    devices = devices[:cfg.mesh.num_devices]
  n = len(devices)
  try:
    shape = mesh_lib.mesh_shape(cfg.mesh, n)
  except ConfigError as e:
    raise _mesh_error(n, str(e)) from e
  try:  # as train.mesh.make_mesh builds it on the pod (jax.make_mesh over all devices)
    mesh = _make_mesh(shape, devices)
  except (NotImplementedError, ValueError) as e:
    raise _mesh_error(n, f"mesh (data, fsdp, tensor) = {shape} does not map onto the "
                      f"{target.topology} torus (each axis must be a product of physical axis sizes: "
                      f"{str(e).splitlines()[0][:160]})") from e
  shards, micro, batch = shape[0] * shape[1], cfg.train.micro_batches, cfg.train.batch_size
  if batch % (shards * micro):
    raise ConfigError(f"train.batch_size={batch} must be divisible by data*fsdp ({shards}) * "
                      f"train.micro_batches ({micro}); e.g. train.batch_size={shards * micro}")
  processes = len({d.process_index for d in devices})
  if batch % processes:
    raise ConfigError(f"train.batch_size={batch} must be divisible by the slice's {processes} processes "
                      "(each process reads batch / processes rows)")
  per_process = batch // processes
  wrong = _rows_off_host(mesh, batch, per_process)
  if wrong:
    process, held = wrong
    ok = [t for t in range(1, n + 1) if n % t == 0 and batch % (n // t * micro) == 0 and
          _keeps_rows((1, n // t, t), devices, batch, per_process)]
    raise ConfigError(
        f"mesh {dict(mesh.shape)} on {target.topology}: process {process}'s chips hold {held} rows of "
        f"the batch but it reads batch / processes = {per_process} (train.inputs): jax.make_mesh lays "
        f"the tensor axis across hosts. Tensor sizes (fsdp=-1) that keep each process's rows on its own "
        f"chips with train.batch_size={batch} and train.micro_batches={micro}: {ok}")
  return Plan(cfg, target, mesh, processes, per_process, batch // shards // micro)


def _make_mesh(shape, devices) -> jax.sharding.Mesh:
  return jax.make_mesh(shape, mesh_lib.MESH_AXES, axis_types=(jax.sharding.AxisType.Auto,) * 3,
                       devices=devices)


def _keeps_rows(shape, devices, batch: int, per_process: int) -> bool:
  try:
    return _rows_off_host(_make_mesh(shape, devices), batch, per_process) is None
  except (NotImplementedError, ValueError):
    return False


def _rows_off_host(mesh, batch: int, per_process: int) -> tuple[int, int] | None:
  """(a process, the rows its chips hold) when that is not the `per_process` rows it reads, else None."""
  rows = {}
  for device, index in mesh_lib.batch_sharding(mesh).devices_indices_map((batch, 1)).items():
    rows.setdefault(device.process_index, set()).update(range(*index[0].indices(batch)))
  return next(((p, len(r)) for p, r in sorted(rows.items()) if len(r) != per_process), None)


def _oom_bytes(message: str) -> float:
  """The temporaries XLA asked for in a CompileTimeHbmOom error ('... temporaries (100.62G) ...')."""
  match = re.search(r"temporaries \(([\d.]+)([KMGT]?)\)", message)
  if not match:
    return float("nan")
  return float(match.group(1)) * 1024**" KMGT".index(match.group(2) or " ")


def _memory_share(plan_: Plan, abstract, model_cfg) -> dict:
  """Per-chip bytes of the memory module: its parameters with their AdamW moments and gradient, the
  carry, and an estimate of the carries the backward pass keeps (one per segment and memory block)."""
  state_bytes = 0.0
  for path, leaf in jax.tree_util.tree_leaves_with_path(abstract):
    keys = {getattr(k, "key", getattr(k, "name", None)) for k in path}
    if keys & {"memory", "memory_init"}:
      state_bytes += math.prod(leaf.sharding.shard_shape(leaf.shape)) * leaf.dtype.itemsize
  params_bytes = state_bytes / 3  # params, mu, nu (float32 each)
  if not model_cfg.use_memory:
    return {"state": 0.0, "gradient": 0.0, "carry": 0.0, "saved_carries": 0.0}
  per_block = model_cfg.memory_flow == "per_block"
  carry = plan_.rows_per_chip * model_cfg.num_slots * model_cfg.d_model * 4 * \
      (model_cfg.num_memory_layers if per_block else 1)
  # Kept per segment: the segment scan's carry, and the bank at each memory block (chained: the chain
  # carried through the layer scan; per_block: each block's bank, one carry's worth in all).
  saved = carry * plan_.cfg.data.num_segments * (2 if per_block else model_cfg.num_memory_layers + 1)
  return {"state": state_bytes, "gradient": params_bytes, "carry": carry, "saved_carries": saved}


def compile_plan(plan_: Plan, hbm_limit: float | None = None, save_hlo: str = "") -> dict:
  """Lowers and compiles the trainer's step for the plan; returns the report as a dict (bytes, FLOPs,
  seconds). `save_hlo`: a directory to write the lowered and optimised HLO texts to (gzipped)."""
  from lm2_jax.model import LM2, model_flops_per_token  # pylint: disable=g-import-not-at-top
  from lm2_jax.train import optimizer as opt_lib  # pylint: disable=g-import-not-at-top
  from lm2_jax.train import state as state_lib  # pylint: disable=g-import-not-at-top
  from lm2_jax.train import step as step_lib  # pylint: disable=g-import-not-at-top

  cfg, mesh, chip = plan_.cfg, plan_.mesh, plan_.target.chip
  # Compiled for an accelerator topology from this CPU host: the CPU attention kernel never applies.
  model_cfg = dataclasses.replace(cfg.model_config(), attention_kernel="xla")
  model = LM2(model_cfg)
  seq_len = cfg.data.num_segments * model_cfg.segment_length
  tx, schedule = opt_lib.make_optimizer(cfg.train), opt_lib.make_schedule(cfg.train)
  init_shape = (mesh.shape["data"] * mesh.shape["fsdp"], seq_len)  # as train.loop
  abstract, shardings = state_lib.abstract_state(model, tx, mesh, init_shape, cfg.train.seed)
  batch = step_lib.abstract_batch(cfg.train.batch_size, seq_len, cfg.data.num_segments, mesh,
                                  bound=cfg.data.bind)
  t0 = time.perf_counter()
  lowered = step_lib.lower_train_step(
      step_lib.make_train_step(model, tx, schedule, cfg.train.micro_batches, mesh,
                               memory_aux_weight=cfg.train.memory_aux_weight),
      shardings, abstract, batch, mesh)
  lowered_text = lowered.as_text(dialect="hlo")
  lowered_hlo = aot_hlo.analyze(lowered_text)
  _save(save_hlo, "lowered.hlo.gz", lowered_text)
  t1 = time.perf_counter()
  limit = hbm_limit or chip.hbm_bytes
  options = {}
  if hbm_limit and plan_.target.platform == "tpu":
    options = {"xla_tpu_max_hbm_size_mib": str(int(hbm_limit / 2**20))}
  chips = mesh.devices.size
  tokens = cfg.train.batch_size * seq_len
  report = {
      "topology": plan_.target.name, "tpu_topology": plan_.target.topology, "chip": chip.name,
      "chips": chips, "processes": plan_.processes, "mesh": dict(mesh.shape),
      "batch": cfg.train.batch_size, "rows_per_process": plan_.rows_per_process,
      "rows_per_chip": plan_.rows_per_chip, "micro_batches": cfg.train.micro_batches,
      "segments": cfg.data.num_segments, "segment_length": model_cfg.segment_length,
      "seq_len": seq_len, "tokens_per_step": tokens, "remat": model_cfg.remat,
      "bptt_segments": model_cfg.bptt_segments, "use_memory": model_cfg.use_memory,
      "params": sum(math.prod(x.shape) for x in jax.tree.leaves(abstract.params)),
      "hbm_limit": limit, "hbm_chip": chip.hbm_bytes, "lower_s": t1 - t0,
      "memory_share": _memory_share(plan_, abstract, model_cfg),
      "model_flops": model_flops_per_token(model_cfg, seq_len) * tokens,
      "matmul_flops": lowered_hlo.dot_flops, "trip_factor": lowered_hlo.trip_factor,
      "loops": lowered_hlo.loops, "unknown_loops": lowered_hlo.unknown_loops,
  }
  saved_cache = jax.config.jax_enable_compilation_cache
  try:
    # A compile-only executable cannot be read back from jax's persistent cache: do not write it there.
    jax.config.update("jax_enable_compilation_cache", False)
    compiled = lowered.compile(compiler_options=options)
  except jax.errors.JaxRuntimeError as e:
    # XLA refuses a step whose buffers exceed HBM, or a fusion whose scratch exceeds on-chip VMEM.
    if "CompileTimeHbmOom" not in str(e) and "CompileTimeScopedVmemOom" not in str(e):
      raise
    args = sum(math.prod(x.sharding.shard_shape(x.shape)) * x.dtype.itemsize
               for x in jax.tree.leaves((abstract, batch)))
    message = " ".join(str(e).split("\n")[:2])
    report.update(compile_s=time.perf_counter() - t1, oom=message[:400], fits=False,
                  memory={"arguments": args, "temporaries": _oom_bytes(str(e)),
                          "total": args + _oom_bytes(str(e))})
    return report
  finally:
    jax.config.update("jax_enable_compilation_cache", saved_cache)
  report["compile_s"] = time.perf_counter() - t1
  mem = compiled.memory_analysis()
  memory = {"arguments": mem.argument_size_in_bytes, "outputs": mem.output_size_in_bytes,
            "aliased": mem.alias_size_in_bytes, "temporaries": mem.temp_size_in_bytes,
            "code": mem.generated_code_size_in_bytes}
  memory["total"] = (memory["arguments"] + memory["outputs"] - memory["aliased"] +
                     memory["temporaries"] + memory["code"])
  cost = compiled.cost_analysis() or {}  # None for a GPU compiled without one
  optimized_text = compiled.as_text()
  optimized = aot_hlo.analyze(optimized_text, devices=chips)
  _save(save_hlo, "optimized.hlo.gz", optimized_text)
  factor = lowered_hlo.trip_factor
  flops_chip = cost.get("flops", 0.0) * factor or lowered_hlo.dot_flops / chips
  # XLA's byte count, scaled to a step by the trip counts the same way (traffic read from the optimised
  # program, aot_hlo); without a cost analysis, that traffic itself.
  bytes_factor = optimized.hbm_bytes / optimized.hbm_bytes_once if optimized.hbm_bytes_once else 1.0
  bytes_chip = cost.get("bytes accessed", 0.0) * bytes_factor or optimized.hbm_bytes
  wire = sum(c.wire_bytes for c in optimized.collectives.values())
  times = {"compute": flops_chip / chip.peak_flops, "hbm": bytes_chip / chip.hbm_bandwidth,
           "ici": wire / chip.ici_bandwidth}
  report.update(
      fits=memory["total"] <= chip.hbm_bytes, memory=memory,
      cost_flops_per_chip=cost.get("flops", 0.0), cost_bytes_per_chip=cost.get("bytes accessed", 0.0),
      flops_per_chip=flops_chip, flops=flops_chip * chips, bytes_per_chip=bytes_chip,
      bytes_factor=bytes_factor, traffic_per_chip=optimized.hbm_bytes,
      traffic_once_per_chip=optimized.hbm_bytes_once,
      collectives=[dataclasses.asdict(c) for c in optimized.collectives.values()],
      times=times, step_s=max(times.values()), step_s_serial=sum(times.values()))
  peak_total = chips * chip.peak_flops
  report["mfu"] = report["model_flops"] / report["step_s"] / peak_total
  report["mfu_serial"] = report["model_flops"] / report["step_s_serial"] / peak_total
  return report


def _save(directory: str, name: str, text: str) -> None:
  if directory:
    os.makedirs(directory, exist_ok=True)
    with gzip.open(os.path.join(directory, name), "wt") as f:
      f.write(text)


def main(argv: list[str] | None = None) -> int:
  parser = argparse.ArgumentParser(prog="python -m lm2_jax.aot", description=__doc__.split("\n")[0])
  parser.add_argument("--topology", required=True,
                      help="v5e-256, v5p-128, v4-128, ... or an explicit v5e:16x16 / v4:4x4x4")
  parser.add_argument("--config", required=True, help="experiment YAML (configs/experiment/*.yaml)")
  parser.add_argument("overrides", nargs="*", help="dotted key=value overrides, as train.py takes")
  parser.add_argument("--hbm-limit-gib", type=float, default=None,
                      help="compile against this much HBM instead of the chip's (to see the full "
                      "figures of a step that does not fit)")
  parser.add_argument("--json", default="", help="also write the report to this JSON file")
  parser.add_argument("--save-hlo", default="", help="write the lowered and optimised HLO to this directory")
  args = parser.parse_args(argv)
  if not os.environ.get("JAX_PLATFORMS"):
    jax.config.update("jax_platforms", "cpu")  # the host runs nothing; do not probe for accelerators
  try:
    target = aot_chips.resolve(args.topology)
    cfg = config_lib.load_config(args.config, args.overrides)
    plan_ = plan(cfg, target, slice_devices(target))
  except (aot_chips.TopologyError, ConfigError) as e:
    print(f"error: {e}", file=sys.stderr)
    return 2
  report = compile_plan(plan_, args.hbm_limit_gib * GIB if args.hbm_limit_gib else None, args.save_hlo)
  print(format_report(report))
  if args.json:
    with open(args.json, "w") as f:
      json.dump(report, f, indent=1, default=lambda x: float(np.asarray(x)))
  return 0 if report["fits"] else 1


if __name__ == "__main__":
  sys.exit(main())
