"""One memory ablation on generated qa1 stories, measured at fixed step counts (docs/memory-experiments.md).

    python scripts/memory_experiment.py steps=800 memory_flow=per_block memory_norm=true tag=pbn

Trains `configs/model/small.yaml` with the given ModelConfig overrides (key=value, values parsed as YAML)
on qa1 rows of 4 segments x 16 word tokens (stories of `ns` sentences, default 2..6; loss on the answer;
`q=every` adds a question after each context segment, `data.questions: every`), with AdamW (lr, warm-up
100, cosine to 4000 steps, clip 1, decay 0.1) and batch `bs`. Curricula: the first `warm` steps on
`warm_ns`-sentence stories; or, for the first `hard` steps, a `hard_frac` share of each batch from rows
whose last sentence is about another actor. `use_memory=false attention=full` is the calibration: every
fact in view of ordinary attention. `segments=C` sets the row's segment count (with `segment_length=8`
and `segments=7` each segment holds one fact). `mi=w` adds -w x the mutual information between a token and
the slot it writes to (slot-routed writes). `oracle=1` adds to every position's input embedding the
embedding of the latest actor name at or before it (the first step of the binding circuit, by hand).

Every `every` steps it prints held-out answer accuracy on 512 test-split rows (overall, by how many
segments back the supporting fact lies, and on rows whose last sentence is not the supporting fact: the
recency-shortcut check) and a `diag` line per memory block: read entropy at the answer position (/ log M),
effective number of slots a row's context writes to (exp of the entropy of its routed mass; slot-routed
writes only), and the mean input / forget gates. A fixed step budget, not a time budget, so runs compare
on a shared, noisy machine. The last line is `FINAL <tag> {json}`.
"""

import json
import pathlib
import sys
import time

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax
import yaml

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parents[1]))
from lm2_jax.data import qa  # noqa: E402  pylint: disable=g-import-not-at-top
from lm2_jax.data.qa import QASource  # noqa: E402  pylint: disable=g-import-not-at-top
from lm2_jax.data.tokenizers import make_tokenizer  # noqa: E402  pylint: disable=g-import-not-at-top
from lm2_jax.model import LM2, ModelConfig  # noqa: E402  pylint: disable=g-import-not-at-top

MODEL_KEYS = ("inputs", "targets", "loss_mask", "resets", "valid")
EVAL_ROWS = 512


def parse(argv):
  args = dict(a.split("=", 1) for a in argv)
  run = {"steps": int(args.pop("steps", 800)), "every": int(args.pop("every", 100)),
         "lr": float(args.pop("lr", 3e-3)), "bs": int(args.pop("bs", 32)),
         "ntrain": int(args.pop("ntrain", 20000)), "tag": args.pop("tag", "run"),
         "ns": tuple(int(x) for x in args.pop("ns", "2,6").split(",")),
         "warm": int(args.pop("warm", 0)), "hard": int(args.pop("hard", 0)),
         "hard_frac": float(args.pop("hard_frac", 1.0)), "q": args.pop("q", "final"),
         "segments": int(args.pop("segments", 4)), "mi": float(args.pop("mi", 0.0)),
         "oracle": int(args.pop("oracle", 0)),
         "warm_ns": tuple(int(x) for x in args.pop("warm_ns", "1,2").split(","))}
  model = {"d_model": 128, "mlp_dim": 384, "num_heads": 4, "vocab_size": 384, "segment_length": 16}
  model.update({k: yaml.safe_load(v) for k, v in args.items()})
  return run, model


def rows(split, n, cfg, tokenizer, ns, segments, questions="final"):
  source = QASource("qa1", split, 0, tokenizer, segments, cfg.segment_length, n, loss_on="answer",
                    num_sentences=ns if len(ns) > 1 else ns[0], questions=questions)
  items = [source[i] for i in range(n)]
  return {k: np.stack([r[k] for r in items]) for k in items[0]}


