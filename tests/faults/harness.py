"""Fault-injection trials of a tiny training run, shared by `tests/faults/` and `bench/faults.py`.

Each trial runs `train.py` (through `inject.py`) in subprocesses on a tiny qa1 run (30 steps, a checkpoint
every 5, two kept, asynchronous saves), injects one fault, lets the same command resume, and counts what a
pretraining user fears: a resumed run whose losses differ from an uninterrupted run's (bit for bit), a
finished checkpoint that the resume did not use (lost), a half-written checkpoint that restore picked up,
and tracebacks (uncaught exceptions) in the output.

Faults:
  kill_random   kill -9 at a uniformly random moment of the process, twice, then resume to the end
  kill_save     kill -9 while the asynchronous commit of the process's second checkpoint is in flight (its
                temporary directory written, not yet renamed; the first finished), twice
  kill_restore  a first kill -9 that leaves a checkpoint, then a kill -9 inside the restore of the next
                process
  cut_metrics   kill -9 at a random moment after the process's first checkpoint began, then metrics.jsonl
                ending in half a row (as a kill in the middle of writing it leaves), twice
  disk_full     the commit of a checkpoint fails with ENOSPC (on a real size-limited tmpfs where `mount`
                is allowed, else injected at Orbax's commit write): one-line report, exit 1, previous
                checkpoint and metrics rows kept; after the disk is freed the rerun resumes exactly
"""

from __future__ import annotations

import dataclasses
import json
import os
import pathlib
import random
import re
import shutil
import signal
import subprocess
import sys
import tempfile
import time

import yaml

REPO = pathlib.Path(__file__).resolve().parents[2]
INJECT = pathlib.Path(__file__).resolve().with_name("inject.py")
STEPS = 30
KEYS = ("step", "loss", "accuracy", "grad_norm", "lr")
# Subprocesses share one compilation cache: a trial's restarts then spend ~4 s each, not ~18 s.
CACHE = pathlib.Path(tempfile.gettempdir()) / f"lm2_jax_fault_cache_{os.getuid()}"
ATTEMPT_TIMEOUT_S = 300
# Seconds slept before each step of a process that is to be killed: 30 steps then take ~3 s of its ~8 s.
STEP_DELAY_S = 0.1


def experiment(runs_dir: pathlib.Path, name: str = "run", steps: int = STEPS) -> dict:
  """The tiny run: 1-block LM2 on qa1 word-token rows, 2 segments of 16, one CPU device."""
  return {
      "name": name, "runs_dir": str(runs_dir),
      "model": {"vocab_size": 384, "d_model": 32, "num_layers": 1, "num_heads": 4, "num_kv_heads": 2,
                "mlp_dim": 64, "segment_length": 16, "use_memory": True, "num_slots": 8,
                "memory_heads": 2},
      # decay_steps fixed: the schedule must not depend on `steps`, which some trials change.
      "train": {"steps": steps, "batch_size": 4, "warmup_steps": 2, "decay_steps": 1000},
      "data": {"kind": "qa", "task": "qa1", "num_segments": 2, "train_size": 64, "eval_size": 8,
               "num_sentences": 1, "tokenizer": "words"},
      "mesh": {"data": 1, "num_devices": 1},
      "checkpoint": {"every": 5, "keep": 2, "async_save": True},
      "logging": {"every": 1, "progress": False, "tensorboard": False, "peak_flops": 1e9},
  }


def write_config(path: pathlib.Path, cfg: dict) -> pathlib.Path:
  path.write_text(yaml.safe_dump(cfg))
  return path


def _env(events: pathlib.Path | None = None, save_delay: float = 0.0, restore_delay: float = 0.0,
         enospc_from: int | None = None, step_delay: float = 0.0) -> dict:
  env = {k: v for k, v in os.environ.items() if not k.startswith("LM2_FAULT_")}
  # Unbuffered: a killed process's "resumed ... from step N" line must reach the log.
  env.update(PYTHONPATH=str(REPO), JAX_PLATFORMS="cpu", JAX_COMPILATION_CACHE_DIR=str(CACHE),
             XLA_FLAGS="--xla_force_host_platform_device_count=1", PYTHONUNBUFFERED="1")
  faults = {"EVENTS": events, "SAVE_DELAY": save_delay, "RESTORE_DELAY": restore_delay,
            "ENOSPC_FROM": enospc_from, "STEP_DELAY": step_delay}
  env.update({f"LM2_FAULT_{k}": str(v) for k, v in faults.items() if v})
  return env


@dataclasses.dataclass
class Attempt:
  """One process of a trial: its exit code (-9 when killed), output, and the step it resumed from."""

  returncode: int
  output: str
  resumed_from: int | None
  killed: bool


