"""The lm-evaluation-harness model (`lm2_jax.eval.harness`): its log-likelihoods are the model's own token
log-probabilities (streamed past the trained length), batched generation is the greedy continuation of the
full forward, and lm-eval's command line on a local task gives the project's own multiple-choice and
perplexity figures. Nothing is downloaded: the task reads a JSONL file through the `json` builder."""

import functools
import json
import math
import os
import pathlib
import subprocess
import sys

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from lm_eval.api.instance import Instance

from lm2_jax.data import tokenizers
from lm2_jax.eval import harness, multiple_choice, perplexity
from lm2_jax.eval.checkpoints import CheckpointError, load_model
from lm2_jax.model import LM2, ModelConfig
from lm2_jax.train.checkpoint import Checkpointer
from lm2_jax.train.config import CheckpointConfig, RunConfig, save_config
from lm2_jax.train.state import TrainState

T, SEGMENTS = 8, 2        # trained rows of 16 tokens: most requests below are longer
N = 64                    # the reference full forward's padded length
TOK = tokenizers.make_tokenizer("words")
EOS = TOK.eos_id
ROOT = pathlib.Path(__file__).resolve().parent.parent
STORY = ("Mary went to the kitchen. John went back to the garden. Sandra journeyed to the office. "
         "Daniel moved to the hallway. Where is Mary?")


def make_run(run_dir: pathlib.Path, steps=(3, 5), **model) -> ModelConfig:
  """A train.py run directory (word tokenizer) whose checkpoints hold randomly initialised tiny models
  (step s: seed s). The weights are scaled by 3: at the default init the model repeats its last token,
  and a generation test would not see whether the context reached it."""
  cfg = ModelConfig.from_yaml(ROOT / "configs/model/tiny.yaml", segment_length=T, vocab_size=TOK.vocab_size,
                              **model)
  run = RunConfig(name=run_dir.name, runs_dir=str(run_dir.parent), model=cfg.to_dict(),
                  data={"num_segments": SEGMENTS, "tokenizer": "words"})
  run_dir.mkdir(parents=True)
  save_config(run, run_dir / "config.yaml")
  saver = Checkpointer(run_dir / "checkpoints", CheckpointConfig(async_save=False))
  for step in steps:
    params = nn.unbox(LM2(cfg).init(jax.random.key(step), jnp.zeros((1, T), jnp.int32))["params"])
    params = jax.tree.map(lambda x: 3 * x, params)
    state = TrainState(step=jnp.int32(step), params=params, opt_state=optax.sgd(1e-3).init(params),
                       rng=jax.random.PRNGKey(1))
    saver.save(step, state, None, run.to_dict())
  saver.close()
  return cfg


@pytest.fixture(scope="module")
def run(tmp_path_factory):
  path = tmp_path_factory.mktemp("runs") / "mem"
  make_run(path)
  return path


@pytest.fixture(scope="module")
def lm(run):
  return harness.LM2Harness(run=str(run), batch_size=4)


@functools.partial(jax.jit, static_argnames="cfg")
def _forward(variables, tokens, valid, cfg):
  return LM2(cfg).apply(variables, tokens, valid=valid)[0]


def reference(lm, ids, width=N):
  """By one full forward over `ids` (padded to `width`): log p(ids[i+1] | ids[:i+1]) [n-1], whether that
  token is the argmax [n-1], and the argmax after the last token."""
  n = len(ids)
  assert n <= width
  tokens = jnp.asarray([list(ids) + [0] * (width - n)], jnp.int32)
  logits = _forward(lm.model.variables, tokens, jnp.arange(width)[None] < n, cfg=lm.model.cfg)[0, :n]
  lp = jax.nn.log_softmax(logits[:-1], axis=-1)
  targets = jnp.asarray(ids[1:], jnp.int32)
  return (np.asarray(jnp.take_along_axis(lp, targets[:, None], axis=-1)[:, 0]),
          np.asarray(jnp.argmax(logits[:-1], axis=-1) == targets), int(jnp.argmax(logits[-1])))


def requests(kind, args):
  return [Instance(request_type=kind, doc={}, arguments=a, idx=0) for a in args]


def test_checkpoint_argument_picks_the_step(run, lm):
  assert lm.model.step == 5 and lm.max_length is None
  older = harness.LM2Harness(run=str(run), checkpoint=3)
  assert older.model.step == 3
  leaf = lambda m: jax.tree.leaves(m.model.variables)[0]
  assert not np.array_equal(leaf(older), leaf(lm))
  with pytest.raises(CheckpointError, match="no checkpoint 4"):
    harness.LM2Harness(run=str(run), checkpoint=4)


