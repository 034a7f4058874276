"""Regenerates the Hugging Face Llama golden fixtures in tests/fixtures/hf_tiny_llama_*/.

The fixtures pin lm2_jax's Llama backbone to an independent implementation (transformers' PyTorch
`LlamaForCausalLM`). Each fixture directory holds what `save_pretrained` writes (config.json and
safetensors weights), plus `input_ids.npy` (int32 [2, 16]) and `logits.npy` (float32 [2, 16, V]) computed
by the PyTorch model in float32 with eager attention.

Three tiny random models (2 layers, hidden 64, 4 heads, 2 kv heads (GQA), MLP 128, vocab 300):
  hf_tiny_llama_tied            tied embeddings, one `model.safetensors`
  hf_tiny_llama_untied_sharded  untied lm_head, several shards + `model.safetensors.index.json`
  hf_tiny_llama_rope_llama3     untied, Llama-3.1 "llama3" RoPE scaling (`rope_parameters`)

The llama3 fixture's scaling is shrunk to the fixture's scale so that it matters at positions 0..15:
with head dim 16 and theta 1e4 the wavelengths are 2*pi*1e4^(i/8) = 6.3, 19.9, 62.8, 199, ...; an
original context of 128 with low/high frequency factors 2 and 8 puts i=0 in the kept band (wavelength
< 16), i=1..2 in the interpolated band and i>=3 in the divided band. The script checks each band is
used and that the logits differ from those of the same weights without scaling by more than 1e-3, so
an importer that dropped the scaling fails the parity test.

Weights are drawn with std 0.2 (matrices) and norm scales 1 + 0.2 * N(0, 1), not HF's default std 0.02,
so the logits depend strongly on every tensor and a wrong mapping (a missing transpose, swapped q/k,
wrong GQA grouping) shows as a large error.

Torch is not a dependency of lm2_jax: run this script in a separate Python 3.11 venv, e.g.

  ~/.pyenv/versions/3.11.7/bin/python -m venv /tmp/hfvenv
  /tmp/hfvenv/bin/pip install /opt/wheels/torch-2.13.0+cpu-*.whl transformers safetensors numpy
  /tmp/hfvenv/bin/python scripts/make_hf_golden.py            # writes into tests/fixtures/

It was last run with torch 2.13.0+cpu and transformers 5.24.0 (rerunning it reproduces the first two
fixtures byte for byte).
"""

import argparse
import json
import pathlib
import shutil

import numpy as np
import torch
import transformers

_SEED = 1234
_BATCH, _LENGTH = 2, 16
_STD = 0.2


# The llama3 fixture's `rope_parameters` (see module docstring).
_LLAMA3 = {"rope_type": "llama3", "rope_theta": 10000.0, "factor": 8.0, "low_freq_factor": 2.0,
           "high_freq_factor": 8.0, "original_max_position_embeddings": 128}
_HEAD_DIM = 16


def _config(tie: bool, rope: dict | None = None) -> transformers.LlamaConfig:
  rope_kwargs = {"rope_theta": 10000.0} if rope is None else {"rope_parameters": dict(rope)}
  return transformers.LlamaConfig(
      vocab_size=300,
      hidden_size=64,
      intermediate_size=128,
      num_hidden_layers=2,
      num_attention_heads=4,
      num_key_value_heads=2,
      max_position_embeddings=64 if rope is None else 1024,
      rms_norm_eps=1e-5,
      **rope_kwargs,
      tie_word_embeddings=tie,
      attention_bias=False,
      mlp_bias=False,
      torch_dtype="float32",
  )


def _randomise(model: torch.nn.Module, generator: torch.Generator) -> None:
  """Overwrites every parameter: std 0.2 matrices, norm scales around 1 (see module docstring)."""
  with torch.no_grad():
    for _, param in sorted(model.named_parameters()):
      noise = torch.randn(param.shape, generator=generator, dtype=torch.float32)
      if param.ndim == 1:
        param.copy_(1.0 + _STD * noise)
      else:
        param.copy_(_STD * noise)


def _build(config: transformers.LlamaConfig) -> torch.nn.Module:
  model = transformers.LlamaForCausalLM(config).to(torch.float32).eval()
  model.config._attn_implementation = "eager"  # pylint: disable=protected-access
  return model


def _check_llama3_bands(rope: dict) -> None:
  """Each llama3 band (kept, interpolated, divided) holds at least one of the fixture's frequencies."""
  wavelengths = [2 * np.pi * rope["rope_theta"] ** (i / _HEAD_DIM) for i in range(0, _HEAD_DIM, 2)]
  old = rope["original_max_position_embeddings"]
  kept = [w for w in wavelengths if w < old / rope["high_freq_factor"]]
  divided = [w for w in wavelengths if w > old / rope["low_freq_factor"]]
  assert kept and divided and len(kept) + len(divided) < len(wavelengths), wavelengths


def _make(out_dir: pathlib.Path, tie: bool, max_shard_size: str | None,
          rope: dict | None = None, seed_offset: int = 0) -> None:
  generator = torch.Generator().manual_seed(_SEED + int(tie) + seed_offset)
  model = _build(_config(tie, rope))
  _randomise(model, generator)
  if tie:
    assert model.lm_head.weight.data_ptr() == model.model.embed_tokens.weight.data_ptr()

  input_ids = torch.randint(0, model.config.vocab_size, (_BATCH, _LENGTH), generator=generator)
  with torch.no_grad():
    logits = model(input_ids=input_ids).logits.to(torch.float32)
  if rope is not None:
    _check_llama3_bands(rope)
    plain = _build(_config(tie))
    plain.load_state_dict(model.state_dict())
    with torch.no_grad():
      unscaled = plain(input_ids=input_ids).logits.to(torch.float32)
    change = float((logits - unscaled).abs().max())
    print(f"{out_dir.name}: RoPE scaling changes the logits by up to {change:.4f}")
    assert change > 1e-3, f"the RoPE scaling barely changes the logits ({change}); see the docstring"

  if out_dir.exists():
    shutil.rmtree(out_dir)
  kwargs = {"safe_serialization": True}
  if max_shard_size is not None:
    kwargs["max_shard_size"] = max_shard_size
  model.save_pretrained(out_dir, **kwargs)
  np.save(out_dir / "input_ids.npy", input_ids.numpy().astype(np.int32))
  np.save(out_dir / "logits.npy", logits.numpy())
  files = sorted(p.name for p in out_dir.iterdir())
  size = sum(p.stat().st_size for p in out_dir.iterdir())
  print(f"{out_dir}: {files} ({size / 1024:.0f} KiB), logits std {float(logits.std()):.3f}")
  if max_shard_size is not None:
    index = json.loads((out_dir / "model.safetensors.index.json").read_text())
    assert len(set(index["weight_map"].values())) > 1, "expected several shards"


def main() -> None:
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  default_out = pathlib.Path(__file__).resolve().parents[1] / "tests" / "fixtures"
  parser.add_argument("--out", type=pathlib.Path, default=default_out, help="fixtures directory")
  args = parser.parse_args()
  torch.manual_seed(_SEED)
  print(f"torch {torch.__version__}, transformers {transformers.__version__}")
  _make(args.out / "hf_tiny_llama_tied", tie=True, max_shard_size=None)
  _make(args.out / "hf_tiny_llama_untied_sharded", tie=False, max_shard_size="200KB")
  _make(args.out / "hf_tiny_llama_rope_llama3", tie=False, max_shard_size=None, rope=_LLAMA3,
        seed_offset=2)


if __name__ == "__main__":
  main()
