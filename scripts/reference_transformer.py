"""Calibration for docs/memory-experiments.md: can a plain transformer that sees every fact learn qa1 here?

    python scripts/reference_transformer.py 2,6 8000 2     # story sentences, steps, layers
    python scripts/reference_transformer.py 2,6 2000 2 0.8 # train on dense rows instead (see below)

An independent minimal decoder (learned absolute positions, full causal attention over the whole row,
pre-RMSNorm, GELU MLP, tied embeddings; none of `lm2_jax.model` is used) trained on the same qa1 rows as
`scripts/memory_experiment.py` (4 x 16 word tokens, loss on the answer, AdamW 3e-3, batch 32). No
memory is needed: the facts are in view of ordinary attention. It prints held-out accuracy on 512 test
rows and on the rows whose last sentence is about another actor (where the recency shortcut fails) every
500 steps. If this model cannot bind facts to actors in a step budget, no memory design can be expected to
learn it in that budget either: the binding circuit, not the memory, is what is slow to learn.

With a fourth argument p it trains on dense rows instead: one story of up to 10 sentences per 64-token
row, and after each fact, with probability p, "Where is <an actor met so far>?" and its answer, every
answer in the loss (~3.8 answers per row at p = 0.8). It still evaluates on the standard rows.

`--oracle` hands the model the first step of the binding circuit: every position's input also gets the
embedding of the latest actor name at or before it (so a place token carries its sentence's actor, and
the answer position the asked actor). What is left to learn is the lookup.
"""

import pathlib
import sys
import time

import jax
import jax.numpy as jnp
import numpy as np
import optax

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parents[1]))
from lm2_jax.data import babi  # noqa: E402  pylint: disable=g-import-not-at-top
from lm2_jax.data import qa  # noqa: E402  pylint: disable=g-import-not-at-top
from lm2_jax.data.qa import QASource  # noqa: E402  pylint: disable=g-import-not-at-top
from lm2_jax.data.tokenizers import make_tokenizer  # noqa: E402  pylint: disable=g-import-not-at-top

V, D, HEADS, S, BATCH = 384, 128, 4, 64, 32
KEYS = ("inputs", "targets", "loss_mask", "valid")


def rows(split, n, sentences):
  source = QASource("qa1", split, 0, make_tokenizer("words"), 4, 16, n, num_sentences=sentences)
  items = [source[i] for i in range(n)]
  return {k: np.stack([r[k] for r in items]) for k in items[0]}


def dense_rows(n, prob, rng):
  """n rows of facts interleaved with questions about them; the loss covers every answer and its EOS."""
  tok, out = make_tokenizer("words"), []
  for i in range(n):
    ids, mask, where = [], [], {}
    for sentence in babi.generate("qa1", 0, i, num_sentences=10, split="train").sentences:
      fact = tok.encode(sentence + " ")
      if len(ids) + len(fact) > S:
        break
      ids, mask = ids + fact, mask + [0] * len(fact)
      words = sentence.rstrip(".").split()
      where[words[0]] = words[-1]
      if rng.random() < prob:
        actor = sorted(where)[rng.integers(len(where))]
        question = tok.encode(f"Where is {actor}?") + [tok.sep_id]
        answer = tok.encode(where[actor]) + [tok.eos_id]
        if len(ids) + len(question) + len(answer) > S:
          break
        # Targets of SEP .. the answer's last token are the answer and EOS.
        ids, mask = ids + question + answer, mask + [0] * (len(question) - 1) + [1] * len(answer) + [0]
    inputs = np.asarray(ids + [tok.pad_id] * (S - len(ids)), np.int32)
    out.append({"inputs": inputs, "targets": np.append(inputs[1:], np.int32(tok.pad_id)),
                "loss_mask": np.asarray((mask + [0] * S)[:S], np.float32), "valid": inputs != tok.pad_id})
  return {k: np.stack([r[k] for r in out]) for k in KEYS}


def latest_actor(tokens):
  """[N, S] -> [N, S]: the id of the latest actor name at or before each position (PAD before any)."""
  tok = make_tokenizer("words")
  return qa.latest_actor(tokens, qa.actor_ids("qa1", tok), fill=tok.pad_id)


