"""The pure train and eval steps, and their one-time compilation with explicit shardings.

The loss is token-weighted over the batch: sum of masked NLL / max(sum of mask, 1). Gradient accumulation
scans over micro-batches summing the NLL gradient and the mask weight, and divides once at the end, so
any number of micro-batches gives the same update as one full batch (up to float summation order).

With `memory_aux_weight` w > 0 the objective is that loss plus w * memory_aux, memory_aux = -(the mean
mutual information between a segment's real tokens and the memory rows they write to,
`diagnostics.write_information`), read differentiably from the sown write routes. Its mean is over terms
counted on the whole batch, so it too is the same for any number of micro-batches.
"""

from __future__ import annotations

from typing import Callable

import flax.linen as nn
import jax
import jax.numpy as jnp
import optax
from jax.sharding import Mesh, NamedSharding, PartitionSpec

from lm2_jax.train import diagnostics as diagnostics_lib
from lm2_jax.train import mesh as mesh_lib
from lm2_jax.train.state import TrainState
from lm2_jax.typing import PyTree

# Batch keys the model reads, and those it reads when present (`bound`: runs with `data.bind`); QA
# bookkeeping keys (answer_id, fact_segment, ...) stay on the host.
MODEL_KEYS = ("inputs", "targets", "loss_mask", "valid", "resets")
OPTIONAL_MODEL_KEYS = ("bound",)


def model_inputs(batch: dict) -> dict:
  """The entries of `batch` the model reads."""
  return {k: batch[k] for k in MODEL_KEYS + OPTIONAL_MODEL_KEYS if k in batch}


def _loss_stats(model: nn.Module, params: PyTree, batch: dict, rng, intermediates: bool = False):
  """LossStats of `batch`; with `intermediates`, (LossStats, the sown `intermediates` collection)."""
  out = model.apply({"params": params}, batch["inputs"], batch["targets"], batch["loss_mask"],
                    memory=None, resets=batch.get("resets"), valid=batch.get("valid"),
                    bound=batch.get("bound"), method="loss", rngs={"dropout": rng},
                    mutable=["intermediates"] if intermediates else False)
  if not intermediates:
    return out[0]
  (stats, _), state = out
  return stats, state.get("intermediates", {})


