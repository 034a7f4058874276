"""Runs every command of README.md as a newcomer would, with small step counts, in a fresh copy of the repo.

    python scripts/readme_commands.py [--worktree] [--only TEXT] [--keep DIR]

The commands are the README's indented lines that start with `python ` (continued by a trailing `\\`),
and the cluster launch lines (`gcloud`, `srun`), which are listed as skipped.
Each runs through bash in a copy of the repository (`git archive HEAD`, or the working tree's tracked files
with `--worktree`), with this interpreter as `python`, on CPU. Only what a small run needs is changed:
training commands get small overrides appended (`train.steps=4 ...`, later overrides win), `--samples` and
the sweep shrink, and the README's placeholders become files made here: `runs/A` and `runs/NAME` are the
default run, `X.yaml` a tiny experiment, `data/*.txt`, `val.txt` and `questions.jsonl` small texts in the
bAbI vocabulary, `path/to/llama_dir` the tiny Hugging Face fixture. Training commands run first and the
BABILong builder before the evaluations that read its file; the rest in README order. Commands that need a
cluster, a TPU pod or lm-eval tasks are listed as skipped, with the reason.

Prints one line per command (ok / FAILED / skipped) with its wall time, keeps each command's output in
`<dir>/logs/`, and exits 1 when any command failed. It takes several minutes on a CPU, so it is not part of
the test suite.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import pathlib
import re
import shlex
import subprocess
import sys
import tempfile
import time

REPO = pathlib.Path(__file__).resolve().parents[1]
# Appended to every train.py command (later overrides win): a few steps, a small held-out set, no bar.
SMALL_TRAIN = ("train.steps=4 train.warmup_steps=1 checkpoint.every=2 logging.every=1 logging.eval_every=0 "
               "logging.progress=false data.train_size=256 data.eval_size=32")
# The tiny experiment behind the README's `X.yaml`: the default run, smaller, batch 8 (4 fake devices).
X_YAML = """base: {default}
name: x
model: {{d_model: 32, num_layers: 1, num_heads: 2, num_kv_heads: 2, mlp_dim: 64, num_slots: 8}}
train: {{batch_size: 8}}
"""
STORIES = ["Mary went to the kitchen. John took the apple there.", "Sandra journeyed to the garden.",
           "Daniel moved to the office. Mary picked up the milk."]
QUESTIONS = [{"question": "Mary went to the kitchen. Where is Mary?", "choices": ["kitchen", "garden"],
              "answer": "kitchen"},
             {"question": "John moved to the office. Where is John?", "choices": ["hallway", "office"],
              "answer": 1, "subject": "qa1"}]
# (pattern, reason): commands this script does not run.
SKIPS = (
    (r"-m venv", "environment set-up: this script runs in that environment"),
    (r"^(gcloud|srun) |--multihost|--coordinator", "needs several hosts (a TPU pod, Slurm or N machines)"),
    (r"lm2_jax\.eval\.harness", "needs lm-eval tasks (the TASKS placeholder); tests/test_harness.py runs it"),
)
# (pattern, replacement), applied in order to every command.
REWRITES = (
    (r"^python ", "{python} "),
    (r"--config configs/experiment/X\.yaml|--config X\.yaml", "--config X.yaml"),
    (r"runs/(A|NAME)\b", "runs/default"),
    (r"--samples \d+", "--samples 2"),
    (r"path/to/llama_dir", "tests/fixtures/hf_tiny_llama_untied_sharded"),
    (r"runs/memory-recall-length/keyed-s0", "runs/memory-recall-bound/slots-s0"),
    (r"(lm2_jax\.sweep \S+) --jobs \d+", r"\1 " + SMALL_TRAIN + " --jobs 1 --cells slots"),
    (r"(eval\.py recall .*)$", r"\1 --rows 8 --batch-size 8"),
)


@dataclasses.dataclass
class Command:
  """One README command: where it is, as written, and as this script runs it (None: skipped, `why`)."""

  line: int
  text: str
  run: str | None = None
  why: str = ""


def extract(readme: str) -> list[Command]:
  """The README's indented `python ...` lines (joined with their `\\` continuations), comments cut."""
  commands, lines = [], readme.splitlines()
  i = 0
  while i < len(lines):
    line = lines[i]
    start = i
    if re.match(r"^ {4,}(python |PY=|gcloud |srun )", line):
      text = line.strip()
      while text.endswith("\\") and i + 1 < len(lines):
        i += 1
        text = text[:-1].rstrip() + " " + lines[i].strip()
      text = re.sub(r"\s+#.*$", "", text)
      commands.append(Command(start + 1, text))
    i += 1
  return commands


