"""Multi-process training with real processes on 127.0.0.1: 2 processes x 2 fake CPU devices.

Every run is a subprocess of `train.py` (directly, or through `python -m lm2_jax.launch`) on a tiny QA
config, with bounded timeouts; every process started here is killed (by its process group) on the way out.
"""

import json
import os
import pathlib
import signal
import subprocess
import sys
import time

import pytest

from lm2_jax import distributed, launch
from lm2_jax.train import metrics as metrics_lib

REPO = pathlib.Path(__file__).resolve().parent.parent
RUN_TIMEOUT_S = 240
HEARTBEAT_S = 10
# A survivor must fail within the heartbeat timeout plus process teardown; gloo usually fails it sooner.
DEATH_DETECTED_WITHIN_S = HEARTBEAT_S + 20

EXPERIMENT = """\
name: mh
model:
  include: {repo}/configs/model/tiny.yaml
  vocab_size: 384
  segment_length: 16
  num_layers: 1
train: {{steps: 6, batch_size: 8, learning_rate: 1.0e-2, warmup_steps: 2, decay_steps: 4}}
data: {{kind: qa, task: qa1, tokenizer: words, num_segments: 4, train_size: 256, eval_size: 16, seed: 0,
       num_sentences: 4, loss_on: all}}
mesh: {{data: -1, fsdp: 1, tensor: 1}}
checkpoint: {{every: 3, keep: 5}}
logging: {{every: 1, eval_every: 0, progress: false, tensorboard: false, peak_flops: 1.0e9}}
"""

READ_DATA = """\
import json, sys
from lm2_jax import distributed
distributed.setup()
import jax
from lm2_jax.train import config as config_lib, inputs
cfg = config_lib.load_config(sys.argv[1], [])
model_cfg = cfg.model_config()
train_source, _ = inputs.make_sources(cfg.data, model_cfg.segment_length, model_cfg.vocab_size)
it = inputs.train_iterator(train_source, cfg.data, cfg.train.batch_size, cfg.data.seed)
rows = [next(it)["inputs"].tolist() for _ in range(int(sys.argv[3]))]
path = sys.argv[2] + f"/rows_{jax.process_index()}_of_{jax.process_count()}.json"
open(path, "w").write(json.dumps(rows))
"""


@pytest.fixture(scope="module")
def workdir(tmp_path_factory):
  root = tmp_path_factory.mktemp("multihost")
  (root / "exp.yaml").write_text(EXPERIMENT.format(repo=REPO))
  return root


def _env(root: pathlib.Path) -> dict:
  """The test session's environment minus its 8-device XLA flag, with a shared compilation cache."""
  env = dict(os.environ)
  env["XLA_FLAGS"] = " ".join(f for f in env.get("XLA_FLAGS", "").split()
                              if not f.startswith("--xla_force_host_platform_device_count"))
  env.update(PYTHONPATH=str(REPO), JAX_PLATFORMS="cpu", JAX_COMPILATION_CACHE_DIR=str(root / "jax_cache"),
             JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS="0")
  return env


def _train_args(root: pathlib.Path, name: str, *overrides: str) -> list[str]:
  return ["train.py", "--config", str(root / "exp.yaml"), f"name={name}", f"runs_dir={root / 'runs'}",
          *overrides]


def _spawn(root: pathlib.Path, args: list[str], processes: int, log_name: str) -> list[subprocess.Popen]:
  """Starts `processes` members of one run directly (no launcher), output to files under `root`."""
  port = launch.free_port()
  procs = []
  for i in range(processes):
    env = launch.process_env(_env(root), i, processes, port, devices_per_process=2,
                             heartbeat_timeout=HEARTBEAT_S)
    log = open(root / f"{log_name}.p{i}.log", "w")  # pylint: disable=consider-using-with
    procs.append(subprocess.Popen([sys.executable, *args], cwd=REPO, env=env, stdout=log,
                                  stderr=subprocess.STDOUT, start_new_session=True))
    log.close()
  return procs


def _kill_all(procs: list[subprocess.Popen]) -> None:
  for p in procs:
    if p.poll() is None:
      os.killpg(p.pid, signal.SIGKILL)
      p.wait(timeout=30)


def _wait_for_step(run_dir: pathlib.Path, step: int, procs, timeout: float) -> None:
  deadline = time.monotonic() + timeout
  while time.monotonic() < deadline:
    if (run_dir / "metrics.jsonl").is_file() and any(
        r["step"] >= step for r in metrics_lib.read_metrics(run_dir, "train")):
      return
    if any(p.poll() is not None for p in procs):
      raise AssertionError(f"a process exited before step {step}: {[p.poll() for p in procs]}")
    time.sleep(0.2)
  raise AssertionError(f"no step {step} logged within {timeout} s")


def _losses(run_dir: pathlib.Path) -> dict[int, float]:
  rows = metrics_lib.read_metrics(run_dir, "train")
  steps = [r["step"] for r in rows]
  assert len(steps) == len(set(steps)), f"a step was logged twice (more than one writer?): {steps}"
  return {r["step"]: r["loss"] for r in rows}


