"""Full-size configs checked with jax.eval_shape only (no allocation); dtypes of the compute paths."""

import dataclasses
import math

import flax.linen as nn
import jax
import jax.numpy as jnp
import pytest
from jax.extend import core as jcore

from lm2_jax.model import layers
from lm2_jax.model import LM2, ModelConfig, forward_flops_per_token
from model_utils import TINY, init_model, tiny_config


def _param_counts(path):
  cfg = ModelConfig.from_yaml(path)
  tokens = jax.ShapeDtypeStruct((1, cfg.segment_length), jnp.int32)
  shapes = nn.unbox(jax.eval_shape(LM2(cfg).init, jax.random.key(0), tokens)["params"])
  counts = {"memory": 0, "backbone": 0}
  for path_, leaf in jax.tree_util.tree_flatten_with_path(shapes)[0]:
    keys = [getattr(k, "key", str(k)) for k in path_]
    kind = "memory" if "memory" in keys or "memory_init" in keys else "backbone"
    counts[kind] += math.prod(leaf.shape)
  return cfg, counts


def test_lm2_1_7b_parameter_count():
  cfg, counts = _param_counts("configs/model/lm2-1.7b.yaml")
  print(f"lm2-1.7b: backbone {counts['backbone']:,} memory {counts['memory']:,} "
        f"total {counts['backbone'] + counts['memory']:,}")
  d, layers = cfg.d_model, cfg.num_layers
  # 7 D x D memory matrices + 2 gate biases per block (DESIGN.md §2).
  assert counts["memory"] == layers * (7 * d * d + 2 * d) == 469_827_584
  assert counts["backbone"] == 1_235_814_400              # Llama-3.2-1B with tied embeddings
  assert 1.70e9 < counts["backbone"] + counts["memory"] < 1.71e9


def test_llama_1_2b_has_no_memory_parameters():
  _, counts = _param_counts("configs/model/llama-1.2b.yaml")
  assert counts["memory"] == 0
  assert counts["backbone"] == 1_235_814_400


def test_memory_in_first_k_blocks_only():
  cfg = tiny_config(num_layers=3, memory_layers=1)
  _, variables, _ = init_model(cfg, segments=1)
  params = nn.unbox(variables["params"])
  assert "memory" in params["block_0"]
  assert "memory" not in params["block_1"] and "memory" not in params["block_2"]


def test_gate_switches_remove_their_parameters():
  cfg = tiny_config(output_gate=False, input_gate=False, forget_gate=False)
  _, variables, _ = init_model(cfg, segments=1)
  mem = nn.unbox(variables["params"])["block_0"]["memory"]
  assert set(mem) == {"query", "key", "value", "update"}
  addressed = tiny_config(memory_keys="both")
  _, variables, _ = init_model(addressed, segments=1)
  mem = nn.unbox(variables["params"])["block_0"]["memory"]
  assert mem["slot_address"].shape == (addressed.num_slots, addressed.d_model)


@pytest.mark.parametrize("remat", ["full", "dots"])
def test_remat_gives_the_same_gradients(remat):
  cfg = tiny_config()
  model, variables, tokens = init_model(cfg, segments=2)
  remat_model = LM2(cfg.replace(remat=remat))

  def grads(m):
    def loss(p):
      stats, _ = m.apply({"params": p}, tokens, tokens, jnp.ones(tokens.shape), method=LM2.loss)
      return stats.nll_sum.sum()
    return jax.grad(loss)(variables["params"])

  a, b = nn.unbox(grads(model)), nn.unbox(grads(remat_model))
  diffs = jax.tree.leaves(jax.tree.map(lambda x, y: float(jnp.abs(x - y).max()), a, b))
  assert max(diffs) <= 1e-6
  assert max(jax.tree.leaves(jax.tree.map(lambda x: float(jnp.abs(x).max()), a))) > 0


def test_bfloat16_compute_keeps_memory_float32():
  cfg = tiny_config(dtype="bfloat16")
  model, variables, tokens = init_model(cfg, segments=3)
  logits, memory = model.apply(variables, tokens)
  assert memory.dtype == jnp.float32 and logits.dtype == jnp.float32
  assert bool(jnp.all(jnp.isfinite(logits))) and bool(jnp.all(jnp.isfinite(memory)))
  assert all(p.dtype == jnp.float32 for p in jax.tree.leaves(nn.unbox(variables["params"])))


def _dot_flops(jaxpr) -> int:
  """FLOPs of every dot_general in a jaxpr (2 per multiply-add), through scans (x length) and any
  sub-jaxpr (jit, remat, custom derivatives)."""
  total = 0
  for eqn in jaxpr.eqns:
    if eqn.primitive.name == "dot_general":
      (contracting, _), _ = eqn.params["dimension_numbers"]
      lhs = eqn.invars[0].aval.shape
      total += 2 * math.prod(eqn.outvars[0].aval.shape) * math.prod(lhs[d] for d in contracting)
      continue
    times = eqn.params["length"] if eqn.primitive.name == "scan" else 1
    for value in eqn.params.values():
      for sub in value if isinstance(value, (tuple, list)) else (value,):
        if isinstance(sub, jcore.ClosedJaxpr):
          total += times * _dot_flops(sub.jaxpr)
        elif isinstance(sub, jcore.Jaxpr):
          total += times * _dot_flops(sub)
  return total


