"""The trainer's compiled step against eager PyTorch (Hugging Face `LlamaForCausalLM`), side by side.

    python bench/bench_vs_torch.py [--torch-python PATH] [--sizes issue,small] [--rounds 5] [--steps 3]
    python bench/bench_vs_torch.py --device cuda --dtype bfloat16      # on a GPU, with a CUDA jax

At each size (`issue`: D 128, 4 layers, 4 heads, 4 KV heads, MLP 384, vocab 260, the dims of issue 15;
`small`: configs/model/small.yaml's; `300m`: configs/model/lm2-300m.yaml's) and one batch (default 32 x 256 tokens, float32, AdamW with the
trainer's defaults, global-norm clipping), three steps are timed in turn, round after round:

  torch    `LlamaForCausalLM` of the same backbone, eager, causal attention over all 256 tokens;
  nomem    this project's train step (bench_train.compiled_step: jit, shardings, donated state), memory
           off, `attention: full` over the 256 tokens: the same computation as torch; with `remat: dots`
           (`--nomem-remat`), the project's setting for a memory-less Llama (configs/model/llama-1.2b.yaml):
           on this CPU 1.10x the speed of `full` at both sizes (A/B in one process, docs/profile.md);
  lm2      the same step with memory on: 4 segments of 64 tokens, the config's slots, `remat` and
           `unroll_segments` (small.yaml: `dots`, the 4 segments unrolled), the memory's products in
           the order with fewer FLOPs (`memory_product_order: auto`: slot-first at both sizes).

Each round times every step right after the others, so a load that comes and goes on a shared host
touches them alike; the figures printed are medians over rounds of each step's tokens/s and of the
per-round ratios to torch, and the MFU of the JAX steps (model FLOPs, `model_flops_per_token`, over the
float32 matmul peak measured in the same round).

PyTorch and transformers are not dependencies of this project. The PyTorch side runs in a worker process
of `--torch-python` (default: this interpreter), so they can live in their own environment:

    python3.12 -m venv /path/torchvenv && /path/torchvenv/bin/pip install torch transformers
    python bench/bench_vs_torch.py --torch-python /path/torchvenv/bin/python

(`pip install torch --index-url https://download.pytorch.org/whl/cpu` gets the smaller CPU-only build.)
This is a benchmark, not a test: it exits with that advice when the worker cannot import them.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(HERE)

SIZES = {  # (model file, overrides)
    "issue": ("small.yaml", dict(vocab_size=260, d_model=128, num_layers=4, num_heads=4, num_kv_heads=4,
                                 mlp_dim=384, num_slots=16, memory_heads=1)),
    "small": ("small.yaml", {}),
    "300m": ("lm2-300m.yaml", {}),  # for a GPU: --batch 8 --seq 2048 --segment 512
}
INSTALL = ("PyTorch and Hugging Face transformers are needed for the reference side (they are not project "
           "dependencies). Install them into any Python 3.10+ environment, e.g.\n"
           "    python3.12 -m venv /tmp/torchvenv && /tmp/torchvenv/bin/pip install torch transformers\n"
           "and run: python bench/bench_vs_torch.py --torch-python /tmp/torchvenv/bin/python")


# The PyTorch worker: its own process, so the JAX process needs neither package. It reads one JSON
# command per line and answers one JSON line.
def _worker() -> None:
  try:
    import torch  # pylint: disable=g-import-not-at-top
    import transformers  # pylint: disable=g-import-not-at-top
  except ImportError as e:
    print(json.dumps({"error": f"{type(e).__name__}: {e}"}), flush=True)
    return
  steps = {}
  for line in sys.stdin:
    cmd = json.loads(line)
    if cmd["cmd"] == "probe":
      reply = {"threads": torch.get_num_threads(), "torch": torch.__version__,
               "transformers": transformers.__version__}
    elif cmd["cmd"] == "build":
      steps[cmd["name"]] = _torch_step(torch, transformers, cmd)
      reply = {}
    elif cmd["cmd"] == "time":
      step = steps[cmd["name"]]
      start = time.perf_counter()
      for _ in range(cmd["steps"]):
        step()
      if cmd.get("device") == "cuda":
        torch.cuda.synchronize()
      reply = {"seconds": (time.perf_counter() - start) / cmd["steps"]}
    else:
      return
    print(json.dumps(reply), flush=True)


def _torch_step(torch, transformers, cmd: dict):
  """A warmed-up closure running one AdamW train step of a Llama with the command's dims."""
  m, opt = cmd["model"], cmd["train"]
  torch.manual_seed(0)
  config = transformers.LlamaConfig(
      vocab_size=m["vocab_size"], hidden_size=m["d_model"], intermediate_size=m["mlp_dim"],
      num_hidden_layers=m["num_layers"], num_attention_heads=m["num_heads"],
      num_key_value_heads=m["num_kv_heads"], max_position_embeddings=cmd["seq"],
      rms_norm_eps=m["norm_eps"], rope_theta=m["rope_theta"], tie_word_embeddings=m["tie_embeddings"],
      initializer_range=m["init_std"])
  device = cmd.get("device", "cpu")
  model = transformers.LlamaForCausalLM(config).train().to(device)
  adamw = torch.optim.AdamW(model.parameters(), lr=opt["learning_rate"], betas=(opt["b1"], opt["b2"]),
                            eps=opt["eps"], weight_decay=opt["weight_decay"])
  gen = torch.Generator().manual_seed(0)
  tokens = torch.randint(0, m["vocab_size"], (cmd["batch"], cmd["seq"]), generator=gen).to(device)
  targets = torch.roll(tokens, -1, 1)
  # bfloat16 as the JAX side runs it: float32 parameters and optimizer, bfloat16 matmuls (autocast).
  cast = torch.autocast(device, dtype=torch.bfloat16, enabled=m["dtype"] == "bfloat16")

  def step():
    with cast:
      logits = model(input_ids=tokens).logits
    loss = torch.nn.functional.cross_entropy(logits.reshape(-1, logits.shape[-1]).float(),
                                             targets.reshape(-1))
    loss.backward()
    if opt["clip_norm"] > 0:
      torch.nn.utils.clip_grad_norm_(model.parameters(), opt["clip_norm"])
    adamw.step()
    adamw.zero_grad(set_to_none=True)

  step()
  return step


