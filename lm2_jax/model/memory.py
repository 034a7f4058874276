"""The LM2 memory module of one block: a cross-attention read and a gated write (DESIGN.md §2).

One score matrix per memory head serves both directions:

    h   = RMSNorm(x)                       (the block's attention input)         [B, T, D]
    sc  = (h Wq)(mem Wk)^T / sqrt(H)                                              [B, N, T, M]
    read:  a_r = softmax over M (optionally only the top k);  e_mem = a_r (mem Wv)  [B, T, D]
           out = sigmoid(e_mem W_out) * e_mem            (added to the residual by the block)
    write: a_w = softmax over the segment's real tokens of sc^T                    [B, N, M, T]
           u   = a_w (h Wu)                                                         [B, M, D]
           mem' = sigmoid(u W_in + b_in) * tanh(u) + sigmoid(u W_f + b_f) * mem

That is `memory_write: tokens`; `slots` routes each token over the slots with the read's softmax instead.
The per-token projections h Wq, h Wu and e W_out can run in either order (`memory_product_order`, one
function): token-first as written, or slot-first with each weight folded into the M slots,
sc = h (Wq (mem Wk)^T), u = (a_w h) Wu, e W_out = a_r ((mem Wv) W_out), which is cheaper when M Nm < D and
segments are long (`Memory.slot_first`).
`keyed` is a content-addressed write that does not share the read's scores. Token by token, in order:

    u_t  = h_t Wu;  c_t = sigmoid(u_t W_in + b_in) * tanh(u_t)        the content t would store    [B, D]
    k_t  = unit(key(c_t)),  K_m = unit(key(mem_m))      key(x): the read's key projection of x (rows
                                                          RMS-normalised first with `memory_norm`),
                                                          heads flattened; unit(k) = k / |k|
    slot = argmax_m k_t.K_m  if max_m k_t.K_m > memory_match_threshold,  else argmin_m |mem_m|^2
    mem_slot' = sigmoid(u_t W_f + b_f) * mem_slot + c_t                (every other slot unchanged)

Two options refine the keyed write. `memory_match_center` compares keys after subtracting the segment's
mean token key m (k_t = unit(key(c_t) - m), K_m = unit(key(mem_m) - m), never-written slots excluded from
matching): at init every token of a deep block shares one direction (measured cosine ~0.9), which otherwise
puts a whole segment into one slot. `memory_write_gate` scales each token's rewrite by a learned scalar
s_t = sigmoid(h_t w_s + b_s): mem_slot' = mem_slot + s_t (f_t mem_slot + c_t - mem_slot), so a token that
carries no fact (the "." after "Mary went to the kitchen") can leave the bank as it is.

So a token whose key matches a stored key rewrites that slot (a reassigned key replaces its old value, as
the keys a reader matches are these same keys), and a new key takes the emptiest slot (a zero bank's
slots first, `memory_init: zeros`). The read is unchanged: attention over the stored slots' keys. The
choice is hard in the forward pass; its gradient is that of a softmax over [k_t.K_1 .. k_t.K_M, threshold]
(x MATCH_SHARPNESS, the last option meaning the emptiest slot): a straight-through estimator, so the keys
learn from which slot a token should have rewritten, not only from what the read found.

The block reads the bank as it stood at the start of the segment, so no token sees memory written from its
own segment: causality holds by construction. The bank is float32 whatever the compute dtype.
"""

from __future__ import annotations

import flax.linen as nn
import jax
import jax.numpy as jnp

from lm2_jax.model import delta as delta_lib
from lm2_jax.model.config import ModelConfig
from lm2_jax.model.layers import (NEG_INF, TOKEN_AXES, Einsum, constrain, dense_einsum, normal_init,
                                  param_with_axes)
from lm2_jax.typing import Array

MEMORY_AXES = ("activation_batch", "activation_slots", "activation_embed")
# Inverse temperature of the keyed write's straight-through routing softmax over cosines in [-1, 1].
MATCH_SHARPNESS = 10.0
# Added to |k|^2 before the keyed write normalises a key: an empty slot's key is 0, and 1/|k| there would
# multiply the routing gradient by 1e6 (keys of written slots have |k|^2 ~ 0.1-10).
KEY_EPS = 1e-4


