"""Fault injection with more trials than the CI suite: prints the counted table of docs/faults.md.

    python bench/faults.py --trials 5                       # every fault, 5 trials each
    python bench/faults.py --trials 20 --faults kill_random,kill_save --fuzz-examples 0

Per trial of a kill fault: two kill -9s of its kind, each followed by the same command, then a run to the
end; a disk-full trial fills the disk during a save, then frees it and reruns (tests/faults/harness.py has
the details). Every trial is compared with one uninterrupted run, bit for bit. The start-up faults (a cut
corpus line, a changed corpus, unreadable tokenizers, meshes that do not fit) run as the cases of
tests/faults/test_faults_input.py, and the fuzz as tests/faults/test_fuzz_cli.py with
`--fuzz-examples` random (not derandomized) examples per command line.
Seconds per trial on a 2-core CPU: ~20 (kills), ~20 (disk full); the whole default set ~10 minutes.
"""

from __future__ import annotations

import argparse
import os
import pathlib
import random
import re
import subprocess
import sys
import tempfile
import time

ROOT = pathlib.Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "tests" / "faults"))
sys.path.insert(0, str(ROOT))
import harness  # noqa: E402

KILLS = ("kill_random", "kill_save", "kill_restore", "cut_metrics")
FAULTS = KILLS + ("disk_full", "input", "fuzz")
FUZZ_TARGETS = 5  # config loader, train.py, eval.py, babilong, convert


def _pytest(test_file: str, env: dict) -> tuple[int, int, str]:
  """(passed, failed, output) of one tests/faults file run by pytest in a subprocess."""
  proc = subprocess.run([sys.executable, "-m", "pytest", "-q", "-n", "0", "-p", "no:cacheprovider",
                         f"tests/faults/{test_file}"], cwd=ROOT, env={**os.environ, **env},
                        capture_output=True, text=True)
  counts = {k: int(n) for n, k in re.findall(r"(\d+) (passed|failed)", proc.stdout)}
  return counts.get("passed", 0), counts.get("failed", 0), proc.stdout[-3000:]


def _row(fault: str, trials: int, uncaught) -> dict:
  """A table row of cases that end in a message, not a resume."""
  return {"fault": fault, "trials": trials, "injected": trials, "resumes": "-", "resumed_exactly": "-",
          "checkpoints_lost": 0, "half_written": 0, "uncaught": uncaught}


def main(argv: list[str] | None = None) -> int:
  parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
  parser.add_argument("--trials", type=int, default=5, help="trials per kill / disk-full fault")
  parser.add_argument("--faults", default=",".join(FAULTS), help=f"comma-separated subset of {FAULTS}")
  parser.add_argument("--fuzz-examples", type=int, default=500, help="examples per fuzzed command line")
  parser.add_argument("--seed", type=int, default=0)
  parser.add_argument("--keep", action="store_true", help="keep the trial directories (printed)")
  args = parser.parse_args(argv)
  faults = [f.strip() for f in args.faults.split(",") if f.strip()]
  unknown = sorted(set(faults) - set(FAULTS))
  if unknown or args.trials < 1 or args.fuzz_examples < 0:
    print(f"error: --faults {unknown} not in {FAULTS}, or --trials < 1, or --fuzz-examples < 0",
          file=sys.stderr)
    return 2
  rng = random.Random(args.seed)
  work = pathlib.Path(tempfile.mkdtemp(prefix="lm2_faults_"))
  results: list[harness.TrialResult] = []
  extra_rows: list[dict] = []
  start = time.time()
  if any(f in KILLS or f == "disk_full" for f in faults):
    expected, wall_s = harness.reference(work / "reference")
    print(f"uninterrupted run: {len(expected)} steps, {wall_s:.1f} s with the kill trials' step delay",
          flush=True)
  real_disk = harness.can_mount_tmpfs(work / "probe")
  for fault in faults:
    for trial in range(args.trials if fault in KILLS or fault == "disk_full" else 0):
      root = work / f"{fault}-{trial}"
      root.mkdir()
      if fault == "disk_full":
        result = harness.disk_full_trial(root, expected, real_disk)
      else:
        result = harness.kill_trial(root, fault, expected, wall_s, random.Random(rng.random()))
      results.append(result)
      print(f"{result.fault} trial {trial}: injected {result.injected}, resumes {result.resumes}, exact "
            f"{result.resumed_exactly}, "
            f"lost {result.checkpoints_lost}, half-written {result.half_written}, tracebacks "
            f"{result.uncaught}{'; ' + ' | '.join(result.notes)[:500] if result.notes else ''}", flush=True)
  if "input" in faults:
    passed, failed, out = _pytest("test_faults_input.py", {})
    extra_rows.append(_row("bad input at start-up / resume (cases)", passed + failed, failed))
    if failed:
      print(out)
  if "fuzz" in faults and args.fuzz_examples:
    passed, failed, out = _pytest("test_fuzz_cli.py", {"LM2_FUZZ_EXAMPLES": str(args.fuzz_examples)})
    # Hypothesis stops a target at its first failure: a failed target counts one uncaught exception.
    extra_rows.append(_row("fuzzed config / command lines (examples)", args.fuzz_examples * FUZZ_TARGETS,
                           f">= {failed}" if failed else 0))
    if failed:
      print(out)
  print()
  print(harness.format_table(harness.summary(results) + extra_rows))
  print(f"\n{time.time() - start:.0f} s; disk full on a real tmpfs: {real_disk}; trial directories: "
        f"{work if args.keep else 'deleted'}")
  (work / "trials.json").write_text(harness.to_json(results))
  if not args.keep:
    subprocess.run(["rm", "-rf", str(work)], check=False)
  bad = any(not r.resumed_exactly or r.checkpoints_lost or r.half_written or r.uncaught for r in results)
  return 1 if bad or any(r["uncaught"] for r in extra_rows) else 0


if __name__ == "__main__":
  sys.exit(main())