class TorchWorker:
  """The PyTorch side, in a subprocess of `python`."""

  def __init__(self, python: str):
    self.proc = subprocess.Popen([python, os.path.abspath(__file__), "--worker"], stdin=subprocess.PIPE,
                                 stdout=subprocess.PIPE, text=True, cwd=ROOT)

  def ask(self, **cmd) -> dict:
    self.proc.stdin.write(json.dumps(cmd) + "\n")
    self.proc.stdin.flush()
    line = self.proc.stdout.readline()
    if not line:
      raise SystemExit(f"the PyTorch worker exited (status {self.proc.wait()}); see its error above")
    reply = json.loads(line)
    if "error" in reply:
      raise SystemExit(f"the PyTorch worker cannot import torch/transformers ({reply['error']}).\n{INSTALL}")
    return reply

  def close(self) -> None:
    if self.proc.poll() is None:
      self.proc.stdin.write(json.dumps({"cmd": "quit"}) + "\n")
      self.proc.stdin.flush()
      self.proc.wait()


def _model_configs(size: str, seq: int, segment: int, dtype: str, nomem_remat: str = "dots"):
  """(memory-less full-attention config, LM2 config) of a size."""
  from lm2_jax.model import ModelConfig  # pylint: disable=g-import-not-at-top

  name, overrides = SIZES[size]
  path = os.path.join(ROOT, "configs/model", name)
  lm2 = ModelConfig.from_yaml(path, **overrides, use_memory=True, segment_length=segment, dtype=dtype)
  nomem = ModelConfig.from_yaml(path, **overrides, use_memory=False, attention="full",
                                segment_length=seq, dtype=dtype, remat=nomem_remat)
  return nomem, lm2


def main(argv=None) -> None:
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("--torch-python", default=sys.executable,
                      help="interpreter that can import torch and transformers")
  parser.add_argument("--sizes", default="issue,small", help=f"comma-separated, of {sorted(SIZES)}")
  parser.add_argument("--batch", type=int, default=32)
  parser.add_argument("--seq", type=int, default=256, help="tokens per row")
  parser.add_argument("--segment", type=int, default=64, help="LM2 segment length (divides --seq)")
  parser.add_argument("--rounds", type=int, default=5)
  parser.add_argument("--steps", type=int, default=3, help="timed steps per turn")
  parser.add_argument("--device", choices=("cpu", "cuda"), default="cpu",
                      help="where PyTorch runs (JAX uses its default backend: run with a CUDA jax for cuda)")
  parser.add_argument("--dtype", choices=("float32", "bfloat16"), default="float32",
                      help="compute dtype of both sides (parameters and optimizer stay float32)")
  parser.add_argument("--nomem-remat", choices=("none", "full", "dots"), default="dots",
                      help="remat of the memory-less step (the LM2 step keeps its config's)")
  parser.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
  args = parser.parse_args(argv)
  if args.worker:
    _worker()
    return
  sizes = args.sizes.split(",")
  unknown = [s for s in sizes if s not in SIZES]
  if unknown or args.seq % args.segment:
    parser.error(f"--sizes takes {sorted(SIZES)} (got {unknown}); --segment must divide --seq")
  worker = TorchWorker(args.torch_python)
  try:
    info = worker.ask(cmd="probe")  # fails with the install advice before any JAX work
    _run(args, sizes, worker, info)
  finally:
    worker.close()


