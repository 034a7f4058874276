"""Train (or resume) an LM2 run.

    python train.py                                          # configs/experiment/default.yaml
    python train.py --config configs/experiment/X.yaml train.steps=200 model.use_memory=false

Overrides are dotted key=value pairs (values parsed as YAML). Outputs go to runs/<name>/: the resolved
config, metrics.jsonl, TensorBoard events, checkpoints and final_eval.json. Rerunning the same command
resumes from the newest checkpoint; SIGTERM / Ctrl-C save a checkpoint first.
"""

import argparse
import logging
import sys

import absl.flags

DEFAULT_CONFIG = "configs/experiment/default.yaml"


def main(argv: list[str]) -> int:
  parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
  parser.add_argument("--config", default=DEFAULT_CONFIG, help="experiment YAML file")
  parser.add_argument("overrides", nargs="*", help="dotted key=value overrides, e.g. train.steps=200")
  args = parser.parse_args(argv)
  logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
  # Grain worker processes read absl flags; this entry point has no absl command line.
  absl.flags.FLAGS.mark_as_parsed()

  from lm2_jax.train import config as config_lib  # pylint: disable=g-import-not-at-top
  from lm2_jax.train import loop  # pylint: disable=g-import-not-at-top

  try:
    cfg = config_lib.load_config(args.config, args.overrides)
  except config_lib.ConfigError as e:
    print(f"config error: {e}", file=sys.stderr)
    return 2
  try:
    result = loop.train(cfg)
  except config_lib.ConfigError as e:
    print(f"config error: {e}", file=sys.stderr)
    return 2
  return {"completed": 0, "interrupted": 0, "diverged": 1}[result.status]


if __name__ == "__main__":
  sys.exit(main(sys.argv[1:]))
