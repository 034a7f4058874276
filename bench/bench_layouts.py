"""The layout choices of issue 15, each against the formulation it replaced, side by side in one process.

    python bench/bench_layouts.py [--rounds 7]

At the issue's dims (32 x 256 tokens, D 128, 4 heads of 32, MLP 384, float32), forward + backward:

  mlp        SwiGLU MLP with its projections as einsums over [B, T, .] against `layers.dense_einsum`
             (2D matmuls): XLA's CPU backend computes the einsums' weight gradients from transposed copies;
  attention  causal self-attention over 256 tokens in 4 query chunks, token-major (the einsums of the
             earlier `layers.attend`) against the heads-major `layers.causal_self_attend`;
  fused      the heads-major XLA attention against the fused CPU kernel (lm2_jax/kernels/cpu_attention.cc,
             `ModelConfig.attention_kernel: auto`);
  kernel     the trainer's compiled step of the memory-less model (bench_train.compiled_step) with
             `attention_kernel: xla` against the same step with the fused kernel (the default);
  step       that step against the same step with the attention core replaced by q + k + v: the core's
             share of the step.

Medians over rounds, timed alternately; ratios are what to read on a shared host.
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import time

import absl.flags
import jax
import jax.numpy as jnp

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, HERE)
sys.path.insert(0, os.path.dirname(HERE))
from lm2_jax.model import layers  # noqa: E402

B, T, D, N, H, F = 32, 256, 128, 4, 32, 384


def _mlp(project):
  def mlp(w, x):
    hidden = jax.nn.silu(project("BTD,DF->BTF", x, w["gate"])) * project("BTD,DF->BTF", x, w["up"])
    return project("BTF,FD->BTD", hidden, w["down"])
  return mlp


def _token_major_attend(q, k, v, q_pos, k_pos, k_valid):
  """The earlier `layers.attend`: scores and values as einsums on the [B, T, K, G, H] layout."""
  b, t, n, h = q.shape
  kh = k.shape[2]
  qg = (q * jnp.asarray(1.0 / h**0.5, q.dtype)).reshape(b, t, kh, n // kh, h)
  scores = jnp.einsum("BTKGH,BSKH->BKGTS", qg, k, preferred_element_type=jnp.float32)
  visible = (k_pos[None, :] <= q_pos[:, None])[None] & k_valid[:, None, :]
  scores = scores + jnp.where(visible, 0.0, layers.NEG_INF)[:, None, None]
  out = jnp.einsum("BKGTS,BSKH->BTKGH", jax.nn.softmax(scores, axis=-1).astype(v.dtype), v)
  return out.reshape(b, t, n, h)


def _token_major_causal(q, k, v, positions, valid):
  c = T // layers.CAUSAL_CHUNKS
  return jnp.concatenate([_token_major_attend(q[:, i:i + c], k[:, :i + c], v[:, :i + c], positions[i:i + c],
                                              positions[:i + c], valid[:, :i + c]) for i in range(0, T, c)],
                         axis=1)


def _grad_fn(fn, probe):
  """jit of the gradient of sum(fn(w, x) * probe) with respect to w and x."""
  return jax.jit(jax.grad(lambda w, x: jnp.sum(fn(w, x) * probe), argnums=(0, 1)))


def _pairs():
  """{name: (the replaced formulation, the current one)}, each a call of no arguments (fwd + bwd)."""
  keys = jax.random.split(jax.random.key(0), 8)
  x = jax.random.normal(keys[0], (B, T, D))
  w = {"gate": jax.random.normal(keys[1], (D, F)) * 0.05, "up": jax.random.normal(keys[2], (D, F)) * 0.05,
       "down": jax.random.normal(keys[3], (F, D)) * 0.05}
  q, k, v = (jax.random.normal(kk, (B, T, N, H)) for kk in keys[4:7])
  pos, valid = jnp.arange(T), jnp.ones((B, T), bool)
  probe_d, probe_h = jax.random.normal(keys[7], (B, T, D)), jax.random.normal(keys[7], (B, T, N, H))
  mlp_old, mlp_new = (_grad_fn(_mlp(p), probe_d) for p in (jnp.einsum, layers.dense_einsum))
  att_old = jax.jit(jax.grad(lambda q, k, v: jnp.sum(_token_major_causal(q, k, v, pos, valid) * probe_h),
                             argnums=(0, 1, 2)))
  att_new, att_fused = (
      jax.jit(jax.grad(lambda q, k, v, kern=kern: jnp.sum(
          layers.causal_self_attend(q, k, v, pos, valid, kern) * probe_h), argnums=(0, 1, 2)))
      for kern in ("xla", "auto"))
  return {"mlp": ((lambda: mlp_old(w, x)), (lambda: mlp_new(w, x))),
          "attention": ((lambda: att_old(q, k, v)), (lambda: att_new(q, k, v))),
          "fused": ((lambda: att_new(q, k, v)), (lambda: att_fused(q, k, v)))}


def _step_pairs():
  """{"kernel": (step with XLA's attention, step with the fused kernel), "step": (step with the fused
  kernel, step without the attention core)} of the issue-dims memory-less model."""
  import dataclasses  # pylint: disable=g-import-not-at-top
  from bench_train import compiled_step  # pylint: disable=g-import-not-at-top
  from bench_vs_torch import _model_configs  # pylint: disable=g-import-not-at-top

  nomem, _ = _model_configs("issue", T, 64, "float32")
  xla, fused = (list(compiled_step(dataclasses.replace(nomem, attention_kernel=kern), B, 1))
                for kern in ("xla", "auto"))
  real = layers.causal_self_attend
  layers.causal_self_attend = lambda q, k, v, positions, valid, kernel="xla": q + k + v
  try:
    coreless = list(compiled_step(nomem, B, 1))
  finally:
    layers.causal_self_attend = real

  def runner(built):
    def run():
      built[0], metrics = built[1](built[0], built[2])
      return metrics
    return run
  return {"kernel": (runner(xla), runner(fused)), "step": (runner(fused), runner(coreless))}


def main(argv=None) -> None:
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("--rounds", type=int, default=7)
  parser.add_argument("--calls", type=int, default=5, help="timed calls per turn")
  args = parser.parse_args(argv)
  absl.flags.FLAGS.mark_as_parsed()
  pairs = {**_pairs(), **_step_pairs()}
  times = {(name, i): [] for name in pairs for i in range(2)}
  for _ in range(args.rounds):
    for name, fns in pairs.items():
      for i, fn in enumerate(fns):
        jax.block_until_ready(fn())
        start = time.perf_counter()
        for _ in range(args.calls):
          out = fn()
        jax.block_until_ready(out)
        times[name, i].append((time.perf_counter() - start) / args.calls)
  labels = {"mlp": ("einsum over [B, T, .]", "dense_einsum (2D)"),
            "attention": ("token-major", "heads-major"),
            "fused": ("heads-major (XLA)", "fused CPU kernel"),
            "kernel": ("step, XLA attention", "step, fused kernel"),
            "step": ("step, fused kernel", "same, attention core removed")}
  print(f"fwd + bwd, medians of {args.rounds} rounds x {args.calls} calls, {jax.devices()[0].device_kind}")
  for name in pairs:
    old, new = (statistics.median(times[name, i]) for i in range(2))
    print(f"  {name:<10} {labels[name][0]:<22} {old * 1e3:8.1f} ms   {labels[name][1]:<28} "
          f"{new * 1e3:8.1f} ms   ratio {old / new:.2f}")


if __name__ == "__main__":
  main()
