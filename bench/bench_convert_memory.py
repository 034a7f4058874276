"""Peak host RSS of importing a Hugging Face Llama checkpoint with the `llama-1.2b` shapes.

Writes a synthetic bfloat16 checkpoint (16 layers, D 2048, MLP 8192, 32 heads, 8 kv heads, vocab
128256, tied embeddings: ~2.5 GB) shard by shard into a temporary directory, then imports it with
`load_hf_llama` in a fresh subprocess per layout and reads that process's VmHWM (peak resident set).
A baseline subprocess (same imports, a tiny jitted op, no checkpoint) gives the fixed cost of the
interpreter + jax, so the figure attributable to the conversion is `peak - baseline`. The target is a
peak well under twice the checkpoint size. The temporary directory is deleted afterwards.

  .venv/bin/python bench/bench_convert_memory.py [--tmp DIR] [--layouts unrolled scanned]
"""

import argparse
import json
import pathlib
import shutil
import subprocess
import sys
import tempfile
import time

import ml_dtypes
import numpy as np

ROOT = pathlib.Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from lm2_jax.convert.safetensors_io import write_safetensors  # noqa: E402

SHAPES = {"vocab_size": 128256, "hidden_size": 2048, "intermediate_size": 8192,
          "num_hidden_layers": 16, "num_attention_heads": 32, "num_key_value_heads": 8}

_CHILD = """
import json, sys, time
import jax
start = time.time()
if sys.argv[1] == "baseline":
  jax.block_until_ready(jax.jit(lambda x: x + 1)(jax.numpy.ones(4)))
else:
  from lm2_jax.convert import load_hf_llama
  cfg, variables = load_hf_llama(sys.argv[2], segment_length=2048,
                                 scan_layers=sys.argv[1] == "scanned")
  jax.block_until_ready(variables)
  n_bytes = sum(x.nbytes for x in jax.tree.leaves(variables))
seconds = time.time() - start
status = dict(line.split(":", 1) for line in open("/proc/self/status") if ":" in line)
kib = lambda key: int(status[key].split()[0])
print(json.dumps({"hwm_kib": kib("VmHWM"), "rss_kib": kib("VmRSS"), "seconds": seconds,
                  "param_bytes": 0 if sys.argv[1] == "baseline" else n_bytes}))
"""


def _tensors():
  """(name, bfloat16 array) of a tied Llama with SHAPES, one tensor at a time."""
  d, f, v = SHAPES["hidden_size"], SHAPES["intermediate_size"], SHAPES["vocab_size"]
  h = d // SHAPES["num_attention_heads"]
  kv = SHAPES["num_key_value_heads"] * h
  layer = {"input_layernorm": (d,), "self_attn.q_proj": (d, d), "self_attn.k_proj": (kv, d),
           "self_attn.v_proj": (kv, d), "self_attn.o_proj": (d, d),
           "post_attention_layernorm": (d,), "mlp.gate_proj": (f, d), "mlp.up_proj": (f, d),
           "mlp.down_proj": (d, f)}
  rng = np.random.default_rng(0)

  def fill(shape):
    # A random pattern tiled, so pages are real and distinct from zeros, cheaply.
    base = rng.standard_normal(4096, dtype=np.float32).astype(ml_dtypes.bfloat16)
    return np.resize(base, shape)

  yield "model.embed_tokens.weight", fill((v, d))
  for i in range(SHAPES["num_hidden_layers"]):
    for name, shape in layer.items():
      yield f"model.layers.{i}.{name}.weight", fill(shape)
  yield "model.norm.weight", fill((d,))


def write_checkpoint(directory: pathlib.Path) -> int:
  """Writes config.json + ~1 GB safetensors shards; returns the bytes of tensor data."""
  config = {"architectures": ["LlamaForCausalLM"], "model_type": "llama", **SHAPES,
            "head_dim": SHAPES["hidden_size"] // SHAPES["num_attention_heads"],
            "hidden_act": "silu", "rms_norm_eps": 1e-5, "rope_theta": 500000.0,
            "tie_word_embeddings": True, "torch_dtype": "bfloat16"}
  (directory / "config.json").write_text(json.dumps(config, indent=2))
  write_safetensors(_tensors(), directory, max_shard_bytes=1 << 30)
  index = json.loads((directory / "model.safetensors.index.json").read_text())
  return index["metadata"]["total_size"]


def measure(mode: str, directory: pathlib.Path) -> dict:
  out = subprocess.run([sys.executable, "-c", _CHILD, mode, str(directory)], cwd=ROOT,
                       capture_output=True, text=True, check=False,
                       env={"PYTHONPATH": str(ROOT), "JAX_PLATFORMS": "cpu", "PATH": "/usr/bin"})
  if out.returncode:
    raise RuntimeError(f"{mode} import failed:\n{out.stderr[-4000:]}")
  return json.loads(out.stdout.strip().splitlines()[-1])


def main() -> None:
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("--tmp", default=None, help="where to write the temporary checkpoint")
  parser.add_argument("--layouts", nargs="+", default=["unrolled", "scanned"],
                      choices=["unrolled", "scanned"])
  args = parser.parse_args()
  directory = pathlib.Path(tempfile.mkdtemp(prefix="lm2_convert_bench_", dir=args.tmp))
  try:
    start = time.time()
    size = write_checkpoint(directory)
    gib = 1 << 30
    print(f"synthetic llama-1.2b checkpoint: {size / gib:.2f} GiB bf16 "
          f"(written in {time.time() - start:.0f} s)")
    base = measure("baseline", directory)
    print(f"baseline (python + jax): peak RSS {base['hwm_kib'] / 2**20:.2f} GiB")
    for mode in args.layouts:
      r = measure(mode, directory)
      peak = r["hwm_kib"] * 1024
      print(f"{mode:9s} import: {r['seconds']:.1f} s, params {r['param_bytes'] / gib:.2f} GiB, "
            f"peak RSS {peak / gib:.2f} GiB = {peak / size:.2f}x checkpoint; "
            f"above baseline {(peak - base['hwm_kib'] * 1024) / gib:.2f} GiB = "
            f"{(peak - base['hwm_kib'] * 1024) / size:.2f}x")
  finally:
    shutil.rmtree(directory, ignore_errors=True)


if __name__ == "__main__":
  main()
