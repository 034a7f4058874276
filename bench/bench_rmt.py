"""Train-step time of RMT against LM2 on the same backbone, measured side by side, with their FLOP ratio.

    python bench/bench_rmt.py [--model configs/model/small.yaml] [--batch 8] [--segments 4] [--steps 5]
        [key=value ...]

The model file (plus `key=value` ModelConfig overrides) is the LM2; its RMT twin is the same backbone with
`memory_kind: rmt`, `num_slots` memory tokens and a learned memory init; its Llama twin has no memory.
The trainer's compiled steps (`bench_train.best_step_times`) of the three are timed alternately in one
process, best of three rounds; the ratios are the figures to read on a shared machine. Each step time sits
beside its model FLOPs per token (`lm2_jax.model.flops`), so a time ratio can be read against the work
ratio.
"""

from __future__ import annotations

import os
import sys

import absl.flags
import jax

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from bench.bench_train import arg_parser, best_step_times  # noqa: E402
from lm2_jax.model import ModelConfig, model_flops_per_token  # noqa: E402
from lm2_jax.train.config import apply_overrides  # noqa: E402


def twins(model_path: str, overrides: dict) -> dict[str, ModelConfig]:
  """LM2 (the file), RMT and the memory-less Llama on the same backbone."""
  lm2 = ModelConfig.from_yaml(model_path, **{"use_memory": True, **overrides})
  if lm2.memory_kind != "lm2":
    raise ValueError(f"{model_path}: give the LM2 config (memory_kind: lm2); its RMT twin is derived")
  rmt = lm2.replace(memory_kind="rmt", memory_init="learned", memory_flow="chained", memory_layers=None)
  return {"LM2": lm2, "RMT": rmt, "Llama": lm2.replace(use_memory=False)}


def measure(configs: dict[str, ModelConfig], batch: int, segments: int, steps: int,
            rounds: int = 3) -> dict:
  """Best seconds per train step and training FLOPs per token of each config."""
  best = best_step_times(configs, batch, segments, steps, rounds)
  return {name: {"step_s": best[name],
                 "flops_per_token": model_flops_per_token(cfg, segments * cfg.segment_length)}
          for name, cfg in configs.items()}


def main(argv=None):
  parser = arg_parser(__doc__.splitlines()[0])
  parser.add_argument("overrides", nargs="*", help="ModelConfig key=value overrides of the LM2")
  args = parser.parse_args(argv)
  absl.flags.FLAGS.mark_as_parsed()
  configs = twins(args.model, apply_overrides({}, args.overrides))
  r = measure(configs, args.batch, args.segments, args.steps)
  lm2 = configs["LM2"]
  print(f"{args.model} {' '.join(args.overrides)}: batch {args.batch} x {args.segments} segments of "
        f"{lm2.segment_length}, {lm2.num_slots} slots / memory tokens, {jax.device_count()} device(s) "
        f"({jax.devices()[0].platform})")
  for name, m in r.items():
    print(f"  {name:<6} {m['step_s'] * 1e3:8.1f} ms/step  {m['flops_per_token'] / 1e6:8.2f} MFLOP/token  "
          f"time {m['step_s'] / r['LM2']['step_s']:.2f}x LM2, FLOPs "
          f"{m['flops_per_token'] / r['LM2']['flops_per_token']:.2f}x LM2")
  print(f"  RMT / LM2 step time: {r['RMT']['step_s'] / r['LM2']['step_s']:.2f} "
        f"(FLOP ratio {r['RMT']['flops_per_token'] / r['LM2']['flops_per_token']:.2f})")


if __name__ == "__main__":
  main()