def test_loglikelihood_is_the_sum_of_token_log_probs(lm):
  """Five requests in batches of 4 (the second padded), contexts up to 3x the trained length."""
  pairs = [(STORY[:-len(" Where is Mary?")], " Where is Mary?"), ("Hi", " there"),
           ("Where is the milk?\nAnswer:", " in the hallway"), ("", "Mary went"), ("Daniel", " moved")]
  results = lm.loglikelihood(requests("loglikelihood", pairs), disable_tqdm=True)
  for (context, continuation), (ll, greedy) in zip(pairs, results):
    ctx = TOK.encode(context) or [EOS]
    lp, hit, _ = reference(lm, ctx + TOK.encode(continuation))
    assert ll == pytest.approx(lp[len(ctx) - 1:].sum(), rel=1e-5)
    assert greedy == hit[len(ctx) - 1:].all()
  assert len(TOK.encode(pairs[0][0])) > 3 * T
  assert len({round(ll, 3) for ll, _ in results}) == len(pairs)
  # A continuation that is the model's own greedy choice is greedy.
  ctx, cont = TOK.encode(STORY), []
  for _ in range(3):
    cont.append(reference(lm, ctx + cont)[2])
  [(ll, greedy)] = lm._loglikelihood_tokens([(None, ctx, cont)], disable_tqdm=True)
  lp, hit, _ = reference(lm, ctx + cont)
  assert greedy and hit[-3:].all() and ll == pytest.approx(lp[-3:].sum(), rel=1e-5)


def test_rolling_loglikelihood_scores_every_token_once_after_eos(lm):
  docs = [STORY, "Mary"]
  got = lm.loglikelihood_rolling(requests("loglikelihood_rolling", [(d,) for d in docs]), disable_tqdm=True)
  for doc, ll in zip(docs, got):
    lp, _, _ = reference(lm, [EOS] + TOK.encode(doc))
    assert len(lp) == len(TOK.encode(doc))
    assert ll == pytest.approx(lp.sum(), rel=1e-5)


def test_generation_batched_equals_alone_equals_greedy_full_forward(lm, monkeypatch):
  """Prompts ending at offsets 6, 3, 0 and 4 of a segment: 3, 0 and 4 share a batch (5 new tokens fit
  their shared unfinished segment), 6 does not. Batched, one at a time and the greedy continuation of the
  full forward agree; a stop string cuts the text."""
  story = TOK.encode(STORY)
  prompts = [TOK.decode(story[:n]) for n in (14, 3, 24, 12)]
  assert [len(TOK.encode(p)) for p in prompts] == [14, 3, 24, 12]
  new = 5

  def greedy(prompt):
    ids = TOK.encode(prompt)
    for _ in range(new):
      token = reference(lm, ids)[2]
      if token == EOS:
        break
      ids.append(token)
    return TOK.decode(ids[len(TOK.encode(prompt)):])

  expected = [greedy(p) for p in prompts]
  args = [(p, {"until": ["\n\n"], "max_gen_toks": new}) for p in prompts]
  batched = lm.generate_until(requests("generate_until", args), disable_tqdm=True)
  lm.batch_size = 1
  try:
    alone = lm.generate_until(requests("generate_until", args), disable_tqdm=True)
  finally:
    lm.batch_size = 4
  assert batched == alone == expected, (batched, alone, expected)
  assert len(set(expected)) == len(prompts)
  # A stop string cuts the text and ends the generation (fewer tokens fed to the decoder).
  fed = []
  feed = lm._decoder.feed
  monkeypatch.setattr(lm._decoder, "feed", lambda state, tokens, *a: fed.append(tokens.shape[1]) or
                      feed(state, tokens, *a))
  stop = expected[0].split()[1]
  outputs = {}
  for until in ([], [stop]):
    fed.clear()
    [outputs[bool(until)]] = lm.generate_until(
        requests("generate_until", [(prompts[0], {"until": until, "max_gen_toks": new})]), disable_tqdm=True)
    outputs[f"fed {bool(until)}"] = len(fed)
  assert outputs[False] == expected[0]
  assert outputs[True] == expected[0].split(stop)[0] and len(outputs[True]) < len(expected[0])
  assert outputs["fed True"] < outputs["fed False"]


def test_full_attention_model_sees_its_last_max_length_tokens(tmp_path):
  """A memory-less full-attention run: a long context is cut to the trained 16 tokens; a long document is
  scored in lm-eval's rolling windows of 16."""
  make_run(tmp_path / "full", steps=(1,), use_memory=False, attention="full")
  lm = harness.LM2Harness(run=str(tmp_path / "full"), batch_size=2)
  assert lm.max_length == 16
  story = TOK.encode(STORY)
  context, continuation = story[:-3], story[-3:]
  [(ll, _)] = lm._loglikelihood_tokens([(None, context, continuation)], disable_tqdm=True)
  lp, _, _ = reference(lm, story[-17:])   # 16 inputs
  assert ll == pytest.approx(lp[-3:].sum(), rel=1e-5)
  doc = story[:24]                        # windows predict 16 tokens, then 8 after the 8 before them
  [rolling] = lm.loglikelihood_rolling(requests("loglikelihood_rolling", [(TOK.decode(doc),)]),
                                       disable_tqdm=True)
  first, _, _ = reference(lm, [EOS] + doc[:16])
  second, _, _ = reference(lm, doc[7:])
  assert rolling == pytest.approx(first.sum() + second[-8:].sum(), rel=1e-5)