def _start(config: pathlib.Path, log: pathlib.Path, **env) -> subprocess.Popen:
  with open(log, "w", encoding="utf-8") as out:
    return subprocess.Popen([sys.executable, str(INJECT), "--config", str(config)], cwd=REPO,
                            env=_env(**env), stdout=out, stderr=subprocess.STDOUT)


def _finish(proc: subprocess.Popen, log: pathlib.Path, killed: bool) -> Attempt:
  proc.wait(timeout=ATTEMPT_TIMEOUT_S)
  text = log.read_text(encoding="utf-8", errors="replace")
  resumed = [int(line.rsplit(" ", 1)[1]) for line in text.splitlines()
             if line.startswith("resumed ") and " from step " in line]
  return Attempt(proc.returncode, text, resumed[0] if resumed else None, killed)


def run_once(config: pathlib.Path, log: pathlib.Path, **env) -> Attempt:
  """Runs the config to its end (or its own failure)."""
  return _finish(_start(config, log, **env), log, killed=False)


def _wait_for_event(proc: subprocess.Popen, events: pathlib.Path, pattern: str, deadline: float,
                    count: int = 1) -> bool:
  """True once `events` has `count` lines matching `pattern` at their start (False: the process ended)."""
  while time.time() < deadline and proc.poll() is None:
    if events.exists():
      lines = [l for l in events.read_text().splitlines() if re.match(pattern, l)]
      if len(lines) >= count:
        return True
    time.sleep(0.01)
  return False


def _kill(proc: subprocess.Popen) -> bool:
  if proc.poll() is not None:
    return False
  proc.send_signal(signal.SIGKILL)
  return True


def finished_steps(run_dir: pathlib.Path) -> list[int]:
  """Checkpoint steps on disk that restore may use (plain step names; Orbax's temporaries have suffixes)."""
  ckpts = run_dir / "checkpoints"
  return sorted(int(p.name) for p in ckpts.iterdir() if p.name.isdigit()) if ckpts.is_dir() else []


def half_written(run_dir: pathlib.Path) -> list[str]:
  """Plain step directories without Orbax's commit marker: a restore would try a half-written checkpoint."""
  return [str(run_dir / "checkpoints" / str(s)) for s in finished_steps(run_dir)
          if not (run_dir / "checkpoints" / str(s) / "commit_success.txt").is_file()]


def train_rows(run_dir: pathlib.Path) -> list[tuple]:
  """(step, loss, accuracy, grad_norm, lr) of every train row of metrics.jsonl, in file order."""
  from lm2_jax.train import metrics as metrics_lib  # pylint: disable=g-import-not-at-top

  return [tuple(r[k] for k in KEYS) for r in metrics_lib.read_metrics(run_dir, "train")]


def uncaught(text: str) -> int:
  return text.count("Traceback (most recent call last)")


@dataclasses.dataclass
class TrialResult:
  """Counts of one trial.

  Attributes:
    fault: the fault's name (module docstring).
    injected: faults that landed (kills that hit a live process, failed saves).
    resumed_exactly: the final run's train rows equal the uninterrupted run's, steps 1..STEPS once each.
    resumes: processes that resumed from a checkpoint (a trial whose runs all started afresh tests
      nothing about resuming).
    checkpoints_lost: resumes that started from an older step than the newest finished checkpoint, plus
      checkpoints that were on disk before a failed save and gone after it.
    half_written: plain step directories without a commit marker, and restores that had to fall back.
    uncaught: tracebacks in the output of the processes.
    notes: what went wrong, for the report.
  """

  fault: str
  injected: int = 0
  resumes: int = 0
  resumed_exactly: bool = False
  checkpoints_lost: int = 0
  half_written: int = 0
  uncaught: int = 0
  notes: list[str] = dataclasses.field(default_factory=list)


def reference(root: pathlib.Path) -> tuple[list[tuple], float]:
  """(train rows, wall seconds) of the uninterrupted run; the seconds are those of a second run, after
  the first has filled the compilation cache, as every later attempt finds it."""
  root.mkdir(parents=True, exist_ok=True)
  config = write_config(root / "reference.yaml", experiment(root / "reference"))
  attempt = run_once(config, root / "reference.log")
  if attempt.returncode != 0:
    raise RuntimeError(f"the reference run failed:\n{attempt.output[-3000:]}")
  timing = write_config(root / "timing.yaml", experiment(root / "timing"))
  start = time.time()
  run_once(timing, root / "timing.log", step_delay=STEP_DELAY_S)
  return train_rows(root / "reference" / "run"), time.time() - start