def initial_bank(cfg: ModelConfig, learned: Array | None = None) -> Array:
  """The initial bank [M, D] (float32) of `cfg.memory_init`; `learned` is the learned init parameter."""
  m, d = cfg.num_slots, cfg.d_model
  if cfg.memory_init == "identity":
    return jnp.eye(m, d, dtype=jnp.float32)
  if cfg.memory_init == "zeros":
    return jnp.zeros((m, d), jnp.float32)
  if learned is None:
    raise ValueError("memory_init='learned' needs the model parameters: call "
                     "init_memory(cfg, batch_size, params=variables['params'])")
  return jnp.asarray(learned, jnp.float32)


def init_memory(cfg: ModelConfig, batch_size: int, params=None) -> Array | None:
  """The initial memory carry: [B, M, D] (`chained`) or [L_mem, B, M, D] (`per_block`), float32.

  Returns None for a model without memory. With `memory_init: learned` pass the model's params.
  """
  if not cfg.use_memory:
    return None
  learned = None
  if cfg.memory_init == "learned" and params is not None:
    learned = nn.unbox(params)["memory_init"]
  bank = initial_bank(cfg, learned)
  bank = jnp.broadcast_to(bank, (batch_size, *bank.shape))
  if cfg.memory_flow == "per_block":
    bank = jnp.broadcast_to(bank, (cfg.num_memory_layers, *bank.shape))
  return bank


class Gate(nn.Module):
  """sigmoid(u W + b) for u [B, X, D]; the bias starts at `bias_init`."""

  cfg: ModelConfig
  bias_init: float = 0.0

  @nn.compact
  def __call__(self, u: Array) -> Array:
    d = self.cfg.d_model
    kernel = param_with_axes(self, "kernel", normal_init(self.cfg), (d, d), ("embed", "mem_embed"),
                             self.cfg.weight_dtype)
    z = dense_einsum("BXD,DE->BXE", u, kernel.astype(self.cfg.compute_dtype))
    bias = param_with_axes(self, "bias", nn.initializers.constant(self.bias_init), (d,),
                           ("mem_embed",), self.cfg.weight_dtype)
    return jax.nn.sigmoid(z.astype(jnp.float32) + bias.astype(jnp.float32)[None, None, :])


class WriteStrength(nn.Module):
  """The keyed write's per-token scalar strength sigmoid(h w + b) [B, T] (float32) for h [B, T, D]."""

  cfg: ModelConfig

  @nn.compact
  def __call__(self, h: Array) -> Array:
    cfg = self.cfg
    kernel = param_with_axes(self, "kernel", normal_init(cfg), (cfg.d_model,), ("embed",),
                             cfg.weight_dtype)
    bias = param_with_axes(self, "bias", nn.initializers.zeros, (), (), cfg.weight_dtype)
    z = jnp.einsum("BTD,D->BT", h, kernel.astype(cfg.compute_dtype), preferred_element_type=jnp.float32)
    return jax.nn.sigmoid(z + bias.astype(jnp.float32))