def make_train_step(model: nn.Module, tx: optax.GradientTransformation, schedule: optax.Schedule,
                    micro_batches: int, mesh: Mesh | None = None, memory_aux_weight: float = 0.0
                    ) -> Callable:
  """Returns train_step(state, batch) -> (state, metrics), pure and unjitted.

  Args:
    model: module with a `loss(tokens, targets, loss_mask, memory, resets, valid)` method returning
      (LossStats, memory); LossStats holds per-row float32 [B] nll_sum, weight_sum, correct_sum.
    tx: the optimizer.
    schedule: the learning-rate schedule, reported in the metrics.
    micro_batches: A, gradient-accumulation chunks; must divide the batch.
    mesh: when given, each micro-batch is constrained to the batch sharding (rows over data x fsdp).
    memory_aux_weight: w >= 0 of the write-information term (module docstring); > 0 needs a model whose
      LM2 memory blocks sow `write_routes` (`memory_write` slots, keyed or delta). 0: the plain loss.

  Metrics are float32 scalars: loss (the NLL, without the auxiliary term), accuracy (masked token
  accuracy), grad_norm (before clipping), lr (of this step), tokens (masked tokens in the batch); with
  w > 0 also memory_aux (nats, unweighted).
  """
  aux = memory_aux_weight > 0

  def nll_and_grads(params, batch, rng, aux_scale):
    def objective(p):
      out = _loss_stats(model, p, batch, rng, intermediates=aux)
      stats, intermediates = out if aux else (out, None)
      nll = stats.nll_sum.sum()
      info = (diagnostics_lib.write_information(intermediates, model.cfg, batch["valid"]) if aux
              else jnp.zeros((), jnp.float32))
      loss = nll - aux_scale * info if aux else nll
      return loss, (nll, stats.weight_sum.sum(), stats.correct_sum.sum(), info)
    grads, (nll, weight, correct, info) = jax.grad(objective, has_aux=True)(params)
    return grads, nll, weight, correct, info

  def train_step(state: TrainState, batch: dict) -> tuple[TrainState, dict]:
    batch = model_inputs(batch)
    rng, step_rng = jax.random.split(state.rng)
    aux_scale = terms = None
    if aux:
      # Gradients are divided by the batch's loss weight at the end; scaling the information by it here
      # leaves w * d(memory_aux) after that division, memory_aux's terms counted on the whole batch.
      terms = jnp.maximum(diagnostics_lib.write_information_count(model.cfg, batch["valid"]), 1.0)
      aux_scale = memory_aux_weight * jnp.maximum(jnp.sum(batch["loss_mask"]), 1.0) / terms
    if micro_batches == 1:
      grads, nll, weight, correct, info = nll_and_grads(state.params, batch, step_rng, aux_scale)
    else:
      def split(x):
        # Row i*A + a goes to micro-batch a: every micro-batch keeps rows on every data shard.
        x = x.reshape((x.shape[0] // micro_batches, micro_batches) + x.shape[1:]).swapaxes(0, 1)
        if mesh is not None:
          x = jax.lax.with_sharding_constraint(
              x, NamedSharding(mesh, PartitionSpec(None, mesh_lib.BATCH_AXES)))
        return x

      def body(carry, xs):
        micro, index = xs
        g, *sums = nll_and_grads(state.params, micro, jax.random.fold_in(step_rng, index), aux_scale)
        acc_g, *acc = carry
        return (jax.tree.map(jnp.add, acc_g, g), *(a + x for a, x in zip(acc, sums))), None

      zero = jnp.zeros((), jnp.float32)
      carry = (jax.tree.map(jnp.zeros_like, state.params), zero, zero, zero, zero)
      xs = (jax.tree.map(split, batch), jnp.arange(micro_batches))
      (grads, nll, weight, correct, info), _ = jax.lax.scan(body, carry, xs)
    denom = jnp.maximum(weight, 1.0)
    grads = jax.tree.map(lambda g: g / denom, grads)
    updates, opt_state = tx.update(grads, state.opt_state, state.params)
    params = optax.apply_updates(state.params, updates)
    metrics = {
        "loss": nll / denom,
        "accuracy": correct / denom,
        "grad_norm": optax.tree.norm(grads),
        "lr": jnp.asarray(schedule(state.step), jnp.float32),
        "tokens": weight,
    }
    if aux:
      metrics["memory_aux"] = -info / terms
    new_state = state.replace(step=state.step + 1, params=params, opt_state=opt_state, rng=rng)
    return new_state, metrics

  return train_step


def make_eval_step(model: nn.Module, memory_diagnostics: bool = False) -> Callable:
  """Returns eval_step(params, batch) -> per-row float32 [B] nll_sum, weight_sum, correct_sum.

  With `memory_diagnostics` (a model with LM2 memory blocks) the result also holds "memory": per block,
  per-row sums and weights of the diagnostics in `lm2_jax.train.diagnostics`. The forward pass is the
  same; the sown read and write weights of every segment and memory block are held until reduced.
  """

  def eval_step(params: PyTree, batch: dict) -> dict:
    batch = model_inputs(batch)
    stats = _loss_stats(model, params, batch, jax.random.PRNGKey(0), intermediates=memory_diagnostics)
    if memory_diagnostics:
      stats, intermediates = stats
    out = {"nll_sum": stats.nll_sum, "weight_sum": stats.weight_sum, "correct_sum": stats.correct_sum}
    if memory_diagnostics:
      out["memory"] = diagnostics_lib.row_sums(intermediates, model.cfg, batch["valid"],
                                               batch["loss_mask"])
    return out

  return eval_step


def abstract_batch(batch_size: int, seq_len: int, num_segments: int, mesh: Mesh,
                   bound: bool = False) -> dict:
  """ShapeDtypeStructs of a model batch [B, C*T] (and resets [B, C]) with the batch sharding; with
  `bound`, the bound channel [B, C*T] too."""
  sharding = mesh_lib.batch_sharding(mesh)
  def spec(shape, dtype):
    return jax.ShapeDtypeStruct(shape, dtype, sharding=sharding)
  batch = {
      "inputs": spec((batch_size, seq_len), jnp.int32),
      "targets": spec((batch_size, seq_len), jnp.int32),
      "loss_mask": spec((batch_size, seq_len), jnp.float32),
      "valid": spec((batch_size, seq_len), jnp.bool_),
      "resets": spec((batch_size, num_segments), jnp.bool_),
  }
  if bound:
    batch["bound"] = spec((batch_size, seq_len), jnp.int32)
  return batch


def lower_train_step(train_step: Callable, state_shardings: TrainState, abstract_state: TrainState,
                     batch: dict, mesh: Mesh):
  """Jits `train_step` once (explicit shardings, donated state) and lowers it for `batch`'s shapes.

  `lm2_jax.aot` compiles the result for a TPU slice that is not attached (ahead of time).
  """
  in_batch = jax.tree.map(lambda x: x.sharding, batch)
  jitted = jax.jit(train_step, in_shardings=(state_shardings, in_batch),
                   out_shardings=(state_shardings, mesh_lib.replicated(mesh)), donate_argnums=0)
  with jax.set_mesh(mesh), nn.logical_axis_rules(mesh_lib.LOGICAL_AXIS_RULES):
    return jitted.lower(abstract_state, batch)


def compile_train_step(train_step: Callable, state_shardings: TrainState, abstract_state: TrainState,
                       batch: dict, mesh: Mesh):
  """`lower_train_step`, compiled."""
  return lower_train_step(train_step, state_shardings, abstract_state, batch, mesh).compile()


def compile_eval_step(eval_step: Callable, params_shardings: PyTree, abstract_params: PyTree,
                      batch: dict, mesh: Mesh):
  """Jits `eval_step` once for `batch`'s shapes; outputs are per-row arrays, replicated."""
  in_batch = jax.tree.map(lambda x: x.sharding, batch)
  jitted = jax.jit(eval_step, in_shardings=(params_shardings, in_batch),
                   out_shardings=mesh_lib.replicated(mesh))
  with jax.set_mesh(mesh), nn.logical_axis_rules(mesh_lib.LOGICAL_AXIS_RULES):
    return jitted.lower(abstract_params, batch).compile()
