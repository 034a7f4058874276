"""The sweep runner: cells are real train.py runs; finished cells are skipped; the table holds each
cell's own final_eval.json figures."""

import json
import pathlib

import pytest

from lm2_jax import sweep

ROOT = pathlib.Path(__file__).resolve().parents[1]
EXPERIMENT = f"""
name: base
model: {{include: {ROOT}/configs/model/tiny.yaml, num_slots: 4}}
train: {{steps: 2, batch_size: 8, warmup_steps: 1}}
data: {{kind: recall, num_segments: 3, recall_queries: 2, recall_keys: 6, recall_values: 6,
        train_size: 64, eval_size: 16}}
mesh: {{data: 1, num_devices: 1}}
checkpoint: {{every: 100}}
logging: {{progress: false, tensorboard: false, peak_flops: 1.0e9}}
"""


def _write(tmp_path, cells="{a: [model.memory_write=keyed, model.memory_init=zeros], b: []}"):
  (tmp_path / "exp.yaml").write_text(EXPERIMENT)
  path = tmp_path / "sweep.yaml"
  path.write_text(f"name: s\nbase: exp.yaml\nruns_dir: {tmp_path / 'runs'}\nseeds: [0]\ntwins: [b]\n"
                  f"cells: {cells}\n")
  return path


def test_bad_sweep_files_are_refused(tmp_path, capsys):
  assert sweep.main([str(_write(tmp_path, cells="{}"))]) == 2
  assert "cells" in capsys.readouterr().err
  assert sweep.main([str(_write(tmp_path, cells="{a: model.d_model=8}"))]) == 2
  assert "cells.a" in capsys.readouterr().err
  assert sweep.main([str(_write(tmp_path)), "--cells", "c"]) == 2


def test_dry_run_prints_one_train_command_per_cell_and_seed(tmp_path, capsys):
  assert sweep.main([str(_write(tmp_path)), "--dry-run", "train.steps=3"]) == 0
  lines = capsys.readouterr().out.strip().splitlines()
  assert len(lines) == 2 and all("train.py" in line and "train.steps=3" in line for line in lines)
  assert "model.memory_write=keyed" in lines[0] and "name=a-s0" in lines[0] and "name=b-s0" in lines[1]


def test_a_cell_stopped_before_its_final_evaluation_is_not_ok(tmp_path, capsys, monkeypatch):
  # train.py exits 0 after a SIGTERM save; without final_eval.json the cell is unfinished.
  monkeypatch.setattr(sweep, "_run", lambda cmd, run_dir: (0, 1.0))
  assert sweep.main([str(_write(tmp_path)), "--cells", "b"]) == 1
  assert "b seed 0: STOPPED before its final evaluation" in capsys.readouterr().out


@pytest.mark.slow
def test_two_cells_run_skip_when_finished_and_tabulate_their_own_figures(tmp_path, capsys):
  path = _write(tmp_path)
  assert sweep.main([str(path), "--jobs", "2"]) == 0
  runs = tmp_path / "runs" / "s"
  reports = {c: json.loads((runs / f"{c}-s0" / "final_eval.json").read_text()) for c in ("a", "b")}
  table = json.loads((runs / "table.json").read_text())
  for cell, report in reports.items():
    assert table[cell]["accuracy"]["mean"] == pytest.approx(report["accuracy"])
    assert table[cell]["loss"]["mean"] == pytest.approx(report["loss"])
  assert table["b"]["twin"] and not table["a"]["twin"]
  assert "| b (twin) | 1 |" in (runs / "table.md").read_text()
  assert (runs / "table.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
  bars = sweep.plot(table, tmp_path / "again.png", "s")
  assert bars == [(c, table[c]["accuracy"]["mean"], table[c]["accuracy"]["min"], table[c]["accuracy"]["max"])
                  for c in ("a", "b")]
  # An interrupted cell (no final_eval.json) runs again from its own checkpoint; a finished one is skipped.
  (runs / "a-s0" / "final_eval.json").unlink()
  capsys.readouterr()
  assert sweep.main([str(path)]) == 0
  out = capsys.readouterr().out
  assert "1 finished, 1 to run" in out and "[1/1] a seed 0: ok" in out
  assert "resumed" in (runs / "a-s0" / "sweep.log").read_text()
  assert json.loads((runs / "a-s0" / "final_eval.json").read_text()) == reports["a"]


@pytest.mark.parametrize("path", sorted((ROOT / "configs" / "sweep").glob("*.yaml")), ids=lambda p: p.stem)
def test_every_committed_sweep_cell_is_a_valid_run_config(path):
  # A sweep's cells start from an experiment that others inherit from (default.yaml): a change there
  # must not leave a recorded cell with a config train.py refuses.
  from lm2_jax.train import config as config_lib
  runs = sweep.cell_runs(sweep.load_sweep(path), [])
  assert runs
  for cell, _, _, cmd in runs:
    i = cmd.index("--config")
    config_lib.load_config(cmd[i + 1], cmd[i + 2:]).model_config()
