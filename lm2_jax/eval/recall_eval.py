"""Answer accuracy of a trained recall or qa run streamed over k times the segments it trained on (issue
12's length check, issue 13's Table 1 at 4x and 16x).

The run's own held-out rows (the data section of its saved config) are rebuilt with k * C segments: the
facts stay in the first C-1 segments, and segments between them and the last one hold only filler (recall:
`data.recall_filler` filler tokens each; qa: filler sentences at the run's `data.filler_density`) and
padding; the queries or the question stay in the last segment. Held-out (`validation`) rows score their
first query or their answer. The model runs each row through its loss, a scan over segments whose only
state is the memory, so device memory does not grow with k; a full-attention baseline attends over the
whole row instead.
"""

from __future__ import annotations

import dataclasses
import pathlib
from typing import Sequence

import jax
import jax.numpy as jnp
import numpy as np

from lm2_jax import checkpoints
from lm2_jax.data import tokenizers
from lm2_jax.data.recall import RecallSource
from lm2_jax.train import inputs as inputs_lib
from lm2_jax.model import LM2
from lm2_jax.train import config as config_lib
from lm2_jax.train import evaluate as eval_lib
from lm2_jax.train.step import model_inputs


def load_recall_run(path: str | pathlib.Path):
  """(model config, variables, data config) of a `data.kind: recall` or `qa` run.

  Raises:
    checkpoints.CheckpointError: no checkpoint, or the run trained on neither recall nor qa rows.
  """
  step_dir, run_dir = checkpoints.resolve(path)
  run, where = checkpoints.run_config(step_dir, run_dir)
  try:
    data = config_lib.from_dict(run).data
  except config_lib.ConfigError as e:
    raise checkpoints.CheckpointError(f"{where}: {e}") from e
  if data.kind not in ("recall", "qa"):
    raise checkpoints.CheckpointError(f"{where}: data.kind is {data.kind!r}; `eval.py recall` needs a "
                                      "run trained on recall or qa rows (data.kind: recall or qa)")
  cfg = checkpoints.model_config_from_run(run, where)
  return cfg, {"params": checkpoints.restore_params(step_dir, cfg)}, data


def rows_at_length(data: config_lib.DataConfig, segment_length: int, multiplier: int, rows: int,
                   filler_density: float | None = None):
  """The held-out rows of `data` with `multiplier` times its segments (facts where they were).

  `filler_density` (qa runs) replaces the run's fraction of each segment's free space given to filler
  sentences: with 0 the added segments are padding, which writes nothing to a memory; with more they are
  text the memory must read past (BABILong's setting)."""
  if data.kind == "qa":
    from lm2_jax.data import qa  # pylint: disable=g-import-not-at-top

    return qa.QASource(
        data.task, "validation", data.seed, tokenizers.make_tokenizer(data.tokenizer, data.tokenizer_path or None),
        data.num_segments * multiplier, segment_length, rows, loss_on="answer",
        filler_density=data.filler_density if filler_density is None else filler_density,
        fact_segments=(0, data.num_segments - 2),
        num_sentences=inputs_lib.story_length(data), bind=data.bind)
  return RecallSource(
      "validation", data.seed, rows, data.num_segments * multiplier, segment_length,
      pairs_per_segment=data.recall_pairs, num_keys=data.recall_keys, num_values=data.recall_values,
      filler=data.recall_filler, overwrite_rate=data.recall_overwrite, queries=data.recall_queries,
      fact_segments=data.recall_fact_segments or data.num_segments - 1, bind=data.bind)


def evaluate_lengths(path: str | pathlib.Path, multipliers: Sequence[int], rows: int = 512,
                     batch_size: int = 32, pairs: int | None = None,
                     filler_density: float | None = None) -> dict[int, dict]:
  """{k: the `train.evaluate.evaluate` result on rows of k x the trained segments} for one run.

  `pairs` replaces the run's pairs per context segment (how many facts the memory must hold);
  `filler_density` the filler of a qa run's rows (`rows_at_length`).
  """
  cfg, variables, data = load_recall_run(path)
  if pairs is not None:
    data = dataclasses.replace(data, recall_pairs=pairs)
  model = LM2(cfg)

  @jax.jit
  def eval_fn(batch):
    stats, _ = model.apply(variables, batch["inputs"], batch["targets"], batch["loss_mask"],
                           resets=batch["resets"], valid=batch["valid"], bound=batch.get("bound"),
                           method=LM2.loss)
    return {"nll_sum": stats.nll_sum, "weight_sum": stats.weight_sum, "correct_sum": stats.correct_sum}

  out = {}
  for k in multipliers:
    source = rows_at_length(data, cfg.segment_length, k, rows, filler_density)
    batches = []
    for start in range(0, rows, batch_size):
      items = [source[i] for i in range(start, min(start + batch_size, rows))]
      batches.append({key: np.stack([r[key] for r in items]) for key in items[0]})
    result = eval_lib.evaluate(lambda b: eval_fn(jax.tree.map(jnp.asarray, model_inputs(b))), batches)
    result["segments"] = data.num_segments * k
    if data.kind == "recall":
      result["pairs"] = data.recall_pairs * (data.recall_fact_segments or data.num_segments - 1)
    result["chance"] = inputs_lib.chance_level(data)
    out[k] = result
  return out


def length_table(results: dict[str, dict[int, dict]]) -> str:
  """Answer accuracy per run and length multiplier, as Markdown: by overwritten or not (recall runs), by
  the fact's distance in segments (qa runs)."""
  lines = ["| run | length | segments | facts | accuracy | overwritten | not overwritten | by distance | chance |",
           "|---|---|---|---|---|---|---|---|---|"]
  for name, by_k in results.items():
    for k, r in by_k.items():
      def f(key):
        return f"{r[key]:.3f}" if r.get(key) is not None else ""
      by_distance = " / ".join(f"{d}: {a:.3f}" for d, a in sorted(
          r.get("accuracy_by_distance", {}).items(), key=lambda x: int(x[0])))
      lines.append(f"| {name} | {k}x | {r['segments']} | {r.get('pairs', '')} | {f('answer_accuracy')} | "
                   f"{f('accuracy_overwritten')} | {f('accuracy_not_overwritten')} | {by_distance} | "
                   f"{f('chance')} |")
  return "\n".join(lines)
