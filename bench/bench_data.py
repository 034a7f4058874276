"""Data pipeline throughput next to the training step's consumption, measured in one run.

Builds a ~5 MB corpus of generated text in a temporary directory, packs it with the byte tokenizer, times
the pipeline (0 and 2 worker processes), times BABILong sample building at 4k and 64k tokens, and times the
trainer's compiled step of `configs/model/small.yaml` on the same row shape. The pipeline must out-run the
step by >= 10x so that it is never the bottleneck; the last line prints that ratio.

    python bench/bench_data.py [--megabytes 5] [--batch-size 32] [--segments 4] [--segment-len 256]
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
import time

import absl.flags
import numpy as np

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from bench import bench_train  # noqa: E402
from lm2_jax.data import babilong, corpora, packing, pipeline  # noqa: E402
from lm2_jax.data.tokenizers import ByteTokenizer  # noqa: E402
from lm2_jax.model import ModelConfig  # noqa: E402

_WORDS = ("the", "memory", "slot", "reads", "writes", "a", "token", "segment", "gate", "forgets", "mary",
          "went", "to", "kitchen", "garden", "john", "picked", "up", "football", "apple", "and", "then",
          "later")


def write_corpus(directory: str, megabytes: float, seed: int = 0) -> str:
  """Writes blank-line separated documents of random words, about `megabytes` MB, and returns the file."""
  rng = np.random.default_rng(seed)
  words = np.array(_WORDS)
  path = os.path.join(directory, "corpus.txt")
  written = 0
  with open(path, "w") as f:
    while written < megabytes * 1e6:
      doc = " ".join(words[rng.integers(0, len(words), rng.integers(20, 2000))]) + ".\n\n"
      f.write(doc)
      written += len(doc)
  return path


def measure_packing(path: str, cache_dir: str, num_segments: int, segment_len: int):
  """Seconds to read, tokenize and pack the corpus (then cached), and the packed corpus."""
  start = time.perf_counter()
  packed = packing.pack_corpus(corpora.CorpusConfig(paths=[path], txt_split="blank_lines"), ByteTokenizer(),
                               num_segments=num_segments, segment_len=segment_len, cache_dir=cache_dir)
  return time.perf_counter() - start, packed


def measure_pipeline(packed: packing.PackedCorpus, batch_size: int, worker_count: int,
                     seconds: float) -> dict:
  """Tokens/s of batches from the pipeline over `packed`, after a first batch (worker start excluded)."""
  it = pipeline.make_iterator(packed, batch_size=batch_size, seed=0, worker_count=worker_count)
  try:
    start = time.perf_counter()
    next(it)
    first = time.perf_counter() - start
    batches, start = 0, time.perf_counter()
    while time.perf_counter() - start < seconds:
      next(it)
      batches += 1
    elapsed = time.perf_counter() - start
  finally:
    it.close()
  tokens = batches * batch_size * packed.row_len
  return {"first_batch_s": first, "batches_per_s": batches / elapsed, "tokens_per_s": tokens / elapsed}


def measure_babilong(length: str, samples: int) -> float:
  """Samples/s of building qa1 BABILong samples of `length` with the byte tokenizer."""
  tokenizer = ByteTokenizer()
  start = time.perf_counter()
  for i in range(samples):
    babilong.build_sample("qa1", length, 0, i, tokenizer)
  return samples / (time.perf_counter() - start)


def measure_train_step(batch_size: int, segments: int, segment_len: int, steps: int = 3) -> float:
  """Tokens/s the trainer's compiled step of configs/model/small.yaml consumes at this row shape."""
  cfg = ModelConfig.from_yaml("configs/model/small.yaml", segment_length=segment_len)
  state, step, batch = bench_train.compiled_step(cfg, batch_size, segments)
  _, seconds = bench_train.time_steps(state, step, batch, steps)
  return batch_size * segments * segment_len / seconds


def main(argv=None):
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("--megabytes", type=float, default=5.0)
  parser.add_argument("--batch-size", type=int, default=32)
  parser.add_argument("--segments", type=int, default=4)
  parser.add_argument("--segment-len", type=int, default=256)
  parser.add_argument("--seconds", type=float, default=5.0, help="timing window per measurement")
  args = parser.parse_args(argv)
  absl.flags.FLAGS.mark_as_parsed()  # grain worker processes read absl flags
  rows = []
  with tempfile.TemporaryDirectory() as tmp:
    path = write_corpus(tmp, args.megabytes)
    pack_s, packed = measure_packing(path, os.path.join(tmp, "cache"), args.segments, args.segment_len)
    rows.append(("pack corpus (read+tokenize+pack)", f"{packed.stats.tokens / pack_s:,.0f} tokens/s",
                 f"{pack_s:.2f} s for {packed.stats.tokens:,} tokens, {len(packed):,} rows"))
    for workers in (0, 2):
      r = measure_pipeline(packed, args.batch_size, workers, args.seconds)
      rows.append((f"pipeline batches, {workers} workers", f"{r['tokens_per_s']:,.0f} tokens/s",
                   f"{r['batches_per_s']:.1f} batches/s of {args.batch_size}x{packed.row_len}; first batch "
                   f"{r['first_batch_s']:.2f} s"))
  for length, samples in (("4k", 40), ("64k", 4)):
    rate = measure_babilong(length, samples)
    rows.append((f"BABILong qa1 samples at {length}", f"{rate:,.1f} samples/s", "byte tokenizer"))
  train_rate = measure_train_step(args.batch_size, args.segments, args.segment_len)
  rows.append(("train step, configs/model/small.yaml", f"{train_rate:,.0f} tokens/s",
               f"batch {args.batch_size}x{args.segments * args.segment_len}"))
  pipeline_rate = float(rows[1][1].split()[0].replace(",", ""))
  width = max(len(r[0]) for r in rows)
  print(f"{'measurement':<{width}}  {'throughput':>22}  details")
  for name, value, details in rows:
    print(f"{name:<{width}}  {value:>22}  {details}")
  print(f"pipeline (0 workers) / train step throughput: {pipeline_rate / train_rate:,.0f}x")


if __name__ == "__main__":
  main()
