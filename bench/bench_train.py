"""Train-step throughput and MFU of a model config with and without memory, measured side by side.

    python bench/bench_train.py [--model configs/model/small.yaml] [--batch 8] [--segments 4] [key=value ...]
    python bench/bench_train.py --model configs/model/lm2-300m.yaml --peak-tflops 989 dtype=bfloat16   # a GPU
    python bench/bench_train.py --profile /tmp/prof [--memory on|off] [key=value ...]   # where time goes

Builds the trainer's own compiled step (jit with shardings, donated state, AdamW) for the config and for
its `use_memory=false` twin, times them alternately in one process, and prints tokens/s, MFU (model FLOPs
from `model_flops_per_token` over the matmul peak measured on this host at start-up) and the memory's cost
as a ratio next to its FLOP ratio. Absolute times drift on a shared machine; the ratio is the figure to
read.

`--profile DIR` instead traces three steps of one config with the JAX profiler (a Perfetto trace under
DIR) and prints the time of XLA's ops summed by what they compute, read from each op's metadata in the
compiled HLO: the model part (attention, mlp, memory, logits + cross-entropy, norms, embedding, the
optimizer, or none: the scan's own copies of stacked activations), the kind (matmul, copy/transpose,
other elementwise or reduce) and the pass (forward, backward). docs/profile.md is its record.
"""

from __future__ import annotations

import argparse
import collections
import glob
import gzip
import json
import os
import re
import sys
import time

import absl.flags
import jax
import numpy as np
import yaml

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from lm2_jax.model import LM2, ModelConfig, model_flops_per_token  # noqa: E402
from lm2_jax.train import config as config_lib  # noqa: E402
from lm2_jax.train import mesh as mesh_lib  # noqa: E402
from lm2_jax.train import metrics as metrics_lib  # noqa: E402
from lm2_jax.train import optimizer as opt_lib  # noqa: E402
from lm2_jax.train import state as state_lib  # noqa: E402
from lm2_jax.train import step as step_lib  # noqa: E402


def compiled_step(model_cfg: ModelConfig, batch: int, segments: int):
  """(state, compiled train step, device batch) of the trainer for `model_cfg` on all local devices."""
  model = LM2(model_cfg)
  mesh = mesh_lib.make_mesh(config_lib.MeshConfig())
  train_cfg = config_lib.TrainConfig(learning_rate=1e-4, warmup_steps=1)
  tx, schedule = opt_lib.make_optimizer(train_cfg), opt_lib.make_schedule(train_cfg)
  seq_len = segments * model_cfg.segment_length
  abstract, shardings = state_lib.abstract_state(model, tx, mesh, (1, seq_len), 0)
  state, _ = state_lib.init_state(model, tx, mesh, (1, seq_len), 0)
  spec = step_lib.abstract_batch(batch, seq_len, segments, mesh)
  step = step_lib.compile_train_step(step_lib.make_train_step(model, tx, schedule, 1, mesh), shardings,
                                     abstract, spec, mesh)
  rng = np.random.default_rng(0)
  tokens = rng.integers(0, model_cfg.vocab_size, (batch, seq_len)).astype(np.int32)
  host = {"inputs": tokens, "targets": np.roll(tokens, -1, 1),
          "loss_mask": np.ones((batch, seq_len), np.float32), "valid": np.ones((batch, seq_len), bool),
          "resets": np.zeros((batch, segments), bool)}
  device_batch = {k: jax.device_put(v, spec[k].sharding) for k, v in host.items()}
  return state, step, device_batch


def time_steps(state, step, batch, steps: int):
  """(state, seconds per step) over `steps` steps after one warm-up step."""
  state, metrics = step(state, batch)
  jax.block_until_ready(metrics)
  start = time.perf_counter()
  for _ in range(steps):
    state, metrics = step(state, batch)
  jax.block_until_ready(metrics)
  return state, (time.perf_counter() - start) / steps


