"""Ahead-of-time compilation of the trainer's step for TPU slices on this CPU host (`lm2_jax.aot`).

Needs `libtpu` (requirements-dev.txt); the module is skipped without it. Two compiles of the tiny config
for a v5e:2x2 slice (4 chips), ~10 s of CPU each, are shared by the tests through module fixtures.
"""

import os

os.environ.setdefault("ALLOW_MULTIPLE_LIBTPU_LOAD", "1")  # other test workers may hold libtpu's lock file

import pathlib  # noqa: E402

import pytest  # noqa: E402
import yaml  # noqa: E402

pytest.importorskip("libtpu", reason="libtpu (requirements-dev.txt) compiles for TPU topologies")

from lm2_jax import aot, aot_chips, aot_hlo  # noqa: E402
from lm2_jax.train import config as config_lib  # noqa: E402

TINY = pathlib.Path(__file__).resolve().parents[1] / "configs" / "model" / "tiny.yaml"


def _config(**mesh) -> dict:
  """The tiny LM2 (d_model 32, 2 blocks, segments of 8) with 2 micro-batches of 4 segments."""
  return {"name": "aot-test", "model": config_lib.read_yaml(TINY),
          "train": {"batch_size": 8, "micro_batches": 2}, "data": {"kind": "qa", "num_segments": 4},
          "mesh": {"data": 1, "fsdp": 1, "tensor": 1, **mesh}}


def _report(topology: str, **mesh) -> dict:
  target = aot_chips.resolve(topology)
  plan = aot.plan(config_lib.from_dict(_config(**mesh)), target, aot.slice_devices(target))
  return aot.compile_plan(plan)


@pytest.fixture(scope="module")
def fsdp4():
  return _report("v5e:2x2", fsdp=4)


@pytest.fixture(scope="module")
def fsdp1():
  return _report("v5e:2x2", data=4)


@pytest.mark.slow
def test_compiles_for_the_slice_and_fits(fsdp4):
  assert fsdp4["chips"] == 4 and fsdp4["chip"] == "v5e" and fsdp4["fits"]
  assert 0 < fsdp4["memory"]["total"] < 64 * 2**20
  # fsdp shards the parameters: the step gathers them before use.
  assert any(c["kind"] == "all-gather" and c["executed"] > 0 for c in fsdp4["collectives"])
  assert 0 < fsdp4["step_s"] and 0 < fsdp4["mfu"] < 1


@pytest.mark.slow
def test_argument_bytes_per_chip_fall_as_fsdp_grows(fsdp1, fsdp4):
  # The arguments are the train state (params + AdamW moments, float32) and the batch: replicated on
  # every chip with fsdp=1, a quarter of the matrices on each chip with fsdp=4; the norm scales, gate
  # biases and the batch stay whole, so at d_model 32 the ratio is ~0.45 rather than 0.25.
  ratio = fsdp4["memory"]["arguments"] / fsdp1["memory"]["arguments"]
  print(f"argument bytes per chip: fsdp=1 {fsdp1['memory']['arguments']:,}, fsdp=4 "
        f"{fsdp4['memory']['arguments']:,} ({ratio:.2f})")
  assert ratio < 0.5


@pytest.mark.slow
def test_flops_agree_with_model_flops_per_token(fsdp4):
  # Loops: 2 micro-batches, each a forward and a backward scan over 4 segments.
  assert sorted(fsdp4["loops"]) == [2, 4, 4] and fsdp4["unknown_loops"] == 0
  model = fsdp4["model_flops"]
  # Matmuls of the lowered program with trip counts applied == the model's count (remat none): 1%.
  assert fsdp4["matmul_flops"] == pytest.approx(model, rel=0.01)
  # XLA's compiled count, per chip with loop bodies once, is far below a step's share...
  assert fsdp4["cost_flops_per_chip"] * fsdp4["chips"] < 0.3 * model
  # ...and times the trip factor it matches within the elementwise work XLA also counts (norms,
  # softmaxes, gates, the optimizer: +23% at d_model 32): tolerance [1.0, 1.35] x model.
  assert 1.0 <= fsdp4["flops"] / model <= 1.35


def _main(tmp_path, topology, *overrides, capsys):
  path = tmp_path / "aot.yaml"
  path.write_text(yaml.safe_dump(_config()))
  rc = aot.main(["--topology", topology, "--config", str(path), *overrides])
  return rc, capsys.readouterr().err


def test_a_mesh_that_does_not_divide_the_slice_is_refused(tmp_path, capsys):
  rc, err = _main(tmp_path, "v5e-4", "mesh.data=3", capsys=capsys)
  assert rc == 2
  assert "data*fsdp*tensor = 3 but 4 devices" in err and "Valid meshes for 4 chips" in err
  assert "[1, 2, 4]" in err


