"""An lm-evaluation-harness model: `lm_eval --model lm2_jax --model_args run=runs/NAME[,checkpoint=STEP]`.

lm-eval finds models in its registry only (it reads no entry points), so the model must be registered in
the process that runs the harness. Importing this module does it (`lm2_jax` is registered as a lazy
reference to `LM2Harness`), and running it is lm-eval's own command line after that registration:

    python -m lm2_jax.eval.harness --model lm2_jax --model_args run=runs/default --tasks TASK \\
        [--include_path DIR_OF_TASK_YAMLS] [--batch_size 16] [any other lm_eval option]

Model arguments (`--model_args k=v,...`): `run` (a run, checkpoints or step directory), `checkpoint` (a
step of that run; default the newest), `max_length` (the context of a full-attention model; default the
trained row length), `max_gen_toks` (default 256), `seed` (for sampled generation).

Every request runs on the jitted streaming path, with the memory carried across segments, so a context
longer than the trained length is streamed segment by segment, never truncated (a `full`-attention
baseline, which has no memory, sees the last `max_length` tokens instead):
  - `loglikelihood`: `LM2.loss` per segment on [B, T] with the carried memory; the log-likelihood is minus
    the summed NLL of the continuation's tokens, `is_greedy` whether argmax hit every one of them.
  - `loglikelihood_rolling`: the document after one EOS (the token that separates packed training
    documents) is one stream: every token is predicted once, from everything before it.
  - `generate_until`: the `Decoder` (segment forward for whole segments, a KV cache within a segment).
    Rows of a batch must end their prompts together: each row's whole segments are right-aligned behind
    all-padding segments (which leave the memory unchanged) and its unfinished segment is right-aligned
    in a common chunk (relative positions, padding masked). That gives each row the logits it gets alone
    while the shared segment has room for the generation; rows whose generation would fill it are only
    batched with rows whose prompts end at the same position of a segment.
Batches have a fixed number of rows (`--batch_size`; a short batch repeats its last row), so each jitted
function compiles once per shape. Greedy unless `do_sample` (then `temperature`, `top_k`, `top_p`).
"""

from __future__ import annotations

import collections
import logging
import pathlib
import sys
from typing import Sequence

import jax
import jax.numpy as jnp
import numpy as np
from lm_eval import utils as lm_utils
from lm_eval.api.model import TemplateLM
from lm_eval.api.registry import model_registry
from tqdm import tqdm

from lm2_jax.eval.checkpoints import CheckpointError, load_model
from lm2_jax.model import LM2
from lm2_jax.model.decode import Decoder, sample_logits

log = logging.getLogger(__name__)

MODEL_NAME = "lm2_jax"
DEFAULT_BATCH_SIZE = 16


def register() -> None:
  """Registers `lm2_jax` in lm-eval's model registry (idempotent; the class is imported on first use)."""
  import lm_eval.models  # pylint: disable=g-import-not-at-top,unused-import  # the built-in models too
  if MODEL_NAME not in model_registry:
    model_registry.register(MODEL_NAME, target=f"{__spec__.name if __spec__ else __name__}:LM2Harness")


