"""Training and held-out row sources from the run config, and the Grain iterators over them.

Each process reads its own shard of every batch (`process_index` / `process_count`); `mesh.global_batch`
turns those rows into global arrays. The training iterator is the object whose position the checkpoint
saves; held-out evaluation builds a fresh one-epoch, unshuffled iterator each time, so every evaluation
sees the same rows in the same order.
"""

from __future__ import annotations

import pathlib
import sys
from typing import Iterator

import jax

from lm2_jax.data import pipeline
from lm2_jax.data import tokenizers as tokenizers_lib
from lm2_jax.train.config import ConfigError, DataConfig


def _tokenizer(cfg: DataConfig) -> tokenizers_lib.Tokenizer:
  try:
    return tokenizers_lib.make_tokenizer(cfg.tokenizer, cfg.tokenizer_path or None)
  except (ValueError, FileNotFoundError) as e:
    raise ConfigError(f"data.tokenizer / data.tokenizer_path: {e}") from e


def make_sources(cfg: DataConfig, segment_length: int, vocab_size: int,
                 cache_dir: str | pathlib.Path | None = None):
  """(train_source, eval_source) of the run: random-access rows of [C*T] tokens.

  Args:
    cfg: the data section.
    segment_length: T, from the model config.
    vocab_size: the model's V; the tokenizer's must not exceed it.
    cache_dir: where a text corpus caches its token stream.
  """
  if cfg.kind == "recall":
    return _recall_sources(cfg, segment_length, vocab_size)
  tokenizer = _tokenizer(cfg)
  if tokenizer.vocab_size > vocab_size:
    raise ConfigError(f"model.vocab_size={vocab_size} is smaller than the {cfg.tokenizer} tokenizer's "
                      f"{tokenizer.vocab_size} ids; raise model.vocab_size")
  if cfg.kind == "qa":
    from lm2_jax.data import qa  # pylint: disable=g-import-not-at-top

    common = dict(task=cfg.task, seed=cfg.seed, tokenizer=tokenizer, num_segments=cfg.num_segments,
                  segment_length=segment_length, filler_density=cfg.filler_density,
                  num_sentences=story_length(cfg), bind=cfg.bind)
    try:
      train = qa.QASource(split="train", num_samples=cfg.train_size, loss_on=cfg.loss_on,
                          questions=cfg.questions, curriculum=_curriculum(cfg),
                          segment_curriculum=cfg.segment_curriculum, **common)
      held_out = qa.QASource(split="validation", num_samples=cfg.eval_size, loss_on="answer", **common)
    except ValueError as e:
      raise ConfigError(f"data section (qa): {e}") from e
    _check_rows_at_switches(train, cfg)
    return train, held_out
  from lm2_jax.data import corpora, packing  # pylint: disable=g-import-not-at-top

  def corpus(files: str, key: str):
    if not files:
      raise ConfigError(f"data.{key} is empty; a `text` run needs comma-separated files or globs")
    paths = tuple(p.strip() for p in files.split(",") if p.strip())
    try:
      packed = packing.pack_corpus(
          corpora.CorpusConfig(paths=paths, on_error=cfg.on_error, text_field=cfg.text_field), tokenizer,
          num_segments=cfg.num_segments, segment_len=segment_length, align=cfg.align,
          cache_dir=None if cache_dir is None else str(cache_dir))
    except (ValueError, FileNotFoundError) as e:
      # The corpus reader names its own options; in a run they are keys of the data section.
      message = str(e)
      for option, run_key in (("corpus.on_error='skip'", "data.on_error=skip"),
                              ("corpus.on_error", "data.on_error"), ("corpus.text_field", "data.text_field"),
                              ("corpus.paths", f"data.{key}")):
        message = message.replace(option, run_key)
      raise ConfigError(f"data.{key}: {message}") from e
    skipped = packed.corpus_stats.skipped if packed.corpus_stats else {}
    if skipped and jax.process_index() == 0:
      counts = ", ".join(f"{n} {reason}" for reason, n in sorted(skipped.items()))
      print(f"data.{key}: skipped {counts}; first: {packed.corpus_stats.examples[0]}", file=sys.stderr)
    return packed
  return corpus(cfg.train_files, "train_files"), corpus(cfg.eval_files, "eval_files")


