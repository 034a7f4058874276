"""Command line: Hugging Face Llama directory <-> Orbax checkpoint of LM2 params.

  python -m lm2_jax.convert import --hf HF_DIR --out CKPT [key=value ...]
  python -m lm2_jax.convert export --checkpoint CKPT --out HF_DIR [--max-shard-mb 2048]

`import` writes CKPT as a plain `orbax.checkpoint.StandardCheckpointer` directory holding
{"params": ...}, with `CKPT/model.yaml` (the ModelConfig) and the HF tokenizer files (tokenizer.json, ...)
placed inside it. The key=value pairs are ModelConfig overrides, values parsed as YAML (e.g.
`segment_length=1024 use_memory=true scan_layers=true`). `export` reads such a directory, or a trainer
run directory (runs/NAME), its checkpoints/ directory (newest step) or one step directory, and writes
config.json + safetensors (+ lm2_memory.safetensors when the model has memory) and the tokenizer files
(a trainer run has them only when it trained with an `hf` tokenizer).
"""

from __future__ import annotations

import argparse
import logging
import pathlib
import shutil
import sys

import orbax.checkpoint as ocp
import yaml

from lm2_jax.checkpoints import MODEL_CONFIG_FILE, read_params
from lm2_jax.convert.llama import copy_tokenizer, load_hf_llama, save_hf_llama
from lm2_jax.model import ModelConfig
from lm2_jax.train.config import apply_overrides


def import_hf(hf_dir: str, out: str, overrides: list[str]) -> pathlib.Path:
  """HF directory -> Orbax checkpoint directory `out` (+ model.yaml and tokenizer files inside)."""
  out_path = pathlib.Path(out).absolute()
  if out_path.exists():
    raise FileExistsError(f"--out {out_path} already exists; choose a new checkpoint directory")
  model_overrides = apply_overrides({}, overrides)
  cfg, variables = load_hf_llama(hf_dir, **model_overrides)
  checkpointer = ocp.StandardCheckpointer()
  checkpointer.save(out_path, {"params": variables["params"]})
  checkpointer.wait_until_finished()
  checkpointer.close()
  (out_path / MODEL_CONFIG_FILE).write_text(yaml.safe_dump(cfg.to_dict(), sort_keys=False))
  copy_tokenizer(hf_dir, out_path)
  return out_path


def restore_checkpoint(checkpoint: str | pathlib.Path) -> tuple[ModelConfig, dict]:
  """(cfg, {"params": ...}) of any checkpoint `export` accepts, on the default device."""
  read = read_params(checkpoint)
  return read.cfg, {"params": read.params}


def export_hf(checkpoint: str, out: str, max_shard_mb: int) -> list[str]:
  """Params checkpoint or trainer run/checkpoints/step directory -> HF directory `out`."""
  read = read_params(checkpoint)
  tokenizer_dir = read.tokenizer if read.tokenizer is None or read.tokenizer.is_dir() else None
  files = save_hf_llama(read.cfg, {"params": read.params}, out, tokenizer_dir=tokenizer_dir,
                        max_shard_bytes=max_shard_mb << 20)
  if read.tokenizer is not None and read.tokenizer.is_file():
    # A trainer's `hf` tokenizer is one tokenizer.json file, possibly under another name.
    shutil.copyfile(read.tokenizer, pathlib.Path(out) / "tokenizer.json")
    files.append("tokenizer.json")
  elif read.tokenizer is None:
    logging.warning("%s: no Hugging Face tokenizer to export (the run's tokenizer is not `hf`); "
                    "%s has the weights and config only", read.source, out)
  return files


def main(argv: list[str] | None = None) -> int:
  parser = argparse.ArgumentParser(prog="python -m lm2_jax.convert", description=__doc__,
                                   formatter_class=argparse.RawDescriptionHelpFormatter)
  commands = parser.add_subparsers(dest="command", required=True)
  imp = commands.add_parser("import", help="Hugging Face Llama directory -> Orbax checkpoint")
  imp.add_argument("--hf", required=True, help="directory written by save_pretrained")
  imp.add_argument("--out", required=True, help="new checkpoint directory")
  imp.add_argument("overrides", nargs="*", help="ModelConfig overrides, key=value")
  exp = commands.add_parser("export", help="Orbax checkpoint -> Hugging Face Llama directory")
  exp.add_argument("--checkpoint", required=True,
                   help="directory written by `import`, or a train.py run / checkpoints / step directory")
  exp.add_argument("--out", required=True, help="output directory")
  exp.add_argument("--max-shard-mb", type=int, default=2048, help="safetensors shard size (MiB)")
  args = parser.parse_args(argv)
  try:
    if args.command == "import":
      out = import_hf(args.hf, args.out, args.overrides)
      print(f"wrote {out} ({MODEL_CONFIG_FILE} inside)")
    else:
      if args.max_shard_mb < 1:
        raise ValueError(f"--max-shard-mb {args.max_shard_mb}: give a positive size in MiB")
      files = export_hf(args.checkpoint, args.out, args.max_shard_mb)
      print(f"wrote {args.out}: {', '.join(files)}")
  except (ValueError, OSError) as e:
    # Missing or malformed input directories, bad overrides (CheckpointError and ConfigError are
    # ValueErrors), an --out that exists or cannot be written: one line, exit 2 like argparse.
    print(f"error: {e}", file=sys.stderr)
    return 2
  return 0


if __name__ == "__main__":
  sys.exit(main())