def best_step_times(configs: dict[str, ModelConfig], batch: int, segments: int, steps: int,
                    rounds: int) -> dict[str, float]:
  """Seconds per train step of each config: compiled once, timed alternately, best of `rounds` (so a
  load that comes and goes on a shared machine weighs on all of them alike)."""
  built = {name: compiled_step(cfg, batch, segments) for name, cfg in configs.items()}
  best = {name: float("inf") for name in configs}
  for _ in range(rounds):
    for name, (state, step, device_batch) in built.items():
      state, seconds = time_steps(state, step, device_batch, steps)
      built[name] = (state, step, device_batch)
      best[name] = min(best[name], seconds)
  return best


def measure(model_path: str, batch: int, segments: int, steps: int, rounds: int = 3,
            overrides: dict | None = None) -> dict:
  """Tokens/s and MFU of the config with and without memory, timed alternately, best of `rounds`.

  MFU is over the matmul peak measured here in the model's compute dtype (an [8192, 8192] product on an
  accelerator, [1024, 1024] on CPU)."""
  overrides = overrides or {}
  configs = {"with memory": ModelConfig.from_yaml(model_path, **overrides, use_memory=True),
             "without memory": ModelConfig.from_yaml(model_path, **overrides, use_memory=False)}
  size = 1024 if jax.devices()[0].platform == "cpu" else 8192
  peak = metrics_lib.total_peak_flops(metrics_lib.measure_peak_flops(
      size, dtype=configs["with memory"].compute_dtype))
  best = best_step_times(configs, batch, segments, steps, rounds)
  out = {"peak_flops": peak}
  for name, cfg in configs.items():
    seq_len = segments * cfg.segment_length
    tokens = batch * seq_len
    flops = model_flops_per_token(cfg, seq_len) * tokens
    out[name] = {"step_s": best[name], "tokens_per_s": tokens / best[name],
                 "mfu": flops / best[name] / peak}
  out["memory_cost"] = best["with memory"] / best["without memory"]
  seq_len = segments * configs["with memory"].segment_length
  out["flop_ratio"] = (model_flops_per_token(configs["with memory"], seq_len)
                       / model_flops_per_token(configs["without memory"], seq_len))
  return out


def arg_parser(description: str) -> argparse.ArgumentParser:
  """The options of the train-step benchmarks: model file, batch, segments, timed steps."""
  parser = argparse.ArgumentParser(description=description)
  parser.add_argument("--model", default="configs/model/small.yaml")
  parser.add_argument("--batch", type=int, default=8)
  parser.add_argument("--segments", type=int, default=4)
  parser.add_argument("--steps", type=int, default=5)
  return parser


PARTS = (("/attn/", "attention"), ("/mlp/", "mlp"), ("memory", "memory"), ("_logits", "logits+xent"),
         ("_loss_body", "logits+xent"), ("norm", "norms"), ("embed", "embedding"))


def _hlo_ops(hlo: str) -> dict:
  """Op name -> (category) for the compiled HLO text: part, kind and pass from the op's metadata."""
  bodies, current = {}, None
  for line in hlo.splitlines():
    if line and not line.startswith(" "):
      head = re.match(r"(?:ENTRY )?%(\S+) ", line)
      current = head.group(1) if head else None
      bodies[current] = []
    elif current:
      bodies[current].append(line)
  ops = {}
  for line in hlo.splitlines():
    # The shape is one token, or a tuple "(f32[..], f32[..])" (the attention kernel's custom call).
    m = re.match(r"\s+(?:ROOT )?%(\S+) = (?:\([^)]*\)|\S+) ([\w-]+)\(", line)
    if not m:
      continue
    name, opcode = m.groups()
    op_name = (re.search(r'op_name="([^"]*)"', line) or re.match("()", "")).group(1)
    called = re.search(r"calls=%([\w.-]+)", line)
    inner = {re.match(r"\s+(?:ROOT )?%\S+ = \S+ ([\w-]+)\(", l).group(1)
             for l in bodies.get(called.group(1) if called else "", []) if "=" in l and "%" in l
             and re.match(r"\s+(?:ROOT )?%\S+ = \S+ ([\w-]+)\(", l)} | {opcode}
    if "jvp(" not in op_name and "transpose(" not in op_name:
      part = "optimizer" if op_name else "scan copies"
    else:
      part = next((label for key, label in PARTS if key in op_name), "other")
    if "custom-call" in inner:
      kind = "fused kernel"  # the CPU attention kernel (lm2_jax/kernels)
    elif inner & {"dot", "convolution"}:
      kind = "matmul"
    elif inner <= {"copy", "bitcast", "transpose", "parameter", "dynamic-slice", "constant", "subtract",
                   "broadcast", "dynamic-update-slice", "fusion"}:
      kind = "copy/transpose"
    else:
      kind = "elementwise"
    ops[name] = (part, kind, "bwd" if "transpose(" in op_name else "fwd")
  return ops


