"""Compile time of the trainer's train step as depth and context grow.

    python bench/bench_compile.py [--model configs/model/small.yaml] [--batch 2] [--repeats 1]

Times tracing + lowering and XLA compilation (`bench_train`'s step: jit with shardings, donated state,
AdamW; abstract state, nothing allocated) of an LM2 at 4 and 32 layers, with `scan_layers` on and off
(4 segments), and at 2 and 64 segments (4 layers, `scan_layers` on), then prints the ratios. With
scanned layers and the scan over segments neither ratio should grow with the count: the program is the
same loop bodies with other trip counts. The last ratio is the compile cost of `unroll_segments` (4
segments as straight-line code against their scan). The persistent compilation cache is not used. Compile times
drift with the load of a shared host; `--repeats` takes the best of several.
"""

from __future__ import annotations

import argparse
import os
import sys
import time

import absl.flags
import jax

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from lm2_jax.model import LM2, ModelConfig  # noqa: E402
from lm2_jax.train import config as config_lib  # noqa: E402
from lm2_jax.train import mesh as mesh_lib  # noqa: E402
from lm2_jax.train import optimizer as opt_lib  # noqa: E402
from lm2_jax.train import state as state_lib  # noqa: E402
from lm2_jax.train import step as step_lib  # noqa: E402

# (name, overrides, segments): the pairs whose ratios are read. The scan cases pin `unroll_segments: 0`
# (small.yaml unrolls up to 8 segments); the last pair is what unrolling 4 segments costs in compile time.
SCAN = dict(unroll_segments=0)
CASES = (
    ("4 layers, scan_layers", dict(num_layers=4, scan_layers=True, **SCAN), 4),
    ("32 layers, scan_layers", dict(num_layers=32, scan_layers=True, **SCAN), 4),
    ("4 layers, unrolled", dict(num_layers=4, scan_layers=False, **SCAN), 4),
    ("32 layers, unrolled", dict(num_layers=32, scan_layers=False, **SCAN), 4),
    ("2 segments, scan_layers", dict(num_layers=4, scan_layers=True, **SCAN), 2),
    ("64 segments, scan_layers", dict(num_layers=4, scan_layers=True, **SCAN), 64),
    ("4 segments, segment scan", dict(num_layers=4, **SCAN), 4),
    ("4 segments, unrolled", dict(num_layers=4, unroll_segments=4), 4),
)
RATIOS = (("32 / 4 layers, scan_layers", 1, 0), ("32 / 4 layers, unrolled", 3, 2),
          ("64 / 2 segments, scan_layers", 5, 4), ("4 segments unrolled / scanned", 7, 6))


def compile_seconds(cfg: ModelConfig, batch: int, segments: int) -> tuple[float, float]:
  """(trace + lower seconds, XLA compile seconds) of the train step for `cfg`."""
  model = LM2(cfg)
  mesh = mesh_lib.make_mesh(config_lib.MeshConfig())
  train_cfg = config_lib.TrainConfig(learning_rate=1e-4, warmup_steps=1)
  tx, schedule = opt_lib.make_optimizer(train_cfg), opt_lib.make_schedule(train_cfg)
  seq_len = segments * cfg.segment_length
  start = time.perf_counter()
  abstract, shardings = state_lib.abstract_state(model, tx, mesh, (1, seq_len), 0)
  spec = step_lib.abstract_batch(batch, seq_len, segments, mesh)
  lowered = step_lib.lower_train_step(step_lib.make_train_step(model, tx, schedule, 1, mesh), shardings,
                                      abstract, spec, mesh)
  lowered_at = time.perf_counter()
  lowered.compile()
  return lowered_at - start, time.perf_counter() - lowered_at


def main(argv=None):
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("--model", default="configs/model/small.yaml")
  parser.add_argument("--batch", type=int, default=2)
  parser.add_argument("--repeats", type=int, default=1)
  args = parser.parse_args(argv)
  absl.flags.FLAGS.mark_as_parsed()
  jax.config.update("jax_enable_compilation_cache", False)
  best = [(float("inf"), float("inf"))] * len(CASES)
  for _ in range(args.repeats):
    for i, (name, overrides, segments) in enumerate(CASES):
      cfg = ModelConfig.from_yaml(args.model, **overrides)
      lower, comp = compile_seconds(cfg, args.batch, segments)
      best[i] = min(best[i], (lower, comp), key=sum)
      print(f"  {name:<26} trace+lower {lower:6.1f} s  compile {comp:6.1f} s", flush=True)
  print(f"{args.model} (memory {'on' if cfg.use_memory else 'off'}), batch {args.batch}, best of "
        f"{args.repeats}:")
  for name, i, j in RATIOS:
    total = sum(best[i]) / sum(best[j])
    print(f"  {name:<30} {total:5.2f}x  (compile alone {best[i][1] / best[j][1]:.2f}x)")


if __name__ == "__main__":
  main()