@pytest.fixture(scope="module")
def two_process_run(workdir):
  """An uninterrupted 6-step run of 2 processes x 2 devices through the launcher CLI."""
  start = time.monotonic()
  out = subprocess.run([sys.executable, "-m", "lm2_jax.launch", "--processes", "2",
                        "--devices-per-process", "2", "--timeout", str(RUN_TIMEOUT_S - 10), "--",
                        *_train_args(workdir, "two")],
                       cwd=REPO, env=_env(workdir), capture_output=True, text=True,
                       timeout=RUN_TIMEOUT_S, check=False)
  assert out.returncode == 0, out.stdout[-3000:] + out.stderr[-3000:]
  print(f"2-process run: {time.monotonic() - start:.1f} s")
  return workdir / "runs" / "two", out.stdout


@pytest.mark.slow
def test_two_processes_match_one_process_on_the_same_global_batch(workdir, two_process_run):
  run_dir, stdout = two_process_run
  one = subprocess.run([sys.executable, *_train_args(workdir, "one"), "--cpu-devices", "4"],
                       cwd=REPO, env=_env(workdir), capture_output=True, text=True,
                       timeout=RUN_TIMEOUT_S, check=False)
  assert one.returncode == 0, one.stdout[-3000:] + one.stderr[-3000:]
  assert "mesh {'data': 4, 'fsdp': 1, 'tensor': 1}" in one.stdout
  two_losses, one_losses = _losses(run_dir), _losses(workdir / "runs" / "one")
  print("step  1 process x 4 devices   2 processes x 2 devices")
  for s in sorted(one_losses):
    print(f"{s:4d}  {one_losses[s]:.8f}              {two_losses[s]:.8f}")
  assert sorted(two_losses) == sorted(one_losses) == list(range(1, 7))
  # Same rows per global batch, in another order across devices: equal up to float summation order.
  for s in one_losses:
    assert two_losses[s] == pytest.approx(one_losses[s], rel=1e-5, abs=1e-6)
  assert one_losses[6] < one_losses[1]  # the steps really trained
  two_eval = json.loads((run_dir / "final_eval.json").read_text())
  one_eval = json.loads((workdir / "runs" / "one" / "final_eval.json").read_text())
  assert two_eval["num_samples"] == one_eval["num_samples"] == 16
  assert two_eval["accuracy_by_distance"] == one_eval["accuracy_by_distance"]
  assert two_eval["loss"] == pytest.approx(one_eval["loss"], rel=1e-5)
  # Process 0 alone speaks; both processes wrote their data position into the one checkpoint.
  assert "[p0] finished 6 steps" in stdout and "[p1] finished" not in stdout
  assert sorted(p.name for p in (run_dir / "checkpoints" / "6" / "data").glob("process_*")) == [
      "process_0-of-2.json", "process_1-of-2.json"]


@pytest.mark.slow
def test_two_process_checkpoint_resumes_with_identical_losses(workdir, two_process_run):
  run_dir, _ = two_process_run
  split = workdir / "runs" / "split"
  # Longer than 6 steps, so that the run cannot end before the signal arrives (the schedule is fixed by
  # train.decay_steps, so train.steps does not change the losses).
  procs = _spawn(workdir, _train_args(workdir, "split", "train.steps=1000"), 2, "split")
  try:
    _wait_for_step(split, 2, procs, RUN_TIMEOUT_S)
    # Only process 1 is told to stop: the processes must agree on one step and save it together.
    os.kill(procs[1].pid, signal.SIGTERM)
    codes = [p.wait(timeout=RUN_TIMEOUT_S) for p in procs]
  finally:
    _kill_all(procs)
  assert codes == [0, 0], (workdir / "split.p0.log").read_text()[-3000:]
  saved = sorted(int(p.name) for p in (split / "checkpoints").iterdir() if p.name.isdigit())
  stopped_at = saved[-1]
  assert 2 <= stopped_at < 6, saved
  assert "interrupted" not in (workdir / "split.p1.log").read_text()  # p1 is silent
  assert "checkpoint saved" in (workdir / "split.p0.log").read_text()

  procs = _spawn(workdir, _train_args(workdir, "split"), 2, "resume")
  try:
    codes = [p.wait(timeout=RUN_TIMEOUT_S) for p in procs]
  finally:
    _kill_all(procs)
  assert codes == [0, 0], (workdir / "resume.p0.log").read_text()[-3000:]
  assert f"resumed {split} from step {stopped_at}" in (workdir / "resume.p0.log").read_text()
  full, resumed = _losses(run_dir), _losses(split)
  assert sorted(resumed) == list(range(1, 7))
  # Same processes, mesh, batches, RNG and optimizer state: bit-identical losses.
  assert [resumed[s] for s in range(1, 7)] == [full[s] for s in range(1, 7)]


