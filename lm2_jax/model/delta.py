"""The delta-rule memory (`memory_write: delta`): the bank as one fast-weight matrix from M address
dimensions to D value dimensions, written token by token with the paper's gated update along each
token's address.

    a_t = unit(h_t W_wa)                    the token's write address                 [B, M]
    c_t = sigmoid(u_t W_in + b_in) * tanh(u_t),  f_t = sigmoid(u_t W_f + b_f),  u_t = h_t Wu      [B, D]
    old = a_t^T mem                         what the bank returns at that address      [B, D]
    mem' = mem + a_t (f_t * old + c_t - old)^T                                          [B, M, D]

Along a_t the bank's answer becomes `f_t * old + c_t` (the paper's `g_f * mem + g_in * tanh(u)`, applied
to what is stored under that address); in every direction orthogonal to a_t it is unchanged. With a
one-hot address this is the keyed write's slot update; with a learned, smooth address it is the delta
rule (Widrow-Hoff; Schlag et al. 2021's fast weights), so a key written again replaces its old value
instead of averaging with it, and a token whose gates say "keep" (f ~ 1, c ~ 0) leaves the bank as it is.
Every step is differentiable: no hard routing.

The read of a segment uses the bank as it stood at the segment's start (causal by construction):

    q_t = unit(h_t W_ra);  r_t = q_t^T mem;  e_t = r_t Wv;  out_t = sigmoid(e_t W_out) * e_t

a cross-attention over the M rows whose weights are the token's read address. Dimension letters:
lm2_jax/typing.py.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

from lm2_jax.typing import Array

# Added to |a|^2 before an address is normalised: an all-zero projection (padding) stays finite.
ADDRESS_EPS = 1e-6


def unit(x: Array) -> Array:
  """x / |x| over the last axis (float32)."""
  x = x.astype(jnp.float32)
  return x * jax.lax.rsqrt(jnp.sum(x * x, axis=-1, keepdims=True) + ADDRESS_EPS)


def delta_write(bank: Array, address: Array, content: Array, forget: Array, valid: Array,
                unroll: int = 16) -> Array:
  """The bank after writing a segment's tokens in order.

  Args:
    bank: [B, M, D] float32, the bank before the segment.
    address: [B, T, M] unit write addresses.
    content: [B, T, D] what each token stores (c_t); forget: [B, T, D] the forget gate f_t.
    valid: [B, T] real tokens; padding leaves the bank unchanged.
    unroll: tokens per loop trip of the scan.
  Returns:
    [B, M, D] float32.
  """

  def step(mem, xs):
    a, c, f, v = xs                                            # [B, M], [B, D], [B, D], [B]
    old = jnp.einsum("BM,BMD->BD", a, mem)
    change = (f * old + c - old) * v[:, None]
    return mem + jnp.einsum("BM,BD->BMD", a, change), None

  xs = (address, content, forget, valid.astype(jnp.float32))
  xs = jax.tree.map(lambda x: jnp.swapaxes(x.astype(jnp.float32), 0, 1), xs)  # token axis first
  bank, _ = jax.lax.scan(step, bank.astype(jnp.float32), xs, unroll=max(1, min(unroll, address.shape[1])))
  return bank


def delta_read(bank: Array, address: Array) -> Array:
  """r_t = q_t^T mem [B, T, D] (float32) for read addresses [B, T, M] against a bank [B, M, D]."""
  return jnp.einsum("BTM,BMD->BTD", address.astype(jnp.float32), bank.astype(jnp.float32))