def kill_trial(root: pathlib.Path, fault: str, expected: list[tuple], wall_s: float, rng: random.Random,
               kills: int = 2) -> TrialResult:
  """`kills` kill -9s of the kind `fault` names, each followed by the same command, then a run to the end.

  A process that ends before its kill lands (a slow machine) is followed by another attempt, at most
  `kills + 3` in all; `injected` counts the kills that hit a live process.
  """
  result = TrialResult(fault)
  run_dir = root / "run"
  config = write_config(root / "run.yaml", experiment(root))
  attempts: list[Attempt] = []
  newest_at_kill: list[int | None] = []
  for i in range(kills + 3):
    if result.injected == kills:
      break
    events, log = root / f"events{i}.txt", root / f"attempt{i}.log"
    in_restore = fault == "kill_restore" and bool(finished_steps(run_dir))
    began = time.time()
    proc = _start(config, log, events=events, step_delay=STEP_DELAY_S,
                  save_delay=1.0 if fault == "kill_save" else 0.0,
                  restore_delay=0.5 if in_restore else 0.0)
    deadline = time.time() + ATTEMPT_TIMEOUT_S
    if fault == "kill_save":
      # The commit of this process's second checkpoint (its step directory; "save -1" lines are the
      # items'): the first is finished (Orbax waits for it), so the rerun resumes from a checkpoint.
      ok = _wait_for_event(proc, events, r"save [1-9]", deadline, count=2)
      time.sleep(rng.uniform(0.05, 0.9))  # inside the 1 s commit window
    elif in_restore:
      ok = _wait_for_event(proc, events, r"restore", deadline)
      time.sleep(rng.uniform(0.0, 0.7))   # inside the 0.5 s delay or the restore right after it
    elif fault == "kill_restore":
      ok = _wait_for_event(proc, events, r"save 5 ", deadline)  # first leave a checkpoint to restore
      time.sleep(0.3)
    elif fault == "cut_metrics":
      # A random moment after the first checkpoint began: the resume then has rows to drop and keep.
      ok = _wait_for_event(proc, events, r"save [1-9]", deadline)
      time.sleep(rng.uniform(0.0, max(0.5, wall_s - (time.time() - began))))
    else:
      ok = True
      time.sleep(rng.uniform(0.3, wall_s))
    killed = ok and _kill(proc)
    attempts.append(_finish(proc, log, killed))
    result.injected += int(killed)
    newest_at_kill.append(finished_steps(run_dir)[-1] if finished_steps(run_dir) else None)
    if killed and fault == "cut_metrics" and (run_dir / "metrics.jsonl").is_file():
      _cut_last_line(run_dir / "metrics.jsonl")
    result.half_written += len(half_written(run_dir))
    if not killed:
      # Finished before the kill: the trial restarts from nothing, or its later kills hit a finished run;
      # later random kills fall within the lifetime this attempt had (the machine is faster than timed).
      shutil.rmtree(run_dir, ignore_errors=True)
      wall_s = max(0.5, min(wall_s, log.stat().st_mtime - began))   # its last output: about its end
  final = run_once(config, root / "final.log")
  attempts.append(final)
  for i, attempt in enumerate(attempts[1:]):
    newest = newest_at_kill[i]
    # A process killed inside its restore never says where it resumed; one that did must name the newest.
    started_fresh = attempt.resumed_from is None and not attempt.killed
    if newest is not None and attempts[i].killed and (started_fresh or (attempt.resumed_from or newest)
                                                      < newest):
      result.checkpoints_lost += 1
      result.notes.append(f"attempt {i + 1} resumed from {attempt.resumed_from}, newest was {newest}")
    result.half_written += attempt.output.count("cannot be restored")
  result.uncaught = sum(uncaught(a.output) for a in attempts)
  result.resumes = sum(a.resumed_from is not None for a in attempts)
  rows = train_rows(run_dir) if final.returncode == 0 else []
  result.resumed_exactly = final.returncode == 0 and rows == expected
  if not result.resumed_exactly:
    result.notes.append(f"final exit {final.returncode}; rows {len(rows)} vs {len(expected)}: "
                        f"{final.output[-1500:]}")
  return result


