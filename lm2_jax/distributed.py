"""Joining a multi-process (multi-host) run: the first thing `train.py` and `eval.py` do.

A run is single-process unless one of these is given (flags win over environment variables):

* `--multihost` / `LM2_MULTIHOST=1`: `jax.distributed.initialize()` with the platform's auto-detection
  (Cloud TPU pod slices, Slurm, Open MPI, mpi4py; see `jax._src.clusters`).
* `--coordinator HOST:PORT --num-processes N --process-id I` / `LM2_COORDINATOR`, `LM2_NUM_PROCESSES`,
  `LM2_PROCESS_ID`: explicit values, for CPU hosts or bare GPU clusters (no scheduler to detect).

`--cpu-devices N` / `LM2_CPU_DEVICES` gives each process N fake CPU devices (local testing). All of this
must run before any JAX call that touches the backend (even `jax.devices()`): the backend is created once,
and `jax.distributed.initialize` afterwards raises. `python -m lm2_jax.launch` sets the environment
variables for N local processes.

Failure detection: every process heartbeats to the coordinator (process 0). A process that stops (killed,
crashed, hung host) is declared dead after `--heartbeat-timeout` seconds and the coordination service
terminates the others with an error naming the dead task, so no survivor waits forever in a collective
(a broken gloo / NCCL connection usually fails them sooner). A process that fails with an error (e.g. a
config error on one host) leaves at once through `exit_fast_on_failure` and is detected the same way.
Measured on this 2-core machine (2 CPU processes): a survivor exits ~0.2 s after its peer is SIGKILLed
mid-training, and ~10 s after it with nothing in flight and a 10 s heartbeat timeout.
"""

from __future__ import annotations

import argparse
import dataclasses
import logging
import os
import sys
import traceback
from typing import Callable, Mapping

import jax

log = logging.getLogger(__name__)

ENV_PREFIX = "LM2_"


class DistributedError(ValueError):
  """Inconsistent or incomplete multi-process settings (the message names the flag / variable)."""


@dataclasses.dataclass(frozen=True)
class DistributedOptions:
  """How this process joins a run.

  Attributes:
    mode: `single` (no distributed runtime), `explicit` (coordinator, counts given) or `auto` (cluster
      auto-detection by `jax.distributed.initialize()`).
    coordinator: `host:port` of process 0's coordination service (explicit mode).
    num_processes: processes in the run (explicit mode).
    process_id: this process, in [0, num_processes) (explicit mode).
    cpu_devices: fake CPU devices of this process (0: the platform default).
    init_timeout_s: how long to wait for every process to join.
    heartbeat_timeout_s: silence after which a process is declared dead and the run fails.
    shutdown_timeout_s: how long a finishing process waits for the others at exit.
  """

  mode: str = "single"
  coordinator: str | None = None
  num_processes: int | None = None
  process_id: int | None = None
  cpu_devices: int = 0
  init_timeout_s: int = 300
  heartbeat_timeout_s: int = 60
  shutdown_timeout_s: int = 120


def add_arguments(parser: argparse.ArgumentParser) -> None:
  """Adds the multi-process flags (each also read from the LM2_* variable named in its help)."""
  group = parser.add_argument_group("multi-process runs (flags override LM2_* environment variables)")
  group.add_argument("--multihost", action="store_true", default=None,
                     help="join a TPU pod / Slurm / MPI run by auto-detection (LM2_MULTIHOST=1)")
  group.add_argument("--coordinator", default=None, metavar="HOST:PORT",
                     help="process 0's address and a free port, the same on every process "
                          "(LM2_COORDINATOR)")
  group.add_argument("--num-processes", type=int, default=None, metavar="N",
                     help="processes in the run (LM2_NUM_PROCESSES)")
  group.add_argument("--process-id", type=int, default=None, metavar="I",
                     help="this process, 0..N-1; 0 hosts the coordinator (LM2_PROCESS_ID)")
  group.add_argument("--cpu-devices", type=int, default=None, metavar="N",
                     help="fake CPU devices in this process, for local tests (LM2_CPU_DEVICES)")
  group.add_argument("--heartbeat-timeout", type=int, default=None, metavar="S",
                     help="seconds of silence after which a process counts as dead and the run fails "
                          "(LM2_HEARTBEAT_TIMEOUT, default 60)")
  group.add_argument("--init-timeout", type=int, default=None, metavar="S",
                     help="seconds to wait for all processes to join (LM2_INIT_TIMEOUT, default 300)")


def _env_int(environ: Mapping[str, str], name: str) -> int | None:
  text = environ.get(ENV_PREFIX + name, "").strip()
  if not text:
    return None
  try:
    return int(text)
  except ValueError:
    raise DistributedError(f"{ENV_PREFIX}{name}={text!r} is not an integer") from None