def profile(model_cfg: ModelConfig, batch: int, segments: int, out_dir: str, steps: int = 3) -> list:
  """[(part, kind, pass, ms per step, share)] of the compiled train step, largest first."""
  state, step, device_batch = compiled_step(model_cfg, batch, segments)
  ops = _hlo_ops(step.as_text())
  state, _ = time_steps(state, step, device_batch, 2)
  jax.profiler.start_trace(out_dir, create_perfetto_trace=True)
  for _ in range(steps):
    state, metrics = step(state, device_batch)
  jax.block_until_ready(metrics)
  jax.profiler.stop_trace()
  trace = max(glob.glob(os.path.join(out_dir, "plugins/profile/*/perfetto_trace.json.gz")),
              key=os.path.getmtime)
  events = json.load(gzip.open(trace))["traceEvents"]
  threads = {(e["pid"], e["tid"]): e["args"]["name"] for e in events
             if e.get("ph") == "M" and e.get("name") == "thread_name"}
  totals = collections.Counter()
  for e in events:
    if e.get("ph") == "X" and "XLAEigen" in threads.get((e["pid"], e["tid"]), "") and e["name"] in ops:
      totals[ops[e["name"]]] += e["dur"] / 1e3 / steps
  whole = sum(totals.values())
  return [(*key, ms, ms / whole) for key, ms in totals.most_common()]


def main(argv=None):
  parser = arg_parser(__doc__.splitlines()[0])
  parser.add_argument("--profile", metavar="DIR", help="trace one config and print where its time goes")
  parser.add_argument("--memory", choices=("on", "off"), default="on", help="with --profile")
  parser.add_argument("--peak-tflops", type=float, help="also print MFU over this datasheet peak")
  parser.add_argument("overrides", nargs="*", help="model key=value (YAML values), e.g. dtype=bfloat16")
  args = parser.parse_args(argv)
  absl.flags.FLAGS.mark_as_parsed()
  overrides = {k: yaml.safe_load(v) for k, _, v in (o.partition("=") for o in args.overrides)}
  if args.profile:
    cfg = ModelConfig.from_yaml(args.model, **overrides, use_memory=args.memory == "on")
    seq_len = args.segments * cfg.segment_length
    print(f"{args.model} {overrides} memory {args.memory}, batch {args.batch} x {seq_len}: XLA op time "
          "per step, summed over threads")
    for part, kind, pass_, ms, share in profile(cfg, args.batch, args.segments, args.profile):
      if share >= 0.005:
        print(f"  {part:<12} {kind:<15} {pass_}  {ms:8.1f} ms  {share:6.1%}")
    return
  r = measure(args.model, args.batch, args.segments, args.steps, overrides=overrides)
  print(f"{args.model} {overrides}, batch {args.batch} x {args.segments} segments, {jax.device_count()} "
        f"device(s) ({jax.devices()[0].device_kind}); measured matmul peak {r['peak_flops'] / 1e9:.1f} "
        "GFLOP/s")
  for name in ("with memory", "without memory"):
    m = r[name]
    sheet = (f"  MFU {m['mfu'] * r['peak_flops'] / (args.peak_tflops * 1e12):.3f} of "
             f"{args.peak_tflops:g} TFLOP/s" if args.peak_tflops else "")
    print(f"  {name:<15} {m['step_s'] * 1e3:8.1f} ms/step {m['tokens_per_s']:10,.0f} tokens/s  "
          f"MFU {m['mfu']:.3f}{sheet}")
  print(f"  memory cost: {r['memory_cost']:.2f}x the memory-less step time, {r['flop_ratio']:.2f}x its "
        f"FLOPs ({r['memory_cost'] / r['flop_ratio']:.2f}x the FLOP share)")


if __name__ == "__main__":
  main()