def _cut_last_line(path: pathlib.Path) -> None:
  """Leaves the file as a kill in the middle of writing its next row would: that row's first half.

  (Cutting a row that was whole when a checkpoint after its step finished is not a kill: that row was
  flushed before the checkpoint began, and no rerun writes it again.)
  """
  data = path.read_bytes()
  if not data.endswith(b"\n"):
    return  # empty, or the kill itself cut a row
  row = json.loads(data.rstrip(b"\n").rsplit(b"\n", 1)[-1])
  row["step"] += 1
  following = json.dumps(row).encode()
  path.write_bytes(data + following[:len(following) // 2])


def can_mount_tmpfs(where: pathlib.Path) -> bool:
  """True when this process may mount a tmpfs (root with CAP_SYS_ADMIN); leaves nothing mounted."""
  if shutil.which("mount") is None or os.geteuid() != 0:
    return False
  where.mkdir(parents=True, exist_ok=True)
  ok = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=1m", "tmpfs", str(where)],
                      capture_output=True).returncode == 0
  if ok:
    subprocess.run(["umount", str(where)], check=True)
  return ok


def disk_full_trial(root: pathlib.Path, expected: list[tuple], real_disk: bool) -> TrialResult:
  """Checkpoints 5 and 10, then a disk with no room for checkpoint 15: a one-line error, exit 1,
  checkpoints 5 and 10 and the metrics rows kept; then room again: the rerun resumes from 10 exactly.

  real_disk: the run directory lives on a 3 MiB tmpfs filled with a ballast file (a genuine ENOSPC from
  TensorStore's writes); otherwise Orbax's commit write fails with an injected ENOSPC.
  """
  result = TrialResult("disk_full" + ("" if real_disk else "_injected"))
  mount = root / "disk"
  mount.mkdir(parents=True, exist_ok=True)
  if real_disk:
    subprocess.run(["mount", "-t", "tmpfs", "-o", "size=3m", "tmpfs", str(mount)], check=True)
  try:
    run_dir = mount / "run"
    first = run_once(write_config(root / "ten.yaml", experiment(mount, steps=10)), root / "first.log")
    ballast = mount / "ballast"
    if real_disk:
      free = shutil.disk_usage(mount).free
      # 256 KiB left: metrics rows and the config fit, a 470 KiB checkpoint does not.
      with open(ballast, "wb") as f:
        os.posix_fallocate(f.fileno(), 0, free - (256 << 10))
    before = finished_steps(run_dir)
    rows_before = train_rows(run_dir)
    config = write_config(root / "full.yaml", experiment(mount))
    full = run_once(config, root / "full.log", enospc_from=None if real_disk else 15)
    result.injected = int(full.returncode != 0)
    after = finished_steps(run_dir)
    result.checkpoints_lost = len(set(before) - set(after))
    result.half_written = len(half_written(run_dir))
    rows_full = train_rows(run_dir)
    errors = [l for l in full.output.splitlines() if l.startswith("checkpoint error: saving checkpoint step")]
    reported = (full.returncode == 1 and len(errors) == 1 and "No space left on device" in errors[0]
                and before == [5, 10] == after)
    kept_rows = rows_full[:len(rows_before)] == rows_before == expected[:10] and \
        rows_full == expected[:len(rows_full)]
    if not (reported and kept_rows):
      result.notes.append(f"full disk: exit {full.returncode}, steps {before} -> {after}, rows "
                          f"{len(rows_before)} -> {len(rows_full)}: {full.output[-1500:]}")
    if ballast.exists():
      ballast.unlink()
    again = run_once(config, root / "again.log")
    result.uncaught = sum(uncaught(a.output) for a in (first, full, again))
    result.resumes = sum(a.resumed_from is not None for a in (full, again))
    if again.resumed_from != 10:
      result.checkpoints_lost += 1
      result.notes.append(f"the rerun resumed from {again.resumed_from}, not 10")
    result.resumed_exactly = (reported and kept_rows and again.returncode == 0
                              and train_rows(run_dir) == expected)
  finally:
    if real_disk:
      subprocess.run(["umount", str(mount)], check=True)
  return result


def summary(results: list[TrialResult]) -> list[dict]:
  """One row per fault: trials, faults injected, resumes, exact trials, checkpoints lost, half-written,
  tracebacks."""
  rows = {}
  for r in results:
    row = rows.setdefault(r.fault, {"fault": r.fault, "trials": 0, "injected": 0, "resumes": 0,
                                    "resumed_exactly": 0, "checkpoints_lost": 0, "half_written": 0,
                                    "uncaught": 0})
    row["trials"] += 1
    row["injected"] += r.injected
    row["resumes"] += r.resumes
    row["resumed_exactly"] += int(r.resumed_exactly)
    row["checkpoints_lost"] += r.checkpoints_lost
    row["half_written"] += r.half_written
    row["uncaught"] += r.uncaught
  return list(rows.values())


def format_table(rows: list[dict]) -> str:
  header = ("fault", "trials", "injected", "resumes", "resumed_exactly", "checkpoints_lost", "half_written",
            "uncaught")
  lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
  lines += ["| " + " | ".join(str(r[h]) for h in header) + " |" for r in rows]
  return "\n".join(lines)


def to_json(results: list[TrialResult]) -> str:
  return json.dumps([dataclasses.asdict(r) for r in results], indent=1)