@pytest.mark.slow
def test_changed_process_count_is_a_clear_error(workdir, two_process_run):
  run_dir, _ = two_process_run
  out = subprocess.run([sys.executable, *_train_args(workdir, "two", "train.steps=7"), "--cpu-devices",
                        "4"], cwd=REPO, env=_env(workdir), capture_output=True, text=True,
                       timeout=RUN_TIMEOUT_S, check=False)
  assert out.returncode == 2
  assert "written by 2 process(es) but this run has 1" in out.stderr
  assert "--reshard-data" in out.stderr
  assert max(_losses(run_dir)) == 6  # nothing was trained or logged


def test_processes_read_disjoint_slices_whose_union_is_the_global_batch(workdir):
  script = workdir / "read_data.py"
  script.write_text(READ_DATA)
  args = [str(script), str(workdir / "exp.yaml"), str(workdir), "4"]
  single = subprocess.run([sys.executable, *args], cwd=REPO, env=_env(workdir), capture_output=True,
                          text=True, timeout=120, check=False)
  assert single.returncode == 0, single.stderr[-3000:]
  out = subprocess.run([sys.executable, "-m", "lm2_jax.launch", "--processes", "2", "--timeout", "110",
                        "--", *args], cwd=REPO, env=_env(workdir), capture_output=True, text=True,
                       timeout=120, check=False)
  assert out.returncode == 0, out.stdout[-3000:]
  whole = json.loads((workdir / "rows_0_of_1.json").read_text())
  parts = [json.loads((workdir / f"rows_{i}_of_2.json").read_text()) for i in range(2)]
  for step in range(4):
    p0, p1 = parts[0][step], parts[1][step]
    assert len(p0) == len(p1) == 4 and len(whole[step]) == 8
    assert not {tuple(r) for r in p0} & {tuple(r) for r in p1}
    assert sorted(p0 + p1) == sorted(whole[step])
  assert whole[0] != whole[1]


@pytest.mark.slow
def test_killing_one_process_fails_the_other_within_bounded_time(workdir):
  run_dir = workdir / "runs" / "killed"
  procs = _spawn(workdir, _train_args(workdir, "killed", "train.steps=100000"), 2, "killed")
  try:
    _wait_for_step(run_dir, 1, procs, RUN_TIMEOUT_S)
    os.killpg(procs[1].pid, signal.SIGKILL)
    killed_at = time.monotonic()
    code = procs[0].wait(timeout=DEATH_DETECTED_WITHIN_S + 30)
    took = time.monotonic() - killed_at
  finally:
    _kill_all(procs)
  print(f"survivor exited {code} {took:.1f} s after its peer was killed")
  assert code != 0
  assert took < DEATH_DETECTED_WITHIN_S


def test_launcher_stops_the_others_when_one_fails(tmp_path):
  script = ("import os, sys, time\n"
            "if os.environ['LM2_PROCESS_ID'] == '1': sys.exit(3)\n"
            "time.sleep(120)\n")
  start = time.monotonic()
  out = subprocess.run([sys.executable, "-m", "lm2_jax.launch", "--processes", "3", "--grace", "2", "--",
                        sys.executable, "-c", script], cwd=REPO, capture_output=True, text=True,
                       timeout=60, check=False)
  assert out.returncode == 3, out.stdout
  assert time.monotonic() - start < 30
  assert "process 1 exited with 3" in out.stdout


def test_distributed_options_from_environment_and_flags():
  env = {"LM2_COORDINATOR": "10.0.0.1:1234", "LM2_NUM_PROCESSES": "4", "LM2_PROCESS_ID": "3",
         "LM2_CPU_DEVICES": "2", "LM2_HEARTBEAT_TIMEOUT": "15"}
  opts = distributed.options_from(None, env)
  assert (opts.mode, opts.coordinator, opts.num_processes, opts.process_id) == (
      "explicit", "10.0.0.1:1234", 4, 3)
  assert opts.cpu_devices == 2 and opts.heartbeat_timeout_s == 15
  import argparse  # pylint: disable=g-import-not-at-top
  parser = argparse.ArgumentParser()
  distributed.add_arguments(parser)
  flags = parser.parse_args(["--process-id", "0"])
  assert distributed.options_from(flags, env).process_id == 0  # flags win
  assert distributed.options_from(parser.parse_args([]), {}).mode == "single"
  assert distributed.options_from(parser.parse_args(["--multihost"]), {}).mode == "auto"
  with pytest.raises(distributed.DistributedError, match="not --process-id"):
    distributed.options_from(None, {"LM2_COORDINATOR": "h:1", "LM2_NUM_PROCESSES": "2"})
  with pytest.raises(distributed.DistributedError, match="not in"):
    distributed.options_from(None, {**env, "LM2_PROCESS_ID": "4"})
  with pytest.raises(distributed.DistributedError, match="HOST:PORT"):
    distributed.options_from(None, {**env, "LM2_COORDINATOR": "nohost"})
