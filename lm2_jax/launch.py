"""Run N cooperating processes of one command on this machine: a local multi-host run.

    python -m lm2_jax.launch --processes 2 --devices-per-process 2 -- train.py --config X.yaml k=v
    python -m lm2_jax.launch --processes 2 -- eval.py --run runs/X

The launcher picks a free port on 127.0.0.1 and starts each process with LM2_COORDINATOR,
LM2_NUM_PROCESSES and LM2_PROCESS_ID set (read by `lm2_jax.distributed`); `--devices-per-process N` also
sets LM2_CPU_DEVICES=N and JAX_PLATFORMS=cpu, so the run has N * processes fake CPU devices. Every output
line is echoed with a `[pI]` prefix. When one process fails (non-zero exit) the others are stopped
(SIGTERM, then SIGKILL after `--grace` seconds) and the launcher exits with the failed process's code; it
exits 124 when `--timeout` passes. A command that ends in `.py` runs under this Python interpreter.

This is for one machine (tests, debugging). On a TPU pod slice or a GPU cluster, start one process per
host with the scheduler and `--multihost` or explicit `--coordinator` flags (README, "Multi-host runs").
"""

from __future__ import annotations

import argparse
import os
import signal
import socket
import subprocess
import sys
import threading
import time
from typing import IO, Sequence

EXIT_TIMEOUT = 124
_XLA_DEVICE_FLAG = "--xla_force_host_platform_device_count"


def free_port() -> int:
  """A TCP port on 127.0.0.1 that was free a moment ago (the OS picks it)."""
  with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
    s.bind(("127.0.0.1", 0))
    return s.getsockname()[1]


def process_env(base: dict, process_id: int, num_processes: int, port: int,
                devices_per_process: int = 0, heartbeat_timeout: int | None = None) -> dict:
  """The environment of process `process_id`: `base` plus the LM2_* variables of the run."""
  env = dict(base)
  env.update(LM2_COORDINATOR=f"127.0.0.1:{port}", LM2_NUM_PROCESSES=str(num_processes),
             LM2_PROCESS_ID=str(process_id), PYTHONUNBUFFERED="1")
  if devices_per_process:
    env.update(LM2_CPU_DEVICES=str(devices_per_process), JAX_PLATFORMS="cpu")
    # An inherited forced device count (e.g. from a test session) would override LM2_CPU_DEVICES.
    flags = [f for f in env.get("XLA_FLAGS", "").split() if not f.startswith(_XLA_DEVICE_FLAG)]
    env["XLA_FLAGS"] = " ".join(flags)
  if heartbeat_timeout:
    env["LM2_HEARTBEAT_TIMEOUT"] = str(heartbeat_timeout)
  return env


def _pump(stream: IO[str], prefix: str, out: IO[str], lock: threading.Lock) -> None:
  for line in iter(stream.readline, ""):
    with lock:
      out.write(f"{prefix}{line if line.endswith(chr(10)) else line + chr(10)}")
      out.flush()
  stream.close()


def _stop(procs: list[subprocess.Popen], grace: float) -> None:
  """SIGTERM every live process group we started, then SIGKILL whatever outlives `grace` seconds."""
  live = [p for p in procs if p.poll() is None]
  for p in live:
    _signal_group(p, signal.SIGTERM)
  deadline = time.monotonic() + grace
  for p in live:
    try:
      p.wait(timeout=max(0.0, deadline - time.monotonic()))
    except subprocess.TimeoutExpired:
      _signal_group(p, signal.SIGKILL)
      p.wait()


def _signal_group(p: subprocess.Popen, sig: int) -> None:
  # Each child leads its own session, so its group holds it and its helpers (Grain workers) only.
  try:
    os.killpg(p.pid, sig)
  except ProcessLookupError:
    pass


