"""Train (or resume) an LM2 run.

    python train.py                                          # configs/experiment/default.yaml
    python train.py --config configs/experiment/X.yaml train.steps=200 model.use_memory=false

Overrides are dotted key=value pairs (values parsed as YAML). Outputs go to runs/<name>/: the resolved
config, metrics.jsonl, TensorBoard events, checkpoints and final_eval.json. Rerunning the same command
resumes from the newest checkpoint; SIGTERM / Ctrl-C save a checkpoint first.

Multi-process runs (one process per host, or `python -m lm2_jax.launch` locally) join with
`--multihost` (TPU pods, Slurm, MPI auto-detection) or `--coordinator HOST:PORT --num-processes N
--process-id I` (or the LM2_* variables); see `lm2_jax/distributed.py`. Process 0 writes the logs,
metrics and results; all processes write the checkpoint together.
"""

import argparse
import logging
import os
import sys

import absl.flags

from lm2_jax import distributed

DEFAULT_CONFIG = "configs/experiment/default.yaml"


def main(argv: list[str]) -> int:
  parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
  parser.add_argument("--config", default=DEFAULT_CONFIG, help="experiment YAML file")
  parser.add_argument("overrides", nargs="*", help="dotted key=value overrides, e.g. train.steps=200")
  parser.add_argument("--reshard-data", action="store_true",
                      help="resume a checkpoint written by a different number of processes (the data "
                           "position is re-derived from the step; also LM2_RESHARD_DATA=1)")
  distributed.add_arguments(parser)
  # Intermixed: flags may come after the key=value overrides.
  args = parser.parse_intermixed_args(argv)
  logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
  # Before anything touches the JAX backend: joining a multi-process run is impossible afterwards.
  code = distributed.join(args)
  if code is not None:
    return code
  # Grain worker processes read absl flags; this entry point has no absl command line.
  absl.flags.FLAGS.mark_as_parsed()
  reshard = args.reshard_data or os.environ.get("LM2_RESHARD_DATA", "") in ("1", "true", "yes")
  return distributed.exit_fast_on_failure(lambda: _train(args.config, args.overrides, reshard))


def _train(config_path: str, overrides: list[str], reshard_data: bool) -> int:
  from lm2_jax.train import checkpoint as ckpt_lib  # pylint: disable=g-import-not-at-top
  from lm2_jax.train import config as config_lib  # pylint: disable=g-import-not-at-top
  from lm2_jax.train import loop  # pylint: disable=g-import-not-at-top

  echo = print if distributed.is_main_process() else lambda _: None
  try:
    cfg = config_lib.load_config(config_path, overrides)
  except config_lib.ConfigError as e:
    print(f"config error: {e}", file=sys.stderr)
    return 2
  try:
    result = loop.train(cfg, echo=echo, reshard_data=reshard_data)
  except config_lib.ConfigError as e:
    print(f"config error: {e}", file=sys.stderr)
    return 2
  except ckpt_lib.CheckpointSaveError as e:
    print(f"checkpoint error: {e}", file=sys.stderr)
    return 1
  except OSError as e:
    # The run directory's own files (metrics, config, final_eval) on a full or vanished disk.
    print(f"I/O error: {e}; metrics.jsonl keeps the rows written so far; fix the cause and rerun the "
          f"same command to resume from the newest checkpoint in {cfg.run_dir / 'checkpoints'}",
          file=sys.stderr)
    return 1
  return {"completed": 0, "interrupted": 0, "diverged": 1}[result.status]


if __name__ == "__main__":
  sys.exit(main(sys.argv[1:]))