TASKS = """\
task: lm2_test_mc
dataset_path: json
dataset_kwargs:
  data_files:
    test: {mc}
test_split: test
output_type: multiple_choice
doc_to_text: "{{{{question}}}}\\nAnswer:"
doc_to_choice: "{{{{choices}}}}"
doc_to_target: answer
metric_list:
  - metric: acc
---
task: lm2_test_ppl
dataset_path: json
dataset_kwargs:
  data_files:
    test: {docs}
test_split: test
output_type: loglikelihood_rolling
doc_to_text: ""
doc_to_target: "{{{{text}}}}"
metric_list:
  - metric: bits_per_byte
"""

MC_ITEMS = [
    {"question": "Where is Mary?", "choices": ["kitchen", "garden", "the hallway"], "answer": 0},
    {"question": "What is Sandra carrying?", "choices": ["milk", "an apple"], "answer": 0},
    {"question": "Where was John before the office?", "choices": ["bedroom", "garden", "hallway", "office"],
     "answer": 0},
    {"question": "Is Daniel in the park?", "choices": ["yes", "no", "maybe"], "answer": 0},
]
DOCS = [STORY, "Sandra went to the office."]


@pytest.mark.slow
def test_lm_eval_command_line_gives_the_project_figures(run, tmp_path):
  """`python -m lm2_jax.eval.harness` (lm-eval's CLI with the model registered) on a local YAML task, offline:
  its multiple-choice accuracy and per-item picks are `eval.py mc`'s, and its bits per byte is the
  project's streamed perplexity scorer's on the same documents."""
  mc = tmp_path / "mc.jsonl"
  mc.write_text("".join(json.dumps(i) + "\n" for i in MC_ITEMS))
  docs = tmp_path / "docs.jsonl"
  docs.write_text("".join(json.dumps({"text": d}) + "\n" for d in DOCS))
  tasks = tmp_path / "tasks"
  tasks.mkdir()
  for i, text in enumerate(TASKS.format(mc=mc, docs=docs).split("---\n")):
    (tasks / f"task{i}.yaml").write_text(text)
  env = {**os.environ, "HF_DATASETS_OFFLINE": "1", "HF_HUB_OFFLINE": "1", "HF_HOME": str(tmp_path / "hf"),
         "JAX_PLATFORMS": "cpu", "PYTHONPATH": str(ROOT)}
  out = tmp_path / "out"
  command = [sys.executable, "-m", "lm2_jax.eval.harness", "--model", "lm2_jax", "--model_args",
             f"run={run},checkpoint=5", "--tasks", "lm2_test_mc,lm2_test_ppl", "--include_path", str(tasks),
             "--batch_size", "4", "--output_path", str(out), "--log_samples"]
  done = subprocess.run(command, env=env, cwd=tmp_path, capture_output=True, text=True, timeout=600)
  assert done.returncode == 0, done.stderr[-3000:]
  assert "lm2_test_mc" in done.stdout
  [results] = out.rglob("results_*.json")
  figures = json.loads(results.read_text())["results"]
  [samples] = out.rglob("samples_lm2_test_mc_*.jsonl")
  picks = [int(np.argmax([float(r[0]) for r in json.loads(line)["filtered_resps"]]))
           for line in samples.read_text().splitlines()]

  model = load_model(run)
  own = multiple_choice.evaluate(model, multiple_choice.read_jsonl(mc), progress=False)
  assert sorted(json.loads(line)["doc_id"] for line in samples.read_text().splitlines()) == [0, 1, 2, 3]
  order = [json.loads(line)["doc_id"] for line in samples.read_text().splitlines()]
  assert [picks[order.index(i)] for i in range(4)] == own["predictions"]
  assert figures["lm2_test_mc"]["acc,none"] == own["accuracy"]
  assert len(set(own["predictions"])) > 1       # the picks are not all the same choice

  scorer = perplexity.SegmentScorer(model.cfg, model.variables)
  nll = 0.0
  for doc in DOCS:
    ids = np.asarray([[EOS] + TOK.encode(doc)], np.int32)
    nll += float(scorer(ids, np.ones(ids.shape, np.float32))[0][0])
  bits_per_byte = nll / sum(len(d.encode()) for d in DOCS) / math.log(2)
  assert figures["lm2_test_ppl"]["bits_per_byte,none"] == pytest.approx(bits_per_byte, rel=1e-5)
