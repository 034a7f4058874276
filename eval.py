"""Evaluate LM2 checkpoints: BABILong accuracy tables, perplexity, multiple choice, memory attention maps.

    python eval.py --run runs/NAME --tasks qa1,qa2 --lengths 0k,1k,2k,4k      # BABILong (default)
    python eval.py --run runs/A --run runs/B --data babilong.jsonl             # compare checkpoints
    python eval.py perplexity --run runs/NAME --files data/val.txt
    python eval.py mc --run runs/NAME --file questions.jsonl
    python eval.py attention --run runs/NAME --task qa1 --length 1k --block 0

`python eval.py COMMAND --help` lists each command's flags. Started as part of a multi-process run
(`--multihost`, `--coordinator/--num-processes/--process-id` or the LM2_* variables, as for train.py),
every process joins the run and evaluates; only process 0 prints and writes results (the others write
into a temporary directory that is deleted).
"""

import argparse
import contextlib
import io
import logging
import sys
import tempfile

import absl.flags

from lm2_jax import distributed


def main(argv: list[str]) -> int:
  logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
  # Orbax logs through absl; a restore otherwise prints harmless metadata warnings.
  logging.getLogger("absl").setLevel(logging.ERROR)
  # The multi-process flags are taken out first: joining must precede any JAX backend call.
  parser = argparse.ArgumentParser(add_help=False)
  distributed.add_arguments(parser)
  dist_args, rest = parser.parse_known_args(argv)
  code = distributed.join(dist_args)
  if code is not None:
    return code
  absl.flags.FLAGS.mark_as_parsed()
  from lm2_jax.eval import cli  # pylint: disable=g-import-not-at-top

  if distributed.is_main_process():
    return distributed.exit_fast_on_failure(lambda: cli.main(rest))

  def quiet() -> int:
    # Later flags win in argparse: this process's results and bars go nowhere.
    with tempfile.TemporaryDirectory() as scratch, contextlib.redirect_stdout(io.StringIO()):
      return cli.main([*rest, "--out", scratch, "--no-progress"])
  return distributed.exit_fast_on_failure(quiet)


if __name__ == "__main__":
  sys.exit(main(sys.argv[1:]))