class LM2Harness(TemplateLM):
  """An LM2 checkpoint as an lm-eval model (see the module docstring).

  Attributes:
    model: the `EvalModel` (config, parameters, tokenizer, trained length).
    tokenizer: its tokenizer.
    width: tokens per jitted step: the segment length, or `max_length` for a full-attention model.
    batch_size: rows per jitted call.
  """

  def __init__(self, run: str, checkpoint: int | str | None = None, batch_size: int | str | None = None,
               max_length: int | None = None, max_gen_toks: int = 256, seed: int = 0,
               max_batch_size: int | None = None, device: str | None = None):
    super().__init__()
    del max_batch_size  # no automatic batch sizing: `auto` picks DEFAULT_BATCH_SIZE
    if device is not None:
      log.info("device=%s ignored: JAX runs on %s", device, jax.devices()[0].platform)
    path = pathlib.Path(run)
    if checkpoint is not None:
      path = path / "checkpoints" / str(checkpoint)
      if not path.is_dir():
        raise CheckpointError(f"{run} has no checkpoint {checkpoint} (no directory {path})")
    self.model = load_model(path)
    self.tokenizer = self.model.tokenizer
    cfg = self.model.cfg
    self.full = cfg.attention == "full"
    length = max_length or self.model.trained_length
    if self.full and not length:
      raise ValueError(f"{run}: a full-attention model needs max_length= (its run names no trained length)")
    self.width = int(length) if self.full else cfg.segment_length
    auto = batch_size is None or str(batch_size).startswith("auto")
    self.batch_size = DEFAULT_BATCH_SIZE if auto else int(batch_size)
    self.max_gen_toks = int(max_gen_toks)
    self._rng = jax.random.key(int(seed))
    self._loss = jax.jit(self._loss_fn)
    self._decoder = None

  # --- lm-eval's tokenizer interface -------------------------------------------------------------------

  @property
  def eot_token_id(self) -> int:
    return self.tokenizer.eos_id

  @property
  def max_length(self) -> int | None:
    """The context the model attends to at once (None: unbounded, streamed through the memory)."""
    return self.width if self.full else None

  @property
  def tokenizer_name(self) -> str:
    return f"{type(self.tokenizer).__name__}:{self.model.source}"

  def tok_encode(self, string: str, add_special_tokens: bool | None = None, **kwargs) -> list[int]:
    del add_special_tokens, kwargs
    return self.tokenizer.encode(string)

  def tok_decode(self, tokens) -> str:
    return self.tokenizer.decode(tokens)

  def get_model_info(self) -> dict:
    return {"model_source": self.model.source, "model_step": self.model.step,
            "model_num_parameters": int(sum(x.size for x in jax.tree.leaves(self.model.variables)))}

  # --- scoring ------------------------------------------------------------------------------------------

  def _loss_fn(self, variables, tokens, targets, weights, valid, memory):
    stats, memory = LM2(self.model.cfg).apply(variables, tokens, targets, weights, memory=memory,
                                              valid=valid, method=LM2.loss)
    return stats.nll_sum, stats.weight_sum, stats.correct_sum, memory

  def score(self, rows: Sequence[tuple[Sequence[int], int]], progress: bool = False
            ) -> list[tuple[float, bool]]:
    """(log-likelihood, greedy) of the last `n` tokens of each (tokens, n), each predicted from all before.

    Rows are sorted by length and batched; each batch runs segment by segment with the memory carried
    (one [B, width] step per segment). A full-attention model sees at most `width` tokens: the caller cuts.
    """
    out: list[tuple[float, bool] | None] = [None] * len(rows)
    order = sorted(range(len(rows)), key=lambda i: -len(rows[i][0]))
    b, t = self.batch_size, self.width
    for start in tqdm(range(0, len(order), b), desc="lm2_jax loglikelihood", disable=not progress):
      chunk = order[start:start + b]
      longest = max(len(rows[i][0]) - 1 for i in chunk)
      n = max(1, -(-longest // t)) * t
      tokens = np.zeros((b, n), np.int32)
      targets = np.zeros((b, n), np.int32)
      weights = np.zeros((b, n), np.float32)
      valid = np.zeros((b, n), bool)
      for row, i in enumerate(chunk + [chunk[-1]] * (b - len(chunk))):
        ids, scored = rows[i]
        m = len(ids) - 1
        if scored > m:
          raise ValueError(f"cannot score {scored} of {len(ids)} tokens: the first token has no prediction")
        tokens[row, :m], targets[row, :m], valid[row, :m] = ids[:-1], ids[1:], True
        weights[row, m - scored:m] = 1.0
      memory = LM2(self.model.cfg).apply(self.model.variables, b, method=LM2.initial_memory)
      nll = count = correct = 0.0
      for s in range(0, n, t):
        seg = slice(s, s + t)
        seg_nll, seg_count, seg_correct, memory = self._loss(
            self.model.variables, jnp.asarray(tokens[:, seg]), jnp.asarray(targets[:, seg]),
            jnp.asarray(weights[:, seg]), jnp.asarray(valid[:, seg]), memory)
        nll, count, correct = nll + seg_nll, count + seg_count, correct + seg_correct
      nll, count, correct = (np.asarray(x, np.float64) for x in (nll, count, correct))
      for row, i in enumerate(chunk):
        out[i] = (-float(nll[row]), bool(correct[row] == count[row]))
    return out

  def _loglikelihood_tokens(self, requests, disable_tqdm: bool = False, **kwargs) -> list[tuple[float, bool]]:
    rows = []
    for _, context, continuation in requests:
      ids = list(context) + list(continuation)
      scored = len(continuation)
      if self.full:
        ids = ids[-(self.width + 1):]
        scored = min(scored, len(ids) - 1)
      rows.append((ids, scored))
    results = self.score(rows, progress=not disable_tqdm)
    for (key, _, _), result in zip(requests, results):
      if key is not None:
        self.cache_hook.add_partial("loglikelihood", key, result)
    return results

  def loglikelihood_rolling(self, requests, disable_tqdm: bool = False) -> list[float]:
    rows, owner = [], []
    for index, request in enumerate(requests):
      ids = self.tok_encode(request.args[0])
      if self.full:
        windows = map(lm_utils.make_disjoint_window,
                      lm_utils.get_rolling_token_windows(ids, self.prefix_token_id, self.width, 1))
        pieces = [(list(ctx) + list(pred), len(pred)) for ctx, pred in windows]
      else:
        pieces = [([self.prefix_token_id] + ids, len(ids))] if ids else []
      rows += pieces
      owner += [index] * len(pieces)
    totals = [0.0] * len(requests)
    for index, (ll, _) in zip(owner, self.score(rows, progress=not disable_tqdm)):
      totals[index] += ll
    for request, total in zip(requests, totals):
      self.cache_hook.add_partial("loglikelihood_rolling", request.args, total)
    return totals

  # --- generation ---------------------------------------------------------------------------------------

  def _gen_options(self, gen_kwargs: dict) -> dict:
    kwargs = dict(gen_kwargs or {})
    until = kwargs.pop("until", None) or []
    until = [until] if isinstance(until, str) else list(until)
    max_gen = int(kwargs.pop("max_gen_toks", self.max_gen_toks))
    if self.full and max_gen >= self.width:
      raise ValueError(f"max_gen_toks={max_gen} leaves no room for a prompt in the {self.width}-token "
                       "context")
    temperature = float(kwargs.pop("temperature", 0.0) or 0.0)
    if not kwargs.pop("do_sample", temperature > 0):
      temperature = 0.0        # greedy
    elif temperature == 0.0:
      temperature = 1.0
    options = {"until": until, "max_gen": max_gen, "temperature": temperature,
               "top_k": kwargs.pop("top_k", None), "top_p": kwargs.pop("top_p", None)}
    if kwargs:
      log.warning("generation options %s are not used by lm2_jax", sorted(kwargs))
    return options

  def generate_until(self, requests, disable_tqdm: bool = False) -> list[str]:
    if self._decoder is None:
      self._decoder = Decoder(self.model.cfg, self.model.variables,
                              max_length=self.width if self.full else None)
    t = self.width
    groups = collections.defaultdict(list)
    prompts, all_options = [], []
    for index, request in enumerate(requests):
      context, gen_kwargs = request.args
      options = self._gen_options(gen_kwargs)
      ids = self.tok_encode(context) or [self.prefix_token_id]
      if self.full:
        ids = ids[-(t - options["max_gen"]):]
      prompts.append(ids)
      all_options.append(options)
      # Rows share a batch when the shared unfinished segment has room for every fed token (see the
      # module docstring); otherwise only with rows whose prompts end at the same offset in a segment.
      offset = len(ids) % t
      fits = self.full or offset + options["max_gen"] - 1 <= t
      key = (repr(sorted(options.items())), None if fits else offset)
      groups[key].append(index)
    out: list[str | None] = [None] * len(requests)
    batches = []
    for members in groups.values():
      members.sort(key=lambda i: -len(prompts[i]))
      batches += [members[s:s + self.batch_size] for s in range(0, len(members), self.batch_size)]
    for chunk in tqdm(batches, desc="lm2_jax generate_until", disable=disable_tqdm):
      texts = self._generate([prompts[i] for i in chunk], all_options[chunk[0]])
      for i, text in zip(chunk, texts):
        out[i] = text
        self.cache_hook.add_partial("generate_until", requests[i].args, text)
    return out

  def _generate(self, prompts: list[list[int]], options: dict) -> list[str]:
    """Generations for one batch of prompts laid out as in the module docstring."""
    decoder, t, b = self._decoder, self.width, self.batch_size
    rows = prompts + [prompts[-1]] * (b - len(prompts))
    whole = [len(p) // t if not self.full else 0 for p in rows]
    q, r = max(whole), max(len(p) - w * t for p, w in zip(rows, whole))
    tokens = np.full((b, q * t + r), self.tokenizer.pad_id, np.int32)
    valid = np.zeros(tokens.shape, bool)
    last = np.zeros((b,), np.int64)
    for row, (ids, w) in enumerate(zip(rows, whole)):
      head, tail = ids[:w * t], ids[w * t:]
      tokens[row, (q - w) * t:q * t], valid[row, (q - w) * t:q * t] = head, True
      tokens[row, q * t + r - len(tail):], valid[row, q * t + r - len(tail):] = tail, True
      last[row] = q * t + r - 1 if tail else q * t - 1
    state = decoder.init_state(b)
    last_logits = None
    for s in range(0, tokens.shape[1], t):
      piece = slice(s, min(s + t, tokens.shape[1]))
      logits, state = decoder.feed(state, tokens[:, piece], valid[:, piece])
      in_piece = (last >= piece.start) & (last < piece.stop)
      picked = logits[jnp.arange(b), jnp.asarray(np.clip(last - piece.start, 0, logits.shape[1] - 1))]
      last_logits = picked if last_logits is None else jnp.where(jnp.asarray(in_piece)[:, None], picked,
                                                                  last_logits)
    generated = [[] for _ in range(b)]
    done = np.zeros((b,), bool)
    logits = last_logits
    for step in range(options["max_gen"]):
      self._rng, key = jax.random.split(self._rng)
      token = np.asarray(sample_logits(logits, key, options["temperature"], options["top_k"],
                                       options["top_p"]))
      for row in np.flatnonzero(~done):
        if token[row] == self.tokenizer.eos_id:
          done[row] = True
          continue
        generated[row].append(int(token[row]))
        text = self.tokenizer.decode(generated[row])
        done[row] = any(stop in text for stop in options["until"])
      if done[:len(prompts)].all() or step == options["max_gen"] - 1:
        break
      logits, state = decoder.feed(state, token[:, None])
      logits = logits[:, -1]
    texts = []
    for ids in generated[:len(prompts)]:
      text = self.tokenizer.decode(ids)
      for stop in options["until"]:
        text = text.split(stop)[0]
      texts.append(text)
    return texts


register()


def main(argv: Sequence[str] | None = None) -> None:
  """lm-eval's command line with `lm2_jax` registered (arguments as for `lm_eval`)."""
  from lm_eval.__main__ import cli_evaluate  # pylint: disable=g-import-not-at-top
  sys.argv = ["lm_eval", *(sys.argv[1:] if argv is None else argv)]
  cli_evaluate()


if __name__ == "__main__":
  main()
