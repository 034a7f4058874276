"""Streaming cost against context length: time per token and peak memory at 1k ... 128k tokens.

Streams random contexts through `configs/model/small.yaml` (random init) with the evaluation code path
(`lm2_jax.eval.streaming.stream`: one jitted segment step per segment, memory as the carry), batch 1, in
one process, lengths in increasing order. For each length it reports:

- time per token (after a warm-up that compiles the segment step);
- the peak resident set of the process during that length (a sampling thread reads /proc/self/statm
  every 5 ms);
- the peak bytes of live JAX arrays (sampled every 16 segments).

Targets: time per token at 128k within 1.2x of 4k; peak memory flat (within 10%) across lengths.

  .venv/bin/python bench/bench_streaming.py [--lengths 1k,4k,16k,64k,128k] [--config FILE] [--json OUT]
"""

import argparse
import json
import os
import pathlib
import sys
import threading
import time

ROOT = pathlib.Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402

from lm2_jax.eval import streaming  # noqa: E402
from lm2_jax.model import LM2, ModelConfig  # noqa: E402
from lm2_jax.model.decode import Decoder  # noqa: E402

PAGE = os.sysconf("SC_PAGE_SIZE")


def rss_bytes() -> int:
  with open("/proc/self/statm") as f:
    return int(f.read().split()[1]) * PAGE


class PeakRSS:
  """Samples the process RSS in a background thread; `peak` is the max since `reset`."""

  def __init__(self, interval: float = 0.005):
    self.interval, self.peak, self._stop = interval, 0, threading.Event()
    self._thread = threading.Thread(target=self._run, daemon=True)
    self._thread.start()

  def _run(self):
    while not self._stop.is_set():
      self.peak = max(self.peak, rss_bytes())
      time.sleep(self.interval)

  def reset(self):
    self.peak = rss_bytes()

  def stop(self):
    self._stop.set()
    self._thread.join()


def live_bytes() -> int:
  return sum(a.nbytes for a in jax.live_arrays())


def parse_length(text: str) -> int:
  text = text.strip().lower()
  return int(text[:-1]) * 1024 if text.endswith("k") else int(text)


def main(argv=None) -> int:
  parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
  parser.add_argument("--lengths", default="1k,4k,16k,64k,128k")
  parser.add_argument("--config", default=str(ROOT / "configs/model/small.yaml"))
  parser.add_argument("--json", default=None, help="also write the figures here")
  args = parser.parse_args(argv)
  lengths = [parse_length(x) for x in args.lengths.split(",") if x.strip()]

  cfg = ModelConfig.from_yaml(args.config)
  t = cfg.segment_length
  variables = LM2(cfg).init(jax.random.key(0), jnp.zeros((1, t), jnp.int32))
  decoder = Decoder(cfg, variables)
  rng = np.random.default_rng(0)

  # Warm-up: compile the segment step and touch every buffer once.
  warm = rng.integers(0, cfg.vocab_size, (1, 4 * t)).astype(np.int32)
  jax.block_until_ready(streaming.stream(decoder, decoder.init_state(1), warm, np.ones_like(warm, bool)).memory)

  monitor = PeakRSS()
  results = []
  print(f"config {args.config}: D={cfg.d_model} L={cfg.num_layers} T={t} M={cfg.num_slots}, batch 1, "
        f"backend {jax.default_backend()}")
  print(f"{'tokens':>8} {'segments':>8} {'seconds':>8} {'us/token':>9} {'peak RSS MiB':>13} "
        f"{'peak live MiB':>14}")
  for n in lengths:
    n = -(-n // t) * t
    tokens = rng.integers(0, cfg.vocab_size, (1, n)).astype(np.int32)
    valid = np.ones_like(tokens, bool)
    counter = {"segments": 0, "live": live_bytes()}

    def on_segment():
      counter["segments"] += 1
      if counter["segments"] % 16 == 0:
        counter["live"] = max(counter["live"], live_bytes())

    monitor.reset()
    start = time.perf_counter()
    state = streaming.stream(decoder, decoder.init_state(1), tokens, valid, on_segment)
    jax.block_until_ready(state.memory)
    seconds = time.perf_counter() - start
    row = {"tokens": n, "segments": n // t, "seconds": seconds, "us_per_token": 1e6 * seconds / n,
           "peak_rss_mib": monitor.peak / 2**20, "peak_live_mib": counter["live"] / 2**20}
    results.append(row)
    print(f"{n:>8} {n // t:>8} {seconds:>8.2f} {row['us_per_token']:>9.1f} {row['peak_rss_mib']:>13.1f} "
          f"{row['peak_live_mib']:>14.2f}", flush=True)
    del tokens, valid, state
  monitor.stop()

  by_tokens = {r["tokens"]: r for r in results}
  summary = {}
  if 4096 in by_tokens and len(results) > 1:
    longest = results[-1]
    summary["time_per_token_ratio_longest_vs_4k"] = longest["us_per_token"] / by_tokens[4096]["us_per_token"]
  rss = [r["peak_rss_mib"] for r in results]
  live = [r["peak_live_mib"] for r in results]
  summary["peak_rss_spread"] = max(rss) / min(rss)
  summary["peak_live_spread"] = max(live) / min(live)
  for key, value in summary.items():
    print(f"{key}: {value:.3f}")
  ratio = summary.get("time_per_token_ratio_longest_vs_4k")
  if ratio is not None:
    print(f"target time/token {results[-1]['tokens']} vs 4k <= 1.2: {'met' if ratio <= 1.2 else 'NOT met'}")
  print(f"target peak RSS within 10%: {'met' if summary['peak_rss_spread'] <= 1.1 else 'NOT met'}")
  if args.json:
    pathlib.Path(args.json).write_text(json.dumps({"results": results, "summary": summary}, indent=2))
  return 0


if __name__ == "__main__":
  sys.exit(main())
