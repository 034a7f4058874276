"""Memory diagnostics of the evaluation step: hand-set extremes, a direct recomputation from the sown
arrays, and the keys a training run logs (and does not log without LM2 memory)."""

import json

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from lm2_jax.model import LM2
from lm2_jax.train import diagnostics
from lm2_jax.train import evaluate as eval_lib
from lm2_jax.train import metrics as metrics_lib
from lm2_jax.train import step as step_lib
from lm2_jax.train.loop import train
from model_utils import tiny_config as tiny_model
from test_train_evaluate import sources, tiny_config

C = 3


def _batch(cfg, seed=0, batch=4):
  """A batch of random tokens with padding (row 0: segment 1 all padding; row 1: each segment's last 3
  tokens) and a few scored positions."""
  t = cfg.segment_length
  rng = np.random.default_rng(seed)
  tokens = rng.integers(0, cfg.vocab_size, (batch, C * t)).astype(np.int32)
  valid = np.ones((batch, C * t), bool)
  valid[0, t:2 * t] = False
  valid[1].reshape(C, t)[:, -3:] = False
  loss_mask = np.zeros((batch, C * t), np.float32)
  loss_mask[:, -t + 2:-t + 4] = 1.0
  loss_mask[2, 3] = 1.0
  return {"inputs": tokens, "targets": np.roll(tokens, -1, axis=1), "loss_mask": loss_mask,
          "valid": valid, "resets": np.zeros((batch, C), bool)}


def _evaluate(cfg, params, batches):
  """`evaluate`'s memory diagnostics through the jitted eval step."""
  eval_step = jax.jit(step_lib.make_eval_step(LM2(cfg), memory_diagnostics=True))
  return eval_lib.evaluate(lambda b: eval_step(params, b), batches)["memory"]


def _params(cfg, edit=None):
  """Unboxed parameters of a tiny LM2; `edit(path, array) -> array` hand-sets some of them."""
  model = LM2(cfg)
  params = nn.unbox(model.init(jax.random.key(0), jnp.zeros((2, C * cfg.segment_length), jnp.int32))
                    ["params"])
  if edit is None:
    return params
  return jax.tree_util.tree_map_with_path(
      lambda path, x: edit("/".join(str(getattr(k, "key", k)) for k in path), x), params)


def test_uniform_reads_have_entropy_one_and_one_hot_reads_zero():
  cfg = tiny_model()
  zero_queries = _params(cfg, lambda path, x: x * 0 if path.endswith("query/kernel") else x)
  uniform = _evaluate(cfg, zero_queries, [_batch(cfg)])            # every score 0: weights 1/M
  for block in ("block0", "block1"):
    assert abs(uniform[block]["read_entropy"] - 1.0) < 1e-6
    assert abs(uniform[block]["answer_read_entropy"] - 1.0) < 1e-6
  sharp = cfg.replace(memory_score_scale=1e7)                      # scores far apart: one-hot reads
  one_hot = _evaluate(sharp, _params(sharp), [_batch(sharp)])
  for block in ("block0", "block1"):
    assert one_hot[block]["read_entropy"] < 1e-6
  # The `tokens` write rewrites every slot: no effective-slot count.
  assert "write_slots" not in uniform["block0"]


def test_delta_addresses_one_row_or_all_rows():
  cfg = tiny_model(memory_write="delta", memory_init="zeros", memory_heads=1, memory_flow="per_block")
  m = cfg.num_slots

  def one_row(path, x):  # address = sign(h.w) e_3 (writes), e_0 (reads)
    column = {"write_addr/kernel": 3, "read_addr/kernel": 0}
    for name, j in column.items():
      if path.endswith(name):
        return jnp.zeros_like(x).at[:, j].set(x[:, 0] + 1.0)
    return x

  def all_rows(path, x):  # every column equal: |a_m| = 1/sqrt(M), squared weights 1/M
    if path.endswith("addr/kernel"):
      return jnp.broadcast_to(x[:, :1] + 1.0, x.shape)
    return x

  single = _evaluate(cfg, _params(cfg, one_row), [_batch(cfg)])
  spread = _evaluate(cfg, _params(cfg, all_rows), [_batch(cfg)])
  for block in ("block0", "block1"):
    assert abs(single[block]["write_slots"] - 1.0) < 1e-5 and single[block]["read_entropy"] < 1e-6
    assert abs(spread[block]["write_slots"] - m) < 1e-3 and abs(spread[block]["read_entropy"] - 1) < 1e-5


def _sown(inter, cfg, i):
  """Block i's sown arrays {name: [C, B, ...]} (numpy)."""
  if cfg.scan_layers:
    return {k: np.asarray(v[0])[:, i] for k, v in inter["memory_blocks"]["memory"].items()}
  return {k: np.asarray(v[0]) for k, v in inter[f"block_{i}"]["memory"].items()}


