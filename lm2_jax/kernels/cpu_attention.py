"""Fused causal grouped-query attention on XLA's CPU backend: `cpu_attention.cc` as a JAX function.

On CPU, XLA runs attention as a chain of whole-tensor ops over [B, K, G, T, S] scores; the fused
kernel keeps each block of 64 queries' scores in cache and recomputes them in the backward pass from
the saved log-sum-exp (bench/bench_layouts.py measures both). `applies` says when the model uses it
(`ModelConfig.attention_kernel: auto`); everywhere else the model runs `layers.causal_self_attend`'s
XLA path, which computes the same function.
"""

from __future__ import annotations

import ctypes
import logging

import jax
import jax.numpy as jnp
from jax.ad_checkpoint import checkpoint_name

from lm2_jax.kernels import build

Array = jax.Array
SOURCE = "cpu_attention.cc"
HEAD_DIM_MULTIPLE = 16  # the kernel's vector width in floats
SAVE_NAME = "cpu_attention"  # checkpoint_name of the kernel's outputs
_registered: dict = {}  # "targets": (forward, backward) FFI names, or "error": why not


def _targets() -> tuple[str, str]:
  """The kernel's FFI target names, building and registering the library on first use."""
  if "targets" not in _registered:
    lib = ctypes.cdll.LoadLibrary(build.library(SOURCE))
    # Names carry the source digest: a persistent compilation cache never pairs an HLO module with a
    # library built from other source.
    tag = build.source_digest(SOURCE)[:12]
    names = (f"lm2_causal_attention_fwd_{tag}", f"lm2_causal_attention_bwd_{tag}")
    for name, symbol in zip(names, (lib.Lm2CausalAttentionFwd, lib.Lm2CausalAttentionBwd)):
      jax.ffi.register_ffi_target(name, jax.ffi.pycapsule(symbol), platform="cpu")
    _registered["targets"] = names
  return _registered["targets"]


def available() -> bool:
  """Whether the kernel is built and registered; logs why once when it cannot be."""
  if "targets" in _registered:
    return True
  if "error" not in _registered:
    try:
      _targets()
      return True
    except (build.BuildError, OSError) as e:
      _registered["error"] = str(e)
      logging.getLogger(__name__).warning(
          "the fused CPU attention kernel is unavailable, using XLA's attention: %s", e)
  return False


def applies(q: Array, k: Array) -> bool:
  """Whether `causal_attention` can run these operands where the model is being traced.

  Float32 operands, a head dim that is a whole number of vectors, the CPU backend, and no multi-device
  mesh in context (the custom call has no sharding rule; a sharded step keeps XLA's attention)."""
  mesh = jax.sharding.get_abstract_mesh()
  return (q.dtype == jnp.float32 and k.dtype == jnp.float32 and q.shape[-1] % HEAD_DIM_MULTIPLE == 0
          and jax.default_backend() == "cpu" and (mesh.empty or mesh.size == 1) and available())


def _forward(q: Array, k: Array, v: Array, valid: Array) -> tuple[Array, Array]:
  b, t, n, _ = q.shape
  out = (jax.ShapeDtypeStruct(q.shape, jnp.float32), jax.ShapeDtypeStruct((b, n, t), jnp.float32))
  return jax.ffi.ffi_call(_targets()[0], out, vmap_method="sequential")(q, k, v, valid)


def causal_attention(q: Array, k: Array, v: Array, valid: Array) -> Array:
  """softmax(q k^T / sqrt(H) + mask) v with query t seeing key s when s <= t + S - T and valid[b, s].

  The kernel's output and log-sum-exp are named `SAVE_NAME` for `jax.checkpoint`: a remat policy that
  saves them (`block.remat_policy`) leaves the backward pass its residuals without re-running the
  forward kernel.

  Args:
    q: float32 [B, T, N, H] (rotated). k, v: float32 [B, S, K, H], S >= T, K dividing N.
    valid: bool [B, S], false for padding keys.
  Returns:
    float32 [B, T, N, H]; a query with no visible key gets zeros.
  """
  out, lse = _forward(*(jax.lax.stop_gradient(x) for x in (q, k, v)), valid)
  out, lse = checkpoint_name(out, SAVE_NAME), checkpoint_name(lse, SAVE_NAME)
  return _with_gradient(q, k, v, valid, out, lse)


@jax.custom_vjp
def _with_gradient(q, k, v, valid, out, lse):
  """out, with the kernel's backward pass as the gradient with respect to q, k, v. The forward kernel
  runs outside, so that its outputs, not the custom-VJP residuals it would otherwise make, are what a
  remat policy sees and may save."""
  del q, k, v, valid, lse
  return out


def _vjp_forward(q, k, v, valid, out, lse):
  return out, (q, k, v, valid, out, lse)


def _vjp_backward(residuals, d_out):
  q, k, v, valid, out, lse = residuals
  shapes = tuple(jax.ShapeDtypeStruct(x.shape, jnp.float32) for x in (q, k, v))
  dq, dk, dv = jax.ffi.ffi_call(_targets()[1], shapes, vmap_method="sequential")(
      q, k, v, valid, out, lse, d_out.astype(jnp.float32))
  return dq, dk, dv, None, None, None


_with_gradient.defvjp(_vjp_forward, _vjp_backward)