def main(argv):
  run, model_kw = parse(argv)
  cfg = ModelConfig.from_yaml("configs/model/small.yaml", **model_kw)
  C = run["segments"]
  tokenizer = make_tokenizer("words")
  train, test = (rows("train", run["ntrain"], cfg, tokenizer, run["ns"], C, run["q"]),
                 rows("test", EVAL_ROWS, cfg, tokenizer, run["ns"], C))
  keys = MODEL_KEYS + ("actor",) if run["oracle"] else MODEL_KEYS
  if run["oracle"]:
    actors = qa.actor_ids("qa1", tokenizer)
    train["actor"], test["actor"] = (qa.latest_actor(train["inputs"], actors, fill=tokenizer.pad_id),
                                     qa.latest_actor(test["inputs"], actors, fill=tokenizer.pad_id))
  # Curriculum: the first `warm` steps draw from shorter stories (`warm_ns` sentences).
  easy = rows("train", run["ntrain"], cfg, tokenizer, run["warm_ns"], C) if run["warm"] else train
  model = LM2(cfg)
  params = nn.unbox(model.init(jax.random.key(0), jnp.asarray(train["inputs"][:2]))["params"])
  schedule = optax.warmup_cosine_decay_schedule(0.0, run["lr"], 100, 4000, run["lr"] * 0.1)
  opt = optax.chain(optax.clip_by_global_norm(1.0), optax.adamw(
      schedule, b1=0.9, b2=0.95, weight_decay=0.1, mask=jax.tree.map(lambda p: p.ndim >= 2, params)))
  opt_state = opt.init(params)

  def model_inputs(p, b):
    """(tokens, inputs_embeds): with `oracle=1` every position's embedding also gets its latest actor's."""
    if not run["oracle"]:
      return b["inputs"], None
    table = p["embed"]["embedding"]
    return None, table[b["inputs"]] + table[b["actor"]]

  def forward(p, b, trace=False):
    """(LossStats, the sown intermediates if `trace`, else None) of batch b."""
    resets = b["resets"][:, :1] if cfg.attention == "full" else b["resets"]  # full: one long segment
    tokens, embeds = model_inputs(p, b)
    out = model.apply({"params": p}, tokens, b["targets"], b["loss_mask"], resets=resets, valid=b["valid"],
                      method=LM2.loss, inputs_embeds=embeds, mutable=["intermediates"] if trace else False)
    if not trace:
      return out[0], None
    (stats, _), state = out
    return stats, state.get("intermediates", {})

  def route_information(inter):
    """Mean over memory blocks of I(token; slot) / log M of the context segments' write routing.

    High when each token routes sharply and a row's tokens spread over many slots; 0 both for uniform
    routing and for routing that sends every token to the same slot (the collapse seen in the diag).
    """
    infos = []
    for block in inter.values():
      if "write_routes" not in block.get("memory", {}):
        continue
      r = block["memory"]["write_routes"][0][:-1] + 1e-9          # [C-1, B, Nm, T, M], padding rows 0
      w = r.sum(-1, keepdims=True)                                 # 1 on real tokens, ~0 on padding
      h_tok = -(r / w * jnp.log(r / w)).sum(-1, keepdims=True)
      mean = (r.sum((0, 3)) / w.sum((0, 3)))                       # [B, Nm, M]
      h_row = -(mean * jnp.log(mean)).sum(-1)
      h_tok = (h_tok * w).sum((0, 3, 4)) / w.sum((0, 3, 4))        # [B, Nm]
      infos.append(jnp.mean(h_row - h_tok) / jnp.log(cfg.num_slots))
    return jnp.mean(jnp.stack(infos))

  @jax.jit
  def step(p, o, b):
    def loss(p):
      s, inter = forward(p, b, trace=run["mi"] > 0)
      nll = s.nll_sum.sum() / jnp.maximum(s.weight_sum.sum(), 1.0)
      return nll - run["mi"] * route_information(inter) if inter is not None else nll
    value, grads = jax.value_and_grad(loss)(p)
    updates, o = opt.update(grads, o, p)
    return optax.apply_updates(p, updates), o, value

  eval_stats = jax.jit(lambda p, b: forward(p, b)[0])
  probe = jax.jit(lambda p, b: forward(p, b, trace=True)[1])

  def diagnose(p):
    """Per memory block: read entropy at the answer position (/ log M), effective slots written per row
    (exp of the entropy of the row's routed mass over slots and segments), mean input/forget gates."""
    b = {k: jnp.asarray(test[k][:128]) for k in keys}
    inter = jax.tree.map(np.asarray, probe(p, b))
    answer_pos = int(np.argmax(test["loss_mask"][0])) - (C - 1) * cfg.segment_length
    out = {}
    for name in sorted(inter):
      mem = inter[name].get("memory", {})
      if "read_attention" not in mem:
        continue
      read = mem["read_attention"][0][-1][:, :, answer_pos]          # [B, Nm, M], last segment
      ent = -(read * np.log(read + 1e-9)).sum(-1).mean() / np.log(cfg.num_slots)
      row = {"read_H": round(float(ent), 2)}
      if "write_routes" in mem:
        mass = mem["write_routes"][0][:-1].sum((0, 3))              # [B, Nm, M] over context segments
        q = mass / mass.sum(-1, keepdims=True)
        row["slots_used"] = round(float(np.exp(-(q * np.log(q + 1e-9)).sum(-1)).mean()), 1)
      for g in ("input_gate_mean", "forget_gate_mean"):
        if g in mem:
          row[g[0] + "g"] = round(float(mem[g][0][:-1].mean()), 2)
      out[name.replace("block_", "b")] = row
    return out

  def evaluate(p):
    right = []
    for i in range(0, EVAL_ROWS, 128):
      s = eval_stats(p, {k: jnp.asarray(test[k][i:i + 128]) for k in keys})
      right.append(np.asarray(s.correct_sum == s.weight_sum))
    right = np.concatenate(right)
    distance = C - 1 - test["fact_segment"]
    by = {int(d): round(float(right[distance == d].mean()), 3) for d in np.unique(distance)}
    elsewhere = test["last_fact_supports"] == 0
    return float(right.mean()), by, round(float(right[elsewhere].mean()), 3)

  rng = np.random.default_rng(0)
  hard_rows = np.flatnonzero(train["last_fact_supports"] == 0)
  start, loss = time.time(), float("nan")
  for s in range(1, run["steps"] + 1):
    idx = rng.integers(0, run["ntrain"], run["bs"])
    if s <= run["hard"]:
      # Anti-shortcut phase: a `hard_frac` share of the batch has a last sentence about another actor.
      n_hard = int(round(run["hard_frac"] * run["bs"]))
      idx[:n_hard] = rng.choice(hard_rows, n_hard)
    source = easy if s <= run["warm"] else train
    params, opt_state, loss = step(params, opt_state, {k: jnp.asarray(source[k][idx]) for k in keys})
    if s % run["every"] == 0:
      acc, by, elsewhere = evaluate(params)
      print(f"step {s} t {time.time() - start:.0f}s loss {float(loss):.3f} acc {acc:.3f} {by} "
            f"last-fact-elsewhere {elsewhere}", flush=True)
      print("  diag", json.dumps(diagnose(params)), flush=True)
  acc, by, elsewhere = evaluate(params)
  print("FINAL", run["tag"], json.dumps(dict(model=model_kw, **run, acc=acc, by=by,
                                              last_fact_elsewhere=elsewhere)), flush=True)


if __name__ == "__main__":
  main(sys.argv[1:])
