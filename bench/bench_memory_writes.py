"""Step time of each memory write against the memory-less model, next to its FLOP share, side by side.

    python bench/bench_memory_writes.py [--batch 32] [--segments 4] [--steps 5] [--rounds 3]

Builds the trainer's compiled step (bench_train.compiled_step) for the default run's dims with no memory,
`memory_write: slots`, `keyed` and `delta`, times them alternately in one process (best of
`rounds`), and prints each write's step-time ratio to the memory-less step beside its FLOP ratio
(`model_flops_per_token`): a write that runs at the backbone's efficiency has the two equal. Absolute
times drift on a shared machine; read the ratios.
"""

from __future__ import annotations

import argparse
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from bench_train import compiled_step, time_steps  # noqa: E402
from lm2_jax.model import ModelConfig, model_flops_per_token  # noqa: E402

# The default run's model (configs/experiment/default.yaml), its `remat: full` included: the keyed and
# delta writes' token scans would stack small.yaml's `dots` residuals per token.
DIMS = dict(vocab_size=384, d_model=128, num_layers=4, num_heads=4, mlp_dim=384, segment_length=16,
            memory_flow="per_block", memory_norm=True, remat="full")
WRITES = {"none": dict(use_memory=False), "slots": dict(memory_write="slots"),
          "keyed": dict(memory_write="keyed", memory_init="zeros"),
          "delta": dict(memory_write="delta", memory_init="zeros", memory_norm=False)}


def main() -> None:
  parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  parser.add_argument("--batch", type=int, default=32)
  parser.add_argument("--segments", type=int, default=4)
  parser.add_argument("--steps", type=int, default=5)
  parser.add_argument("--rounds", type=int, default=3)
  args = parser.parse_args()
  configs = {n: ModelConfig.from_yaml("configs/model/small.yaml", **{**DIMS, **kw}) for n, kw in WRITES.items()}
  built = {n: compiled_step(cfg, args.batch, args.segments) for n, cfg in configs.items()}
  best = {n: float("inf") for n in configs}
  for _ in range(args.rounds):
    for name, (state, step, batch) in built.items():
      state, seconds = time_steps(state, step, batch, args.steps)
      built[name] = (state, step, batch)
      best[name] = min(best[name], seconds)
  seq = args.segments * DIMS["segment_length"]
  flops = {n: model_flops_per_token(cfg, seq) for n, cfg in configs.items()}
  print(f"{'write':8s} {'s/step':>8s} {'time ratio':>11s} {'FLOP ratio':>11s} {'cost / FLOP share':>18s}")
  for name in configs:
    t, f = best[name] / best["none"], flops[name] / flops["none"]
    print(f"{name:8s} {best[name]:8.3f} {t:11.2f} {f:11.2f} {t / f:18.2f}")


if __name__ == "__main__":
  main()
