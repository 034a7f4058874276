"""TPU chips and slice names for ahead-of-time compilation (`python -m lm2_jax.aot`).

`resolve(name)` turns a Cloud TPU accelerator type (`v5e-256`, `v5p-128`, `v4-128`) or an explicit
topology (`v5e:16x16`, `v4:4x4x4`) into the `jax.experimental.topologies` arguments and the chip's
figures. Accelerator types count chips for v5e (`v5e-256` = 256 chips) and TensorCores for v4 and v5p
(`v5p-128` = 64 chips), as Cloud TPU names them. v4 is compiled as megacore (one device per chip), as JAX
runs it on a v4 slice.

`h100-8` (8 GPUs a host; `h100-16` = 2 hosts) compiles for NVIDIA H100s without a GPU. It needs the CUDA
plugin (`pip install jax-cuda12-plugin==0.12.0.1 jax-cuda12-pjrt==0.12.0.1`, ~0.5 GB, not a project
dependency) and describes the GPU to XLA with `H100_TARGET_CONFIG`.
"""

from __future__ import annotations

import dataclasses
import math
import re

GIB = 1024**3


@dataclasses.dataclass(frozen=True)
class Chip:
  """One TPU chip's figures used by the roofline estimate.

  Attributes:
    name: the generation (`v4`, `v5e`, `v5p`).
    peak_flops: peak dense bf16 FLOP/s.
    hbm_bytes: HBM capacity in bytes.
    hbm_bandwidth: HBM bandwidth in bytes/s.
    ici_bandwidth: inter-chip interconnect bandwidth per chip in bytes/s, both directions of all links.
    source: where the figures come from.
  """

  name: str
  peak_flops: float
  hbm_bytes: float
  hbm_bandwidth: float
  ici_bandwidth: float
  source: str


CHIPS = {
    "v4": Chip("v4", 275e12, 32 * GIB, 1200e9, 600e9,
               "cloud.google.com/tpu/docs/v4 (275 TFLOP/s, 32 GiB, 1200 GB/s); ICI: 6 links x 50 GB/s "
               "each way (TPU v4 paper, Jouppi et al. ISCA 2023, as summarised at "
               "glennklockwood.com/garden/processors/TPUv4)"),
    "v5e": Chip("v5e", 197e12, 16 * GIB, 819e9, 400e9,
                "cloud.google.com/tpu/docs/v5e (197 TFLOP/s bf16, 16 GiB, 819 GB/s, ICI 400 GB/s "
                "bidirectional per chip)"),
    "v5p": Chip("v5p", 459e12, 95 * GIB, 2765e9, 1200e9,
                "cloud.google.com/tpu/docs/v5p (459 TFLOP/s bf16, 95 GiB, 2765 GB/s, ICI 1200 GB/s "
                "bidirectional per chip)"),
}

GPUS = {
    "h100": Chip("h100", 989e12, 80e9, 3.35e12, 900e9,
                 "nvidia.com H100 SXM5 datasheet (989 TFLOP/s dense bf16, 80 GB HBM3, 3.35 TB/s, NVLink "
                 "900 GB/s bidirectional per GPU)"),
}

# XLA's description of an H100 SXM5 (stream_executor.GpuTargetConfigProto, text format), from its public
# specifications: 132 SMs of 228 KiB shared memory, 50 MiB L2, 1.98 GHz, compute capability 9.0.
H100_TARGET_CONFIG = """
gpu_device_info {
  threads_per_block_limit: 1024  threads_per_warp: 32  shared_memory_per_block: 49152
  shared_memory_per_core: 233472  shared_memory_per_block_optin: 232448  threads_per_core_limit: 2048
  core_count: 132  fpus_per_core: 128  block_dim_limit_x: 2147483647  block_dim_limit_y: 65535
  block_dim_limit_z: 65535  memory_bandwidth: 3352320000000  l2_cache_size: 52428800
  clock_rate_ghz: 1.98  device_memory_size: 84942979072  cuda_compute_capability { major: 9 }
  registers_per_core_limit: 65536  registers_per_block_limit: 65536
}
platform_name: "CUDA"
device_description_str: "NVIDIA H100 80GB HBM3"
"""