def test_an_unknown_topology_is_refused_with_the_valid_names(tmp_path, capsys):
  rc, err = _main(tmp_path, "v5e-100", capsys=capsys)
  assert rc == 2 and "v5e-100" in err and "v5e-256" in err and "v5p-128" in err and "v4:4x4x4" in err


def test_multi_host_slices_read_batch_over_processes_rows():
  target = aot_chips.resolve("v5e:4x4")                  # 16 chips, 4 per process
  devices = aot.slice_devices(target)
  cfg = config_lib.from_dict({**_config(fsdp=-1), "train": {"batch_size": 16, "micro_batches": 1}})
  plan = aot.plan(cfg, target, devices)
  assert (plan.processes, plan.rows_per_process, plan.rows_per_chip) == (4, 4, 1)
  # tensor=8 would put a process's rows on other hosts' chips: refused before compiling, naming the
  # tensor sizes whose rows stay on their process's chips.
  cfg = config_lib.from_dict({**_config(fsdp=2, tensor=8), "train": {"batch_size": 16,
                                                                      "micro_batches": 1}})
  with pytest.raises(config_lib.ConfigError, match=r"tensor axis across hosts.*: \[1, 2\]"):
    aot.plan(cfg, target, devices)


def test_accelerator_types_resolve_to_chips():
  assert aot_chips.resolve("v5e-256").topology == "v5e:16x16"
  v5p, v4 = aot_chips.resolve("v5p-128"), aot_chips.resolve("v4-128")
  assert (v5p.topology, v5p.chips, v4.topology, v4.chips) == ("v5p:4x4x4", 64, "v4:4x4x4", 64)
  assert v4.kwargs == {"chip_config_name": "megacore"}  # one device per v4 chip, as JAX runs v4


HLO = """HloModule m

slice_layer {
  stack = f32[5,8,8] parameter(0)
  k = s32[] parameter(1)
  zero = s32[] constant(0)
  d = f32[1,8,8] dynamic-slice(stack, k, zero, zero), dynamic_slice_sizes={1,8,8}
  ROOT r = f32[8,8] reshape(d)
}

sum {
  a = f32[] parameter(0)
  b = f32[] parameter(1)
  ROOT c = f32[] add(a, b)
}

body {
  p = (s32[], f32[4,8], f32[5,8,8]) parameter(0)
  i = s32[] get-tuple-element(p), index=0
  x = f32[4,8] get-tuple-element(p), index=1
  stack = f32[5,8,8] get-tuple-element(p), index=2
  w = f32[8,8] fusion(stack, i), kind=kLoop, calls=slice_layer
  y = f32[4,8] dot(x, w), lhs_contracting_dims={1}, rhs_contracting_dims={0}
  g = f32[16,8] all-gather(y), dimensions={0}, replica_groups=[1,4]<=[4]
  s = f32[4,8] all-reduce(y), replica_groups={{0,1,2,3}}, to_apply=sum
  one = s32[] constant(1)
  j = s32[] add(i, one)
  ROOT t = (s32[], f32[4,8], f32[5,8,8]) tuple(j, s, stack)
}

cond {
  p = (s32[], f32[4,8], f32[5,8,8]) parameter(0)
  i = s32[] get-tuple-element(p), index=0
  n = s32[] constant(5)
  ROOT lt = pred[] compare(i, n), direction=LT
}

ENTRY main {
  x = f32[4,8] parameter(0)
  stack = f32[5,8,8] parameter(1)
  zero = s32[] constant(0)
  t = (s32[], f32[4,8], f32[5,8,8]) tuple(zero, x, stack)
  w = (s32[], f32[4,8], f32[5,8,8]) while(t), condition=cond, body=body
  ROOT y = f32[4,8] get-tuple-element(w), index=1
}
"""


def test_hlo_loop_bodies_are_multiplied_by_their_trip_counts():
  a = aot_hlo.analyze(HLO, devices=4)
  assert a.loops == [5] and a.unknown_loops == 0
  assert a.dot_flops_once == 2 * 4 * 8 * 8 and a.dot_flops == 5 * a.dot_flops_once
  # HBM traffic of one iteration: the fusion reads layer i of the stack (256 of its 1280 bytes) and the
  # index, writes 256; the dot reads 128 + 256, writes 128; the all-gather 128 + 512; the all-reduce
  # 128 + 128; the counter's add 12.
  assert (a.hbm_bytes_once, a.hbm_bytes) == (1936, 5 * 1936)
  gather, reduce = a.collectives["all-gather"], a.collectives["all-reduce"]
  assert (gather.count, gather.executed, gather.bytes) == (1, 5, 5 * 16 * 8 * 4)
  assert gather.wire_bytes == pytest.approx(gather.bytes * 3 / 4)
  assert reduce.wire_bytes == pytest.approx(reduce.bytes * 2 * 3 / 4)  # reduce-scatter + all-gather