def adapt(command: Command, python: str) -> Command:
  """Fills `run` (or `why`) of a README command: see the module docstring."""
  for pattern, why in SKIPS:
    if re.search(pattern, command.text):
      command.why = why
      return command
  text = command.text
  for pattern, replacement in REWRITES:
    text = re.sub(pattern, replacement.replace("{python}", shlex.quote(python)), text)
  if re.search(r"(^|\s)(\S*/)?train\.py(\s|$)", text):
    text += " " + SMALL_TRAIN
    if "lm2_jax.launch" in text:
      text += " name=x-2proc"   # not `x`: that run was trained by one process, with other overrides
  command.run = text
  return command


def phase(command: Command) -> int:
  """Training first, then the data builders, then the rest (README order within each)."""
  text = command.run or ""
  if re.search(r"\btrain\.py\b", text) and "lm2_jax.launch" not in text:
    return 0
  return 1 if "-m lm2_jax.data." in text else 2


def prepare(workdir: pathlib.Path, worktree: bool) -> None:
  """A copy of the repository at `workdir`, plus the files the README's placeholders stand for."""
  workdir.mkdir(parents=True)
  if worktree:
    files = subprocess.run(["git", "ls-files", "-z"], cwd=REPO, check=True, capture_output=True
                           ).stdout.decode().split("\0")
    for name in filter(None, files):
      source = REPO / name
      if source.is_file():
        (workdir / name).parent.mkdir(parents=True, exist_ok=True)
        (workdir / name).write_bytes(source.read_bytes())
  else:
    archive = subprocess.run(["git", "archive", "HEAD"], cwd=REPO, check=True, capture_output=True).stdout
    subprocess.run(["tar", "-x", "-C", str(workdir)], input=archive, check=True)
  x_yaml = X_YAML.format(default=(workdir / "configs/experiment/default.yaml"))
  (workdir / "X.yaml").write_text(x_yaml)
  (workdir / "configs/experiment/X.yaml").write_text(x_yaml)
  (workdir / "data").mkdir()
  for i, story in enumerate(STORIES):
    (workdir / "data" / f"{'abc'[i]}.txt").write_text(story + "\n")
  (workdir / "val.txt").write_text(" ".join(STORIES) + "\n")
  (workdir / "questions.jsonl").write_text("".join(json.dumps(q) + "\n" for q in QUESTIONS))


def main(argv: list[str]) -> int:
  parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
  parser.add_argument("--worktree", action="store_true",
                      help="copy the working tree's tracked files (default: the committed HEAD)")
  parser.add_argument("--only", default="", help="run only commands whose README text contains this")
  parser.add_argument("--keep", default=None, help="work in this (new) directory and keep it")
  args = parser.parse_args(argv)

  workdir = pathlib.Path(args.keep or tempfile.mkdtemp(prefix="readme_commands_")) / "repo"
  prepare(workdir, args.worktree)
  commands = [adapt(c, sys.executable) for c in extract((workdir / "README.md").read_text())]
  commands = [c for c in commands if args.only in c.text]
  logs = workdir.parent / "logs"
  logs.mkdir()
  env = dict(os.environ, JAX_PLATFORMS="cpu", HF_DATASETS_OFFLINE="1", PYTHONPATH=str(workdir))
  failed = 0
  for command in sorted(commands, key=phase):
    if command.run is None:
      print(f"skipped  README:{command.line}  {command.text}\n         ({command.why})")
      continue
    log = logs / f"line{command.line}.txt"
    start = time.perf_counter()
    with open(log, "w", encoding="utf-8") as out:
      out.write(f"$ {command.run}\n")
      out.flush()
      rc = subprocess.run(["bash", "-c", command.run], cwd=workdir, env=env, stdout=out,
                          stderr=subprocess.STDOUT, check=False).returncode
    status = "ok" if rc == 0 else f"FAILED (exit {rc})"
    failed += rc != 0
    print(f"{status:8} README:{command.line}  {command.text}  [{time.perf_counter() - start:.0f} s]")
    if rc != 0:
      print("         " + "\n         ".join(log.read_text().splitlines()[-15:]))
  print(f"{failed} failed; logs in {logs}")
  return 1 if failed else 0


if __name__ == "__main__":
  sys.exit(main(sys.argv[1:]))