def init(key, layers):
  keys = iter(jax.random.split(key, 8 * layers + 4))
  normal = lambda *shape: jax.random.normal(next(keys), shape) * 0.02  # noqa: E731
  return {"embed": normal(V, D), "pos": normal(S, D), "final": jnp.ones(D),
          "layers": [{"qkv": normal(D, 3 * D), "out": normal(D, D), "up": normal(D, 4 * D),
                      "down": normal(4 * D, D), "norm1": jnp.ones(D), "norm2": jnp.ones(D)}
                     for _ in range(layers)]}


def rms(x, g):
  return x * jax.lax.rsqrt((x * x).mean(-1, keepdims=True) + 1e-5) * g


def logits(p, tokens, valid, actor=None):
  """[B, S] tokens (and, with --oracle, [B, S] latest-actor ids) -> [B, S, V] logits."""
  h = p["embed"][tokens] + p["pos"][None]
  if actor is not None:
    h = h + p["embed"][actor]
  mask = jnp.tril(jnp.ones((S, S), bool))[None, None] & valid[:, None, None, :]
  for layer in p["layers"]:
    q, k, v = (t.reshape(*t.shape[:2], HEADS, D // HEADS)
               for t in jnp.split(rms(h, layer["norm1"]) @ layer["qkv"], 3, -1))
    scores = jnp.einsum("BSNH,BTNH->BNST", q, k) / np.sqrt(D // HEADS)
    probs = jax.nn.softmax(jnp.where(mask, scores, -1e9), -1)
    h = h + jnp.einsum("BNST,BTNH->BSNH", probs, v).reshape(h.shape) @ layer["out"]
    h = h + jax.nn.gelu(rms(h, layer["norm2"]) @ layer["up"]) @ layer["down"]
  return rms(h, p["final"]) @ p["embed"].T


def loss(p, batch):
  """(mean answer NLL, per-row all-answer-tokens-right)."""
  out = logits(p, batch["inputs"], batch["valid"], batch.get("actor"))
  nll = -jnp.take_along_axis(jax.nn.log_softmax(out), batch["targets"][..., None], -1)[..., 0]
  mask = batch["loss_mask"]
  right = ((out.argmax(-1) == batch["targets"]) * mask).sum(-1) == mask.sum(-1)
  return (nll * mask).sum() / mask.sum(), right


def main(argv):
  oracle = "--oracle" in argv
  argv = [a for a in argv if a != "--oracle"]
  sentences = tuple(int(x) for x in argv[0].split(","))
  steps, layers = int(argv[1]), int(argv[2]) if len(argv) > 2 else 2
  rng = np.random.default_rng(0)
  train = rows("train", 20000, sentences) if len(argv) < 4 else dense_rows(20000, float(argv[3]), rng)
  test = rows("test", 512, sentences)
  print(f"{train['loss_mask'].sum() / 2 / len(train['inputs']):.2f} answers per training row", flush=True)
  keys = KEYS + ("actor",) if oracle else KEYS
  if oracle:
    train["actor"], test["actor"] = latest_actor(train["inputs"]), latest_actor(test["inputs"])
  params = init(jax.random.key(0), layers)
  opt = optax.chain(optax.clip_by_global_norm(1.0), optax.adamw(
      optax.warmup_cosine_decay_schedule(0.0, 3e-3, 100, 4000, 3e-4), b2=0.95, weight_decay=0.1))
  state = opt.init(params)

  @jax.jit
  def step(p, s, batch):
    (value, _), grads = jax.value_and_grad(loss, has_aux=True)(p, batch)
    updates, s = opt.update(grads, s, p)
    return optax.apply_updates(p, updates), s, value

  evaluate = jax.jit(lambda p: loss(p, {k: jnp.asarray(test[k]) for k in keys})[1])
  elsewhere = test["last_fact_supports"] == 0
  start = time.time()
  for s in range(1, steps + 1):
    idx = rng.integers(0, len(train["inputs"]), BATCH)
    params, state, value = step(params, state, {k: jnp.asarray(train[k][idx]) for k in keys})
    if s % 500 == 0 or s == steps:
      right = np.asarray(evaluate(params))
      print(f"step {s} t {time.time() - start:.0f}s loss {float(value):.3f} acc {right.mean():.3f} "
            f"last-fact-elsewhere {right[elsewhere].mean():.3f}", flush=True)


if __name__ == "__main__":
  main(sys.argv[1:])