def _counted_flops_per_token(cfg, batch=2, segments=3, order="token_first"):
  """Forward FLOPs per token counted from the traced model (jax.make_jaxpr; nothing is allocated).

  With XLA's attention: the fused CPU kernel computes the same matmuls inside one custom call, which
  has no dot_general to count. With the memory's products token-first: model FLOPs (flops.py) count the
  model as its equations write it; the slot-first order computes the same function with fewer."""
  tokens = jax.ShapeDtypeStruct((batch, segments * cfg.segment_length), jnp.int32)
  model = LM2(dataclasses.replace(cfg, attention_kernel="xla", memory_product_order=order))
  variables = jax.eval_shape(model.init, jax.random.key(0), tokens)
  jaxpr = jax.make_jaxpr(lambda v, t: model.apply(v, t))(variables, tokens)
  return _dot_flops(jaxpr.jaxpr) / (batch * segments * cfg.segment_length)


@pytest.mark.parametrize("source, overrides", [
    (TINY, {}),
    (TINY, dict(memory_write="slots", memory_keys="both", memory_norm=True)),
    (TINY, dict(input_gate=False, output_gate=False)),
    (TINY, dict(forget_gate=False, memory_layers=1, read_topk=3)),
    (TINY, dict(memory_flow="per_block", scan_layers=True, remat="full")),
    (TINY, dict(use_memory=False)),
    (TINY, dict(use_memory=False, attention="full")),
    (TINY, dict(memory_write="keyed", memory_init="zeros")),
    ("configs/model/small.yaml", {}),
    ("configs/model/lm2-1.7b.yaml", {}),
])
def test_flops_match_the_matmuls_of_the_traced_forward(source, overrides):
  """flops.py's formula against an independent count: the dot_general FLOPs of the traced forward.

  Every matmul counts (attention over every key of the segment, as flops.py's convention says, is what
  the masked einsum computes). The keyed write also multiplies a one-hot choice into the bank to read
  back the rewritten slot (`BM,BMD->BD`, 2 M D per token and memory layer): a gather written as an
  einsum, which flops.py leaves out as no model work. Nothing else is left out or added: the two agree
  exactly.
  """
  cfg = ModelConfig.from_yaml(source, **overrides)
  segments = 3 if source == TINY else 2
  counted = _counted_flops_per_token(cfg, batch=2 if source == TINY else 1, segments=segments)
  if cfg.memory_write == "keyed":
    counted -= 2 * cfg.num_slots * cfg.d_model * cfg.num_memory_layers
  t = segments * cfg.segment_length if cfg.attention == "full" else cfg.segment_length
  if t >= layers.CAUSAL_CHUNK_MIN_LENGTH:
    # Long segments attend in n causal query chunks that skip the keys after them: (n + 1) / 2n of the
    # score and value matmuls that flops.py's convention (every key of the segment) counts.
    n = layers.CAUSAL_CHUNKS
    counted += (1 - (n + 1) / (2 * n)) * 4 * cfg.num_heads * cfg.head_dim * t * cfg.num_layers
  expected = forward_flops_per_token(cfg, segments * cfg.segment_length)
  assert counted == pytest.approx(expected, rel=1e-9)


def test_slot_first_executes_fewer_matmul_flops_than_the_model_flops():
  """small.yaml's memory products slot-first (`auto` picks it there): the traced forward's matmuls are
  fewer than the model FLOPs flops.py counts, by the memory's per-token projections it folds away."""
  cfg = ModelConfig.from_yaml("configs/model/small.yaml")
  token_first = _counted_flops_per_token(cfg, batch=1, segments=2)
  slot_first = _counted_flops_per_token(cfg, batch=1, segments=2, order="slot_first")
  d, m, t, nm = cfg.d_model, cfg.num_slots, cfg.segment_length, cfg.memory_heads
  # Per token and memory layer, token-first -> slot-first (2 FLOPs a multiply-add):
  #   scores      h Wq (2 D^2) + q k^T (2 M D)    ->  Wq k^T (2 M D^2 / T) + h (Wq k^T) (2 Nm M D)
  #   write       h Wu (2 D^2) + a_w (h Wu) (2 M D)  ->  a_w h (2 Nm M D) + (a_w h) Wu (2 M D^2 / T)
  #   output gate e W_out (2 D^2)                 ->  v W_out (2 M D^2 / T) + a_r (v W_out) (2 Nm M D)
  folded = 3 * 2 * d * d + 2 * 2 * m * d - 3 * 2 * m * d * d / t - 3 * 2 * nm * m * d
  assert token_first - slot_first == pytest.approx(cfg.num_memory_layers * folded, rel=1e-9)
  print(f"small.yaml forward matmul FLOPs a token: token-first {token_first:,.0f}, slot-first "
        f"{slot_first:,.0f} ({slot_first / token_first:.3f}x)")