# Chips -> 2D torus shape (v5e) and chips -> 3D shape (v4, v5p), the shapes Cloud TPU offers.
_SHAPES_2D = {1: "1x1", 4: "2x2", 8: "2x4", 16: "4x4", 32: "4x8", 64: "8x8", 128: "8x16", 256: "16x16"}
_SHAPES_3D = {4: "2x2x1", 8: "2x2x2", 16: "2x2x4", 32: "2x4x4", 64: "4x4x4", 128: "4x4x8", 256: "4x8x8",
              512: "8x8x8", 1024: "8x8x16", 2048: "8x16x16", 4096: "16x16x16"}
_CORES_PER_CHIP = {"v4": 2, "v5e": 1, "v5p": 2}


class TopologyError(ValueError):
  """A slice name this tool cannot compile for; the message lists the valid ones."""


@dataclasses.dataclass(frozen=True)
class Slice:
  """A resolved slice.

  Attributes:
    name: as given. topology: `get_topology_desc`'s topology_name. chips: chips in the slice.
    chip: the chip's figures. kwargs: extra `get_topology_desc` arguments.
  """

  name: str
  topology: str
  chips: int
  chip: Chip
  kwargs: dict
  platform: str = "tpu"


def valid_names() -> list[str]:
  """The accelerator types `resolve` accepts (explicit `gen:AxB[xC]` topologies are accepted too)."""
  names = [f"v5e-{n}" for n in _SHAPES_2D]
  for gen in ("v4", "v5p"):
    names += [f"{gen}-{n * _CORES_PER_CHIP[gen]}" for n in _SHAPES_3D]
  return names + ["h100-8 (h100-N: N = 1, 2, 4 or a multiple of 8)"]


def _error(name: str, why: str) -> TopologyError:
  return TopologyError(f"topology {name!r}: {why}. Valid names: {', '.join(valid_names())}; or an "
                       "explicit topology such as v5e:4x4, v5p:2x2x2, v4:4x4x4")


def resolve(name: str) -> Slice:
  """Parses `v5e-256` / `v5p-128` / `v4-128` or `v5e:16x16` / `v4:4x4x4`; raises TopologyError."""
  match = re.fullmatch(r"h100-(\d+)", name)
  if match:
    gpus = int(match.group(1))
    if gpus not in (1, 2, 4) and (gpus < 8 or gpus % 8):
      raise _error(name, "H100 hosts hold 8 GPUs: use 1, 2, 4 or a multiple of 8")
    hosts = max(gpus // 8, 1)
    return Slice(name=name, topology="h100", chips=gpus, chip=GPUS["h100"], platform="cuda",
                 kwargs={"target_config": H100_TARGET_CONFIG, "topology": f"1x{hosts}x{gpus // hosts}"})
  match = re.fullmatch(r"(v4|v5e|v5p)-(\d+)", name)
  if match:
    gen, count = match.group(1), int(match.group(2))
    cores = _CORES_PER_CHIP[gen]
    shapes = _SHAPES_2D if gen == "v5e" else _SHAPES_3D
    if count % cores or count // cores not in shapes:
      raise _error(name, f"no {gen} slice has {count} {'chips' if cores == 1 else 'TensorCores'}")
    chips = count // cores
    topology = f"{gen}:{shapes[chips]}"
  else:
    match = re.fullmatch(r"(v4|v5e|v5p):(\d+(?:x\d+){1,2})", name)
    if not match:
      raise _error(name, "unknown name")
    gen, dims = match.group(1), match.group(2)
    if len(dims.split("x")) != (2 if gen == "v5e" else 3):
      raise _error(name, f"{gen} topologies are {'AxB' if gen == 'v5e' else 'AxBxC'}")
    chips = math.prod(int(d) for d in dims.split("x"))
    topology = name
  kwargs = {"chip_config_name": "megacore"} if gen == "v4" else {}
  return Slice(name=name, topology=topology, chips=chips, chip=CHIPS[gen], kwargs=kwargs)


def chip_table() -> str:
  """The chip figures as a Markdown table (for the report and docs/sizing.md)."""
  rows = ["| chip | peak bf16 TFLOP/s | HBM GiB | HBM GB/s | ICI (NVLink) GB/s per chip, bidirectional "
          "| source |",
          "|---|---|---|---|---|---|"]
  for c in [*CHIPS.values(), *GPUS.values()]:
    rows.append(f"| {c.name} | {c.peak_flops / 1e12:.0f} | {c.hbm_bytes / GIB:.0f} | "
                f"{c.hbm_bandwidth / 1e9:.0f} | {c.ici_bandwidth / 1e9:.0f} | {c.source} |")
  return "\n".join(rows)