def _recall_sources(cfg: DataConfig, segment_length: int, vocab_size: int):
  """(train, held-out) RecallSource of a `recall` run; the held-out split is `validation`."""
  from lm2_jax.data import recall  # pylint: disable=g-import-not-at-top

  needed = recall.recall_vocab_size(cfg.recall_keys, cfg.recall_values)
  if needed > vocab_size:
    raise ConfigError(f"model.vocab_size={vocab_size} is smaller than the {needed} ids of a recall run with "
                      f"data.recall_keys={cfg.recall_keys} and data.recall_values={cfg.recall_values}; "
                      f"raise model.vocab_size or lower those")
  common = dict(seed=cfg.seed, num_segments=cfg.num_segments, segment_length=segment_length,
                pairs_per_segment=cfg.recall_pairs, num_keys=cfg.recall_keys, num_values=cfg.recall_values,
                filler=cfg.recall_filler, overwrite_rate=cfg.recall_overwrite, queries=cfg.recall_queries,
                fact_segments=cfg.recall_fact_segments, bind=cfg.bind)
  try:
    return (recall.RecallSource("train", num_samples=cfg.train_size, **common),
            recall.RecallSource("validation", num_samples=cfg.eval_size, **common))
  except ValueError as e:
    raise ConfigError(f"data section (recall): {e}") from e


def chance_level(cfg: DataConfig) -> float | None:
  """Answer accuracy of a uniform guess: 1/recall_values (recall), 1/answers of the task (qa), None (text)."""
  if cfg.kind == "recall":
    return 1.0 / cfg.recall_values
  if cfg.kind == "qa":
    from lm2_jax.data import babi  # pylint: disable=g-import-not-at-top

    return 1.0 / len(babi.answer_vocab(cfg.task))
  return None


def story_length(cfg: DataConfig):
  """QASource's num_sentences: None (task default), an exact count, or a (low, high) range."""
  if cfg.max_sentences:
    if not 1 <= cfg.num_sentences <= cfg.max_sentences:
      raise ConfigError(f"data.num_sentences={cfg.num_sentences} must be in [1, data.max_sentences="
                        f"{cfg.max_sentences}] when data.max_sentences is set")
    return (cfg.num_sentences, cfg.max_sentences)
  return cfg.num_sentences or None


def _curriculum(cfg: DataConfig) -> tuple:
  """QASource's curriculum: ((step, (low, max_sentences)), ...), low = num_sentences or the task's
  default minimum."""
  if not cfg.curriculum:
    return ()
  from lm2_jax.data import babi  # pylint: disable=g-import-not-at-top

  low = cfg.num_sentences or babi.sentence_range(cfg.task, None)[0]
  for step, most in cfg.curriculum:
    if most < low:
      raise ConfigError(f"data.curriculum: max_sentences={most} at step {step} is below the stories' "
                        f"minimum of {low} sentences (data.num_sentences, else the {cfg.task} default)")
  return tuple((step, (low, most)) for step, most in cfg.curriculum)


def _check_rows_at_switches(source, cfg: DataConfig) -> None:
  """Draws row 0 at every curriculum step, so a layout no story fits stops the run at start-up, not at
  the step where it begins."""
  steps = sorted({step for step, _ in cfg.curriculum} | {step for step, _ in cfg.segment_curriculum})
  for step in steps:
    try:
      source.row_at_step(0, step)
    except ValueError as e:
      where = source.fact_range(step) or "all"
      raise ConfigError(f"data.curriculum / data.segment_curriculum at step {step} (story length "
                        f"{source.story_length(step)}, fact segments {where}): {e}") from e


def train_iterator(source, cfg: DataConfig, global_batch_size: int, seed: int):
  """This process's endless, shuffled, resumable iterator of training batches."""
  per_process = _per_process(global_batch_size)
  return iter(pipeline.make_dataset(
      source, batch_size=per_process, seed=seed, shuffle=cfg.shuffle,
      process_index=jax.process_index(), process_count=jax.process_count(), num_epochs=None,
      worker_count=cfg.worker_count))


def eval_batches(source, global_batch_size: int, max_batches: int = 0) -> Iterator[dict]:
  """One unshuffled pass over the held-out rows (whole batches only), at most `max_batches` (0 = all)."""
  per_process = _per_process(global_batch_size)
  rows = len(source) // jax.process_count()
  if rows < per_process:
    raise ConfigError(f"data.eval_size={len(source)} gives fewer rows per process than one batch of "
                      f"{per_process}; raise data.eval_size")
  dataset = pipeline.make_map_dataset(
      source, batch_size=per_process, seed=0, shuffle=False, process_index=jax.process_index(),
      process_count=jax.process_count(), num_epochs=1)
  count = len(dataset) if not max_batches else min(max_batches, len(dataset))
  for i in range(count):
    yield dataset[i]


def _per_process(global_batch_size: int) -> int:
  if global_batch_size % jax.process_count():
    raise ConfigError(f"train.batch_size={global_batch_size} is not divisible by the "
                      f"{jax.process_count()} processes")
  return global_batch_size // jax.process_count()
