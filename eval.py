"""Evaluate LM2 checkpoints: BABILong accuracy tables, perplexity, multiple choice, memory attention maps.

    python eval.py --run runs/NAME --tasks qa1,qa2 --lengths 0k,1k,2k,4k      # BABILong (default)
    python eval.py --run runs/A --run runs/B --data babilong.jsonl             # compare checkpoints
    python eval.py perplexity --run runs/NAME --files data/val.txt
    python eval.py mc --run runs/NAME --file questions.jsonl
    python eval.py attention --run runs/NAME --task qa1 --length 1k --block 0

`python eval.py COMMAND --help` lists each command's flags.
"""

import logging
import sys

import absl.flags


def main(argv: list[str]) -> int:
  logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
  # Orbax logs through absl; a restore otherwise prints harmless metadata warnings.
  logging.getLogger("absl").setLevel(logging.ERROR)
  absl.flags.FLAGS.mark_as_parsed()
  from lm2_jax.eval import cli  # pylint: disable=g-import-not-at-top

  return cli.main(argv)


if __name__ == "__main__":
  sys.exit(main(sys.argv[1:]))