def _run(args, sizes: list[str], worker: TorchWorker, info: dict) -> None:
  import absl.flags  # pylint: disable=g-import-not-at-top
  import dataclasses  # pylint: disable=g-import-not-at-top
  import jax  # pylint: disable=g-import-not-at-top

  sys.path.insert(0, HERE)
  sys.path.insert(0, ROOT)
  from bench_train import compiled_step  # pylint: disable=g-import-not-at-top
  from lm2_jax.model import model_flops_per_token  # pylint: disable=g-import-not-at-top
  from lm2_jax.train import config as config_lib  # pylint: disable=g-import-not-at-top
  from lm2_jax.train import metrics as metrics_lib  # pylint: disable=g-import-not-at-top

  absl.flags.FLAGS.mark_as_parsed()
  train = dataclasses.asdict(config_lib.TrainConfig())
  tokens = args.batch * args.seq
  jax_steps, flops, remat = {}, {}, {}
  for size in sizes:
    nomem, lm2 = _model_configs(size, args.seq, args.segment, args.dtype, args.nomem_remat)
    worker.ask(cmd="build", name=size, model=dataclasses.asdict(nomem), train=train,
               batch=args.batch, seq=args.seq, device=args.device)
    for name, cfg, segments in (("nomem", nomem, 1), ("lm2", lm2, args.seq // args.segment)):
      start = time.perf_counter()
      state, step, batch = compiled_step(cfg, args.batch, segments)
      state, metrics = step(state, batch)
      jax.block_until_ready(metrics)
      jax_steps[size, name] = [state, step, batch]
      flops[size, name] = model_flops_per_token(cfg, args.seq) * tokens
      remat[size, name] = cfg.remat
      print(f"built {size}/{name} in {time.perf_counter() - start:.1f} s", flush=True)

  def time_jax(key) -> float:
    state, step, batch = jax_steps[key]
    start = time.perf_counter()
    for _ in range(args.steps):
      state, metrics = step(state, batch)
    jax.block_until_ready(metrics)
    jax_steps[key][0] = state
    return (time.perf_counter() - start) / args.steps

  seconds = {(s, n): [] for s in sizes for n in ("torch", "nomem", "lm2")}
  peaks, load_before = [], os.getloadavg()[0]
  for r in range(args.rounds):
    peaks.append(metrics_lib.measure_peak_flops(1024 if args.device == "cpu" else 8192, dtype=args.dtype))
    for size in sizes:
      seconds[size, "torch"].append(
          worker.ask(cmd="time", name=size, steps=args.steps, device=args.device)["seconds"])
      for name in ("nomem", "lm2"):
        seconds[size, name].append(time_jax((size, name)))
    print(f"round {r + 1}/{args.rounds} done", flush=True)

  print(f"\n{args.batch} x {args.seq} tokens per step, {args.dtype}, AdamW, {jax.devices()[0].device_kind}; "
        f"{os.cpu_count()} CPU cores; torch "
        f"{info['torch']} ({info['threads']} threads), transformers {info['transformers']}, jax "
        f"{jax.__version__}; medians over {args.rounds} rounds of {args.steps} steps; measured matmul "
        f"peak {statistics.median(peaks) / 1e9:.1f} GFLOP/s; 1-minute load average {load_before:.1f} "
        f"before, {os.getloadavg()[0]:.1f} after (other processes slow PyTorch's OpenMP threads more "
        f"than XLA's pool: compare runs at similar loads)")
  # "per FLOP": the ratio times the step's model FLOPs over the memory-less step's (PyTorch's): LM2's
  # memory is work the Llama it is compared with does not do.
  print(f"{'size':<7}{'step':<7}{'tokens/s':>10}{'x torch':>9}{'per FLOP':>10}{'MFU':>7}  remat")
  for size in sizes:
    base = seconds[size, "torch"]
    for name in ("torch", "nomem", "lm2"):
      s = seconds[size, name]
      ratio = statistics.median(b / x for b, x in zip(base, s))
      if name == "torch":
        mfu = per_flop = ""
      else:
        mfu = f"{statistics.median(flops[size, name] / x / p for x, p in zip(s, peaks)):7.3f}"
        per_flop = f"{ratio * flops[size, name] / flops[size, 'nomem']:10.2f}"
      print(f"{size:<7}{name:<7}{tokens / statistics.median(s):10,.0f}{ratio:9.2f}{per_flop:>10}{mfu:>7}  "
            f"{remat.get((size, name), '')}")


if __name__ == "__main__":
  main()