class Memory(nn.Module):
  """Reads a memory bank into a segment and writes the segment into a bank."""

  cfg: ModelConfig

  def setup(self):
    cfg = self.cfg
    d, nm, hm = cfg.d_model, cfg.memory_heads, cfg.memory_head_dim
    head_axes = ("embed", "mem_heads", "mem_head_dim")
    if cfg.memory_write == "delta":
      # Addresses into the bank's M rows (delta.py): where a token writes, where it reads.
      self.write_addr = Einsum(cfg, (d, cfg.num_slots), ("embed", "slots"), "BTD,DM->BTM")
      self.read_addr = Einsum(cfg, (d, cfg.num_slots), ("embed", "slots"), "BTD,DM->BTM")
    else:
      self.query = Einsum(cfg, (d, nm, hm), head_axes, "BTD,DNH->BTNH")
      self.key = Einsum(cfg, (d, nm, hm), head_axes, "BMD,DNH->BMNH")
    self.value = Einsum(cfg, (d, d), ("embed", "mem_embed"), "BMD,DE->BME")
    self.update = Einsum(cfg, (d, d), ("embed", "mem_embed"), "BTD,DE->BTE")
    if cfg.output_gate:
      self.out_gate = Einsum(cfg, (d, d), ("embed", "mem_embed"), "BTD,DE->BTE")
    if cfg.input_gate:
      self.in_gate = Gate(cfg, 0.0)
    if cfg.forget_gate:
      self.forget_gate = Gate(cfg, cfg.forget_bias_init)
    if cfg.memory_write_gate:
      self.write_strength = WriteStrength(cfg)
    if cfg.memory_keys != "content":
      self.slot_address = param_with_axes(self, "slot_address", nn.initializers.normal(1.0),
                                          (cfg.num_slots, d), ("slots", "embed"), cfg.weight_dtype)

  def _heads(self, x: Array) -> Array:
    """[B, X, D] -> [B, X, Nm, H]."""
    return x.reshape(*x.shape[:-1], self.cfg.memory_heads, self.cfg.memory_head_dim)

  def _bank_in(self, bank: Array) -> Array:
    """The bank as the key/value projections see it (RMS-normalised rows with `memory_norm`).

    Called once per projection, so that each gets its own D-replicated constraint (the XLA workaround
    described at `layers.TOKEN_AXES`; the same goes for the `constrain` calls at the other projections).
    """
    if self.cfg.memory_norm:
      bank = self._rms_rows(bank)
    return constrain(bank.astype(self.cfg.compute_dtype), MEMORY_AXES)

  def _rms_rows(self, x: Array) -> Array:
    """Rows of x [..., D] divided by their RMS; an all-zero row stays zero with a unit gradient, not
    1/sqrt(eps): the keyed write's routing gradient reaches empty slots, and through this norm it
    multiplied them by ~300."""
    ms = jnp.mean(x * x, axis=-1, keepdims=True)
    return jnp.where(ms > 0, x * jax.lax.rsqrt(ms + self.cfg.norm_eps), x)

  def slot_first(self, tokens: int) -> bool:
    """Whether a call over `tokens` tokens folds the weights into the slots (`memory_product_order`).

    Per segment row: token-first costs T D^2 (the projection) + T M D (the product with the slots);
    slot-first M D^2 (the weight against the M slots) + T Nm M D (each token against the folded map).
    """
    cfg = self.cfg
    if cfg.memory_product_order != "auto":
      return cfg.memory_product_order == "slot_first"
    d, m, nm = cfg.d_model, cfg.num_slots, cfg.memory_heads
    return tokens * d + tokens * m > m * d + tokens * nm * m

  def scores(self, h: Array, bank: Array) -> Array:
    """Token-slot scores [B, Nm, T, M] (float32) of inputs h [B, T, D] against a bank [B, M, D]."""
    cfg = self.cfg
    if cfg.memory_keys == "content":
      keys_in = self._bank_in(bank)
    else:
      # A per-slot address that writes never overwrite keeps the slots' keys apart.
      address = jnp.broadcast_to(self.slot_address.astype(cfg.compute_dtype)[None], bank.shape)
      keys_in = address if cfg.memory_keys == "address" else self._bank_in(bank) + address
      keys_in = constrain(keys_in, MEMORY_AXES)
    k = self.key(keys_in)                               # [B, M, Nm, H]
    if self.slot_first(h.shape[1]):
      # (h Wq) k^T = h (Wq k^T): one [D, Nm M] map a segment row instead of projecting every token.
      qk = self.query(k, eqn="BMNH,DNH->BDNM")          # [B, D, Nm, M]
      scores = jnp.einsum("BTD,BDNM->BNTM", constrain(h, TOKEN_AXES), qk,
                          preferred_element_type=jnp.float32)
    else:
      q = self.query(constrain(h, TOKEN_AXES))          # [B, T, Nm, H]
      scores = jnp.einsum("BTNH,BMNH->BNTM", q, k, preferred_element_type=jnp.float32)
    return scores * (cfg.memory_score_scale / jnp.sqrt(jnp.float32(cfg.memory_head_dim)))

  def read(self, scores: Array, bank: Array) -> Array:
    """The gated read [B, T, D] (compute dtype): each token attends over the slots."""
    cfg = self.cfg
    dt = cfg.compute_dtype
    if cfg.read_topk is not None and cfg.read_topk < cfg.num_slots:
      kth = jax.lax.top_k(scores, cfg.read_topk)[0][..., -1:]
      scores = jnp.where(scores >= kth, scores, NEG_INF)
    probs = jax.nn.softmax(scores, axis=-1)
    self.sow("intermediates", "read_attention", probs)
    values = self._heads(self.value(self._bank_in(bank)))  # [B, M, Nm, H]
    e_mem = jnp.einsum("BNTM,BMNH->BTNH", probs.astype(dt), values)
    e_mem = e_mem.reshape(*e_mem.shape[:2], cfg.d_model)
    if not (cfg.output_gate and self.slot_first(probs.shape[2])):
      return self._gated(e_mem)
    # e W_out = a_r (v W_out): the gate's weight folded into each head's M values.
    vw = self.out_gate(values, eqn="BMNH,NHE->BNME",
                       kernel_shape=(cfg.memory_heads, cfg.memory_head_dim, cfg.d_model))
    gate = jnp.einsum("BNTM,BNME->BTE", probs.astype(dt), vw)
    return self._apply_gate(gate, e_mem)

  def _gated(self, e_mem: Array) -> Array:
    """The output gate sigmoid(e W_out) * e of a read [B, T, D] (compute dtype), token-first."""
    if not self.cfg.output_gate:
      return e_mem
    return self._apply_gate(self.out_gate(constrain(e_mem, TOKEN_AXES)), e_mem)

  def _apply_gate(self, gate: Array, e_mem: Array) -> Array:
    """sigmoid(gate) * e for the gate's logits e W_out [B, T, D]."""
    return jax.nn.sigmoid(gate.astype(jnp.float32)).astype(self.cfg.compute_dtype) * e_mem

  def read_segment(self, h: Array, bank: Array) -> Array:
    """The gated read [B, T, D] of a segment's inputs h [B, T, D] from a bank [B, M, D]."""
    if self.cfg.memory_write != "delta":
      return self.read(self.scores(h, bank), bank)
    address = delta_lib.unit(self.read_addr(constrain(h, TOKEN_AXES)))   # [B, T, M]
    self.sow("intermediates", "read_attention", address[:, None])
    rows = delta_lib.delta_read(bank, address).astype(self.cfg.compute_dtype)
    return self._gated(self.value(constrain(rows, TOKEN_AXES)))

  def _gates(self, h: Array):
    """(content c = g_in * tanh(u), forget gate f), each [B, T, D] float32, of a segment's tokens."""
    cfg = self.cfg
    u = self.update(constrain(h, TOKEN_AXES))            # [B, T, D]
    ones = jnp.ones(u.shape, jnp.float32)
    g_in = self.in_gate(constrain(u, TOKEN_AXES)) if cfg.input_gate else ones
    g_f = self.forget_gate(constrain(u, TOKEN_AXES)) if cfg.forget_gate else ones
    if cfg.input_gate:
      self.sow("intermediates", "input_gate_mean", jnp.mean(g_in, axis=(1, 2)))
    if cfg.forget_gate:
      self.sow("intermediates", "forget_gate_mean", jnp.mean(g_f, axis=(1, 2)))
    return g_in * jnp.tanh(u.astype(jnp.float32)), g_f.astype(jnp.float32)

  def delta_write(self, h: Array, prev_bank: Array, valid: Array) -> Array:
    """The delta-rule write (delta.py): each token rewrites what the bank holds at its address."""
    content, forget = self._gates(h)
    address = delta_lib.unit(self.write_addr(constrain(h, TOKEN_AXES)))  # [B, T, M]
    self.sow("intermediates", "write_routes", address[:, None])
    bank = delta_lib.delta_write(prev_bank, address, content, forget, valid)
    return constrain(bank, MEMORY_AXES)

  def write(self, scores: Array, h: Array, prev_bank: Array, valid: Array) -> Array:
    """The bank after the segment [B, M, D] (float32), written from the segment's real tokens.

    `memory_write: keyed` is `keyed_write` (`delta` is `delta_write`, which `__call__` calls without
    scores). `tokens`: each slot attends over the tokens (softmax over T) and is rewritten every
    segment. `slots`: each token routes itself over the slots with the read's softmax over M (a token
    writes where it reads); a slot takes the routed tokens' mean and changes in proportion to
    1 - exp(-mass), its routed mass, so slots no token routes to keep their content.
    """
    cfg = self.cfg
    if cfg.memory_write == "keyed":
      return self.keyed_write(h, prev_bank, valid)
    dt = cfg.compute_dtype
    if cfg.memory_write == "tokens":
      write_scores = jnp.where(valid[:, None, None, :], jnp.swapaxes(scores, -1, -2), NEG_INF)
      weights = jax.nn.softmax(write_scores, axis=-1)      # [B, Nm, M, T]
      u = self._aggregate_updates(weights, h)
      strength = None
    else:
      routes = jax.nn.softmax(scores, axis=-1) * valid[:, None, :, None]  # [B, Nm, T, M]
      mass = jnp.sum(routes, axis=2)                       # [B, Nm, M]
      u = self._aggregate_updates(jnp.swapaxes(routes, -1, -2), h)
      u = u / jnp.maximum(mass, 1e-6)[..., None].swapaxes(1, 2)
      self.sow("intermediates", "write_routes", routes)
      strength = jnp.broadcast_to((1.0 - jnp.exp(-mass)).swapaxes(1, 2)[..., None], u.shape)
      strength = strength.reshape(prev_bank.shape)
    u = u.reshape(prev_bank.shape)                      # [B, M, D] float32
    prev = prev_bank.astype(jnp.float32)
    g_in = self.in_gate(constrain(u.astype(dt), MEMORY_AXES)) if cfg.input_gate else 1.0
    g_f = self.forget_gate(constrain(u.astype(dt), MEMORY_AXES)) if cfg.forget_gate else 1.0
    new_bank = g_in * jnp.tanh(u) + g_f * prev
    if strength is not None:
      new_bank = prev + strength * (new_bank - prev)
    if cfg.input_gate:
      self.sow("intermediates", "input_gate_mean", jnp.mean(g_in, axis=(1, 2)))
    if cfg.forget_gate:
      self.sow("intermediates", "forget_gate_mean", jnp.mean(g_f, axis=(1, 2)))
    # A segment with no real token leaves the bank as it was (no decay, no NaN).
    any_valid = jnp.any(valid, axis=1)[:, None, None]
    return constrain(jnp.where(any_valid, new_bank, prev), MEMORY_AXES)

  def _aggregate_updates(self, weights: Array, h: Array) -> Array:
    """u = weights (h Wu) per memory head [B, M, Nm, H] (float32) for weights [B, Nm, M, T] (float32)."""
    cfg = self.cfg
    if self.slot_first(h.shape[1]):
      # weights (h Wu) = (weights h) Wu: the update projection runs on M rows, not T tokens.
      rows = jnp.einsum("BNMT,BTD->BNMD", weights, h.astype(jnp.float32))
      return self.update(rows, eqn="BNMD,DNH->BMNH",
                         kernel_shape=(cfg.d_model, cfg.memory_heads, cfg.memory_head_dim))
    hu = self._heads(self.update(constrain(h, TOKEN_AXES))).astype(jnp.float32)  # [B, T, Nm, H]
    return jnp.einsum("BNMT,BTNH->BMNH", weights, hu)

  def keyed_write(self, h: Array, prev_bank: Array, valid: Array) -> Array:
    """The content-addressed write (module docstring): a scan over the segment's tokens, in order."""
    cfg = self.cfg
    dt = cfg.compute_dtype
    content, g_f = self._gates(h)                        # [B, T, D] float32
    kernel = nn.unbox(self.key.variables["params"]["kernel"]).astype(dt)  # [D, Nm, H]

    def raw_key(x):
      """key(x) for rows x [..., D] as the read computes it (RMS-normalised rows with `memory_norm`),
      heads flattened [..., E] (float32)."""
      if cfg.memory_norm:
        x = self._rms_rows(x)
      k = jnp.einsum("...D,DNH->...NH", x.astype(dt), kernel, preferred_element_type=jnp.float32)
      return k.reshape(*k.shape[:-2], -1)

    vmask = valid.astype(jnp.float32)                    # [B, T]
    if cfg.memory_match_center:
      token_keys = raw_key(content)
      center = jnp.einsum("BT,BTE->BE", vmask, token_keys) / jnp.maximum(
          jnp.sum(vmask, axis=1), 1.0)[:, None]          # the segment's mean token key [B, E]
    else:
      center = None

    def unit_key(x, lead: int):
      """The direction of key(x) (minus the segment's mean key with centring), x [B, *lead, D]."""
      k = raw_key(x)
      if center is not None:
        k = k - center.reshape(center.shape[:1] + (1,) * lead + center.shape[1:])
      return k * jax.lax.rsqrt(jnp.sum(k * k, axis=-1, keepdims=True) + KEY_EPS)

    def step(carry, xs):
      bank, keys = carry                                 # [B, M, D], [B, M, E] unit keys
      c_t, k_t, f_t, s_t = xs                            # [B, D], [B, E], [B, D], [B] strength * valid
      match = jnp.einsum("BE,BME->BM", k_t, keys)
      fill = jnp.sum(bank * bank, axis=-1)               # [B, M]
      if center is not None:
        # A never-written slot's centred key (-m) means nothing: only written slots can match.
        match = jnp.where(fill > 0, match, -1.0)
      fresh = jax.nn.one_hot(jnp.argmin(fill, axis=-1), cfg.num_slots)
      # Options: each slot (score: the match) or the emptiest slot (score: the threshold).
      logits = MATCH_SHARPNESS * jnp.concatenate(
          [match, jnp.full(match.shape[:1] + (1,), cfg.memory_match_threshold)], axis=-1)
      soft = jax.nn.softmax(logits, axis=-1)
      soft = soft[:, :-1] + soft[:, -1:] * fresh          # [B, M]
      pick = jax.nn.one_hot(jnp.argmax(logits, axis=-1), cfg.num_slots + 1)
      pick = pick[:, :-1] + pick[:, -1:] * fresh         # the hard choice, one-hot [B, M]
      # Straight-through: the forward writes the hard choice; the backward sees the softmax, so the keys
      # learn which slot a token should have rewritten.
      route = (pick + soft - jax.lax.stop_gradient(soft)) * s_t[:, None]
      bank = bank + route[..., None] * (f_t[:, None, :] * bank + c_t[:, None, :] - bank)
      row = jnp.einsum("BM,BMD->BD", pick, bank)         # the rewritten slot
      moved = (pick * (s_t > 0)[:, None])[..., None]
      keys = keys + moved * (unit_key(row, 0)[:, None, :] - keys)
      return (bank, keys), route

    prev = prev_bank.astype(jnp.float32)
    strength = vmask
    if cfg.memory_write_gate:
      s = self.write_strength(constrain(h, TOKEN_AXES))  # [B, T]
      self.sow("intermediates", "write_strength_mean", jnp.sum(s * vmask, axis=1) / jnp.maximum(
          jnp.sum(vmask, axis=1), 1.0))
      strength = s * vmask
    xs = (content, unit_key(content, 1), g_f, strength)
    xs = jax.tree.map(lambda x: jnp.swapaxes(x, 0, 1), xs)  # token axis first
    # A few tokens per loop trip: on CPU the per-trip overhead, not the arithmetic, dominates this scan.
    (bank, _), routes = jax.lax.scan(step, (prev, unit_key(prev, 1)), xs, unroll=min(16, h.shape[1]))
    self.sow("intermediates", "write_routes", jnp.swapaxes(routes, 0, 1)[:, None])  # [B, 1, T, M]
    return constrain(bank, MEMORY_AXES)

  def __call__(self, h: Array, read_bank: Array, prev_bank: Array, valid: Array):
    """Memory read for the segment and the written bank.

    Args:
      h: [B, T, D] the normalised block input of the segment.
      read_bank: [B, M, D] float32, the bank the tokens read (as at the start of the segment).
      prev_bank: [B, M, D] float32, the bank the write updates (== read_bank except in the chained flow).
      valid: [B, T] real (non-padding) tokens; only they are written.
    Returns:
      (read [B, T, D] in the compute dtype, to add to the residual; new bank [B, M, D] float32).
    """
    if self.cfg.memory_write == "delta":
      return self.read_segment(h, read_bank), self.delta_write(h, prev_bank, valid)
    scores = self.scores(h, read_bank)
    return self.read(scores, read_bank), self.write(scores, h, prev_bank, valid)