def options_from(args: argparse.Namespace | None = None,
                 environ: Mapping[str, str] | None = None) -> DistributedOptions:
  """Resolves the flags of `add_arguments` (if parsed) over the LM2_* environment variables.

  Raises:
    DistributedError: a partial explicit setting, or an out-of-range value.
  """
  environ = os.environ if environ is None else environ

  def pick(flag: str, env: str, is_int: bool = True):
    value = getattr(args, flag, None) if args is not None else None
    if value is not None:
      return value
    if is_int:
      return _env_int(environ, env)
    return environ.get(ENV_PREFIX + env, "").strip() or None

  coordinator = pick("coordinator", "COORDINATOR", is_int=False)
  num_processes = pick("num_processes", "NUM_PROCESSES")
  process_id = pick("process_id", "PROCESS_ID")
  multihost = getattr(args, "multihost", None) if args is not None else None
  if multihost is None:
    multihost = environ.get(ENV_PREFIX + "MULTIHOST", "").strip().lower() in ("1", "true", "yes")
  cpu_devices = pick("cpu_devices", "CPU_DEVICES") or 0
  timeouts = {}
  for flag, env in (("heartbeat_timeout", "HEARTBEAT_TIMEOUT"), ("init_timeout", "INIT_TIMEOUT")):
    value = pick(flag, env)
    if value is not None:
      if value < 1:
        raise DistributedError(f"--{flag.replace('_', '-')} / {ENV_PREFIX}{env} must be >= 1 s, got {value}")
      timeouts[f"{flag}_s"] = value
  if cpu_devices < 0:
    raise DistributedError(f"--cpu-devices / {ENV_PREFIX}CPU_DEVICES must be >= 0, got {cpu_devices}")

  explicit = {"--coordinator / LM2_COORDINATOR": coordinator,
              "--num-processes / LM2_NUM_PROCESSES": num_processes,
              "--process-id / LM2_PROCESS_ID": process_id}
  given = [k for k, v in explicit.items() if v is not None]
  if given and len(given) < 3:
    missing = [k for k, v in explicit.items() if v is None]
    raise DistributedError(f"a multi-process run needs all three of coordinator, number of processes and "
                           f"process id; got {', '.join(given)} but not {', '.join(missing)}")
  if given:
    if num_processes < 1 or not 0 <= process_id < num_processes:
      raise DistributedError(f"process id {process_id} is not in [0, num_processes={num_processes})")
    host, _, port = coordinator.rpartition(":")
    if not host or not port.isdigit():
      raise DistributedError(f"coordinator {coordinator!r} is not HOST:PORT")
    mode = "explicit"
  else:
    mode = "auto" if multihost else "single"
  return DistributedOptions(mode=mode, coordinator=coordinator, num_processes=num_processes,
                            process_id=process_id, cpu_devices=cpu_devices, **timeouts)


def initialize(options: DistributedOptions) -> None:
  """Configures fake CPU devices and joins the distributed runtime, as `options` say.

  Call before anything touches the JAX backend. A single-process run with `cpu_devices=0` is a no-op.

  Raises:
    DistributedError: the backend was already initialised, or the run could not be joined.
  """
  if options.cpu_devices:
    try:
      jax.config.update("jax_num_cpu_devices", options.cpu_devices)
    except RuntimeError as e:
      raise DistributedError(f"--cpu-devices must be set before JAX initialises its backend: {e}") from e
  if options.mode == "single":
    return
  kwargs = dict(initialization_timeout=options.init_timeout_s,
                heartbeat_timeout_seconds=options.heartbeat_timeout_s,
                shutdown_timeout_seconds=options.shutdown_timeout_s)
  if options.mode == "explicit":
    kwargs.update(coordinator_address=options.coordinator, num_processes=options.num_processes,
                  process_id=options.process_id)
  try:
    jax.distributed.initialize(**kwargs)
  except RuntimeError as e:
    raise DistributedError(f"could not join the multi-process run ({options.mode} mode): {e}") from e
  except ValueError as e:
    raise DistributedError(f"--multihost found no cluster to join ({e}); on a bare cluster pass "
                           "--coordinator, --num-processes and --process-id") from e
  log.info("process %d of %d joined; %d local / %d global devices", jax.process_index(),
           jax.process_count(), jax.local_device_count(), jax.device_count())


def join(args) -> int | None:
  """Runs `setup(args)`; on a bad configuration prints why and returns the exit code 2, else None."""
  try:
    setup(args)
  except DistributedError as e:
    print(f"multi-process setup error: {e}", file=sys.stderr)
    return 2
  return None


def setup(args: argparse.Namespace | None = None) -> DistributedOptions:
  """`options_from(args)` then `initialize`; what the entry points call first."""
  options = options_from(args)
  initialize(options)
  return options


def exit_fast_on_failure(main: Callable[[], int]) -> int:
  """Runs `main()`; in a multi-process run a failure ends this process at once, skipping the exit barrier.

  A process that leaves through the normal exit path waits in JAX's shutdown barrier (up to the shutdown
  timeout) while its peers may sit in a collective waiting for it: nobody notices the failure for minutes.
  Leaving with `os._exit` instead drops the process from the run, and its peers fail within the heartbeat
  timeout (a broken collective connection usually fails them sooner).

  Returns:
    `main()`'s exit code (successful or single-process runs only; failures there behave as usual).
  """
  if jax.process_count() == 1:
    return main()
  try:
    code = main()
  except BaseException:  # pylint: disable=broad-except
    traceback.print_exc()
    code = 1
  if code:
    print(f"process {jax.process_index()} of {jax.process_count()} failed (exit {code}); leaving the "
          "run now so the other processes stop too", file=sys.stderr, flush=True)
    sys.stdout.flush()
    os._exit(code)  # pylint: disable=protected-access
  return code


def is_main_process() -> bool:
  """True on the process that writes logs, metrics and results (process 0)."""
  return jax.process_index() == 0
