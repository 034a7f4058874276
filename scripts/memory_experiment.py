"""One memory ablation on generated qa1 stories, measured at fixed step counts (docs/memory-experiments.md).

    python scripts/memory_experiment.py steps=800 memory_flow=per_block memory_norm=true tag=pbn

Trains `configs/model/small.yaml` with the given ModelConfig overrides (key=value, values parsed as YAML)
on qa1 rows of 4 segments x 16 word tokens (stories of `ns` sentences, default 2..6; loss on the answer),
with AdamW (lr, warm-up 100, cosine to 4000 steps, clip 1, decay 0.1) and batch `bs` (optionally a
curriculum: the first `warm` steps on `warm_ns`-sentence stories), and prints held-out
answer accuracy on 512 test-split rows every `every` steps: overall, by how many segments back the
supporting fact lies, and on rows whose last sentence is not the supporting fact (the recency-shortcut
check). A fixed step budget, not a time budget, so runs compare on a shared, noisy machine. The last line
is `FINAL <tag> {json}`.
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
from lm2_jax.data.qa import QASource  # noqa: E402  pylint: disable=g-import-not-at-top
from lm2_jax.data.tokenizers import make_tokenizer  # noqa: E402  pylint: disable=g-import-not-at-top
from lm2_jax.model import LM2, ModelConfig  # noqa: E402  pylint: disable=g-import-not-at-top

MODEL_KEYS = ("inputs", "targets", "loss_mask", "resets", "valid")
SEGMENTS, EVAL_ROWS = 4, 512


def parse(argv):
  args = dict(a.split("=", 1) for a in argv)
  run = {"steps": int(args.pop("steps", 800)), "every": int(args.pop("every", 100)),
         "lr": float(args.pop("lr", 3e-3)), "bs": int(args.pop("bs", 32)),
         "ntrain": int(args.pop("ntrain", 20000)), "tag": args.pop("tag", "run"),
         "ns": tuple(int(x) for x in args.pop("ns", "2,6").split(",")),
         "warm": int(args.pop("warm", 0)),
         "warm_ns": tuple(int(x) for x in args.pop("warm_ns", "1,2").split(","))}
  model = {"d_model": 128, "mlp_dim": 384, "num_heads": 4, "vocab_size": 384, "segment_length": 16}
  model.update({k: yaml.safe_load(v) for k, v in args.items()})
  return run, model


def rows(split, n, cfg, tokenizer, ns):
  source = QASource("qa1", split, 0, tokenizer, SEGMENTS, cfg.segment_length, n, loss_on="answer",
                    num_sentences=ns if len(ns) > 1 else ns[0])
  items = [source[i] for i in range(n)]
  return {k: np.stack([r[k] for r in items]) for k in items[0]}


def main(argv):
  run, model_kw = parse(argv)
  cfg = ModelConfig.from_yaml("configs/model/small.yaml", **model_kw)
  tokenizer = make_tokenizer("words")
  train, test = (rows("train", run["ntrain"], cfg, tokenizer, run["ns"]),
                 rows("test", EVAL_ROWS, cfg, tokenizer, run["ns"]))
  # Curriculum: the first `warm` steps draw from shorter stories (`warm_ns` sentences).
  easy = rows("train", run["ntrain"], cfg, tokenizer, run["warm_ns"]) if run["warm"] else train
  model = LM2(cfg)
  params = nn.unbox(model.init(jax.random.key(0), jnp.asarray(train["inputs"][:2]))["params"])
  schedule = optax.warmup_cosine_decay_schedule(0.0, run["lr"], 100, 4000, run["lr"] * 0.1)
  opt = optax.chain(optax.clip_by_global_norm(1.0), optax.adamw(
      schedule, b1=0.9, b2=0.95, weight_decay=0.1, mask=jax.tree.map(lambda p: p.ndim >= 2, params)))
  opt_state = opt.init(params)

  def stats(p, b):
    out, _ = model.apply({"params": p}, b["inputs"], b["targets"], b["loss_mask"], resets=b["resets"],
                         valid=b["valid"], method=LM2.loss)
    return out

  @jax.jit
  def step(p, o, b):
    def loss(p):
      s = stats(p, b)
      return s.nll_sum.sum() / jnp.maximum(s.weight_sum.sum(), 1.0)
    value, grads = jax.value_and_grad(loss)(p)
    updates, o = opt.update(grads, o, p)
    return optax.apply_updates(p, updates), o, value

  eval_stats = jax.jit(stats)

  def evaluate(p):
    right = []
    for i in range(0, EVAL_ROWS, 128):
      s = eval_stats(p, {k: jnp.asarray(test[k][i:i + 128]) for k in MODEL_KEYS})
      right.append(np.asarray(s.correct_sum == s.weight_sum))
    right = np.concatenate(right)
    distance = SEGMENTS - 1 - test["fact_segment"]
    by = {int(d): round(float(right[distance == d].mean()), 3) for d in np.unique(distance)}
    elsewhere = test["last_fact_supports"] == 0
    return float(right.mean()), by, round(float(right[elsewhere].mean()), 3)

  rng = np.random.default_rng(0)
  start, loss = time.time(), float("nan")
  for s in range(1, run["steps"] + 1):
    idx = rng.integers(0, run["ntrain"], run["bs"])
    source = easy if s <= run["warm"] else train
    params, opt_state, loss = step(params, opt_state, {k: jnp.asarray(source[k][idx]) for k in MODEL_KEYS})
    if s % run["every"] == 0:
      acc, by, elsewhere = evaluate(params)
      print(f"step {s} t {time.time() - start:.0f}s loss {float(loss):.3f} acc {acc:.3f} {by} "
            f"last-fact-elsewhere {elsewhere}", flush=True)
  acc, by, elsewhere = evaluate(params)
  print("FINAL", run["tag"], json.dumps(dict(model=model_kw, **run, acc=acc, by=by,
                                              last_fact_elsewhere=elsewhere)), flush=True)


if __name__ == "__main__":
  main(sys.argv[1:])