def _direct(cfg, params, batches):
  """The diagnostics recomputed from the sown arrays, one token / segment / head at a time."""
  model, t, m = LM2(cfg), cfg.segment_length, cfg.num_slots
  values = {}
  for batch in batches:
    (_, _), state = model.apply({"params": params}, batch["inputs"], batch["targets"], batch["loss_mask"],
                                resets=batch["resets"], valid=batch["valid"], method=LM2.loss,
                                mutable=["intermediates"])
    for i in range(cfg.num_memory_layers):
      sown = _sown(state["intermediates"], cfg, i)
      out = values.setdefault(f"block{i}", {})
      for b in range(batch["inputs"].shape[0]):
        for c in range(C):
          real = batch["valid"][b, c * t:(c + 1) * t]
          scored = batch["loss_mask"][b, c * t:(c + 1) * t] > 0
          for n in range(sown["read_attention"].shape[2]):
            for k in range(t):
              w = sown["read_attention"][c, b, n, k].astype(np.float64)
              w = w * w if cfg.memory_write == "delta" else w
              p = w / w.sum()
              h = -np.sum(p[p > 0] * np.log(p[p > 0])) / np.log(m)
              if real[k]:
                out.setdefault("read_entropy", []).append(h)
                if scored[k]:
                  out.setdefault("answer_read_entropy", []).append(h)
          for n in range(sown["write_routes"].shape[2] if "write_routes" in sown and real.any() else 0):
            r = sown["write_routes"][c, b, n].astype(np.float64)         # [T, M]
            r = r * r if cfg.memory_write == "delta" else np.maximum(r, 0)
            mass = (r * real[:, None]).sum(0)
            q = mass / mass.sum()
            out.setdefault("write_slots", []).append(np.exp(-np.sum(q[q > 0] * np.log(q[q > 0]))))
          if real.any():
            out.setdefault("input_gate", []).append(sown["input_gate_mean"][c, b])
            out.setdefault("forget_gate", []).append(sown["forget_gate_mean"][c, b])
  return {block: {k: float(np.mean(v)) for k, v in named.items()} for block, named in values.items()}


@pytest.mark.parametrize("overrides", [
    {},                                                                  # tokens write, chained, unrolled
    {"memory_write": "slots", "scan_layers": True, "memory_layers": 1, "num_layers": 2},
    {"memory_write": "delta", "memory_init": "zeros", "memory_heads": 1, "memory_flow": "per_block",
     "scan_layers": True},
    {"memory_write": "keyed", "memory_init": "zeros"},
], ids=["tokens", "slots-scanned", "delta-scanned", "keyed"])
def test_diagnostics_equal_a_direct_computation_from_the_sown_arrays(overrides):
  cfg = tiny_model(**overrides)
  params = _params(cfg)
  batches = [_batch(cfg, seed=0), _batch(cfg, seed=1)]
  got, want = _evaluate(cfg, params, batches), _direct(cfg, params, batches)
  assert sorted(got) == sorted(want) == [f"block{i}" for i in range(cfg.num_memory_layers)]
  for block in want:
    assert sorted(got[block]) == sorted(want[block])
    for name, value in want[block].items():
      assert got[block][name] == pytest.approx(value, rel=1e-5, abs=1e-6), (block, name)


def test_no_diagnostics_without_lm2_memory():
  for cfg in (tiny_model(use_memory=False), tiny_model(memory_kind="rmt")):
    assert not diagnostics.available(cfg)
    params = _params(cfg)
    eval_step = jax.jit(step_lib.make_eval_step(LM2(cfg), memory_diagnostics=True))
    assert eval_step(params, _batch(cfg))["memory"] == {}
    assert "memory" not in eval_lib.evaluate(lambda b: eval_step(params, b), [_batch(cfg)])


@pytest.mark.parametrize("name, sections, logged", [
    ("lm2", {"model": {"memory_write": "slots"}}, True),
    ("nomem", {"model": {"use_memory": False}}, False),
    ("rmt", {"model": {"memory_kind": "rmt"}}, False),
    ("off", {"logging": {"memory_diagnostics": False}}, False),
])
def test_a_training_run_logs_the_diagnostics_at_each_evaluation(tmp_path, name, sections, logged):
  from test_train_evaluate import TINY_MODEL  # pylint: disable=g-import-not-at-top

  model = dict(TINY_MODEL, **sections.get("model", {}))
  logging_section = {"eval_every": 2, "eval_batches": 1, **sections.get("logging", {})}
  cfg = tiny_config(tmp_path, name, model=model, train={"steps": 4}, logging=logging_section,
                    checkpoint={"enabled": False})
  result = train(cfg, sources=sources(), echo=lambda s: None)
  assert result.status == "completed"
  names = ("read_entropy", "answer_read_entropy", "write_slots", "input_gate", "forget_gate")
  keys = {f"memory/block0/{n}" for n in names}
  evals = metrics_lib.read_metrics(tmp_path / name, "eval") + metrics_lib.read_metrics(tmp_path / name,
                                                                                       "final_eval")
  assert [r["step"] for r in evals] == [2, 4, 4]
  report = json.loads((tmp_path / name / "final_eval.json").read_text())
  if not logged:
    assert not any(k.startswith("memory/") for r in evals for k in r) and "memory" not in report
    return
  for row in evals:
    assert keys <= set(row)
    assert 0 <= row["memory/block0/read_entropy"] <= 1 and 1 <= row["memory/block0/write_slots"] <= 8
  assert set(report["memory"]["block0"]) == set(names)
  assert report["memory"]["block0"]["read_entropy"] == evals[-1]["memory/block0/read_entropy"]