def launch(command: Sequence[str], processes: int, devices_per_process: int = 0, *,
           port: int | None = None, timeout: float | None = None, grace: float = 10.0,
           heartbeat_timeout: int | None = None, out: IO[str] | None = None,
           cwd: str | None = None) -> int:
  """Runs `processes` copies of `command` as one multi-process run; returns the run's exit code.

  Args:
    command: the program and its arguments; a leading `*.py` runs under `sys.executable`.
    processes: how many processes.
    devices_per_process: fake CPU devices per process (0: the platform's devices, no CPU forcing).
    port: the coordinator port (default: a free one).
    timeout: seconds before every process is stopped and 124 returned (None: no limit).
    grace: seconds between SIGTERM and SIGKILL when stopping.
    heartbeat_timeout: passed as LM2_HEARTBEAT_TIMEOUT (None: the runtime's default).
    out: where prefixed output goes (default: stdout).
    cwd: working directory of the processes.

  Returns:
    0 if every process exited 0; else the first failure's code (a negative signal number stays
    negative), or 124 on timeout.
  """
  if processes < 1:
    raise ValueError(f"--processes must be >= 1, got {processes}")
  if not command:
    raise ValueError("no command given; put it after `--`, e.g. `-- train.py --config X.yaml`")
  command = list(command)
  if command[0].endswith(".py"):
    command = [sys.executable, *command]
  out = sys.stdout if out is None else out
  port = port or free_port()
  lock = threading.Lock()
  procs, pumps = [], []
  try:
    for i in range(processes):
      env = process_env(os.environ, i, processes, port, devices_per_process, heartbeat_timeout)
      p = subprocess.Popen(command, env=env, cwd=cwd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                           text=True, bufsize=1, start_new_session=True)
      procs.append(p)
      t = threading.Thread(target=_pump, args=(p.stdout, f"[p{i}] ", out, lock), daemon=True)
      t.start()
      pumps.append(t)
    deadline = None if timeout is None else time.monotonic() + timeout
    code = None
    while code is None:
      codes = [p.poll() for p in procs]
      failed = [(i, c) for i, c in enumerate(codes) if c not in (None, 0)]
      if failed:
        i, code = failed[0]
        with lock:
          out.write(f"[launch] process {i} exited with {code}; stopping the others\n")
      elif all(c == 0 for c in codes):
        code = 0
      elif deadline is not None and time.monotonic() > deadline:
        with lock:
          out.write(f"[launch] timeout after {timeout:.0f} s; stopping every process\n")
        code = EXIT_TIMEOUT
      else:
        time.sleep(0.1)
  finally:
    _stop(procs, grace)
    for t in pumps:
      t.join(timeout=5)
  return code


def main(argv: Sequence[str] | None = None) -> int:
  argv = list(sys.argv[1:] if argv is None else argv)
  if "--" in argv:
    split = argv.index("--")
    own, command = argv[:split], argv[split + 1:]
  else:
    own, command = argv, []
  parser = argparse.ArgumentParser(prog="python -m lm2_jax.launch", description=__doc__,
                                   formatter_class=argparse.RawDescriptionHelpFormatter)
  parser.add_argument("--processes", type=int, required=True, help="processes to start")
  parser.add_argument("--devices-per-process", type=int, default=0,
                      help="fake CPU devices per process (forces the CPU platform)")
  parser.add_argument("--port", type=int, default=None, help="coordinator port (default: a free one)")
  parser.add_argument("--timeout", type=float, default=None, help="stop everything after S seconds")
  parser.add_argument("--grace", type=float, default=10.0, help="seconds from SIGTERM to SIGKILL")
  parser.add_argument("--heartbeat-timeout", type=int, default=None,
                      help="seconds of silence after which the run declares a process dead")
  args = parser.parse_args(own)
  try:
    code = launch(command, args.processes, args.devices_per_process, port=args.port,
                  timeout=args.timeout, grace=args.grace, heartbeat_timeout=args.heartbeat_timeout)
  except ValueError as e:
    parser.error(str(e))
  # A child killed by signal N reports -N; a shell status must be in [0, 255].
  return code if code >= 0 else 128 - code


if __name__ == "__main__":
  sys.exit(main())
