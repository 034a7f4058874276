"""Start-up checks of a run: the config against itself, the device mesh and the held-out set.

`train` calls these before it writes anything or runs a step, so a config that cannot finish stops at
start-up with a `ConfigError` naming the key, instead of after training (and with nothing to clean up).
`config.from_dict` checks types and each key alone; what is checked here needs several keys, the devices or
the data sources. `check_data_unchanged` runs once the checkpoint is chosen: a resumed run must read the
token stream its checkpoint was trained on.
"""

from __future__ import annotations

import hashlib
import json
import pathlib

import jax
import numpy as np

from lm2_jax.train.config import ConfigError, RunConfig


def check_config(cfg: RunConfig) -> None:
  """Values the optimizer, schedule, data and logging need, beyond their types.

  Raises:
    ConfigError: naming the first bad key.
  """
  t = cfg.train
  checks = (
      ("train.learning_rate", t.learning_rate, t.learning_rate > 0, "must be > 0 (it is the peak of the "
       "schedule; a negative rate climbs the loss)"),
      ("train.warmup_steps", t.warmup_steps, t.warmup_steps >= 0, "must be >= 0"),
      ("train.decay_steps", t.decay_steps, t.decay_steps >= 0, "must be >= 0 (0 = until train.steps)"),
      ("train.min_lr_ratio", t.min_lr_ratio, 0 <= t.min_lr_ratio <= 1, "must be in [0, 1]"),
      ("train.b1", t.b1, 0 <= t.b1 < 1, "must be in [0, 1)"),
      ("train.b2", t.b2, 0 <= t.b2 < 1, "must be in [0, 1)"),
      ("train.eps", t.eps, t.eps > 0, "must be > 0"),
      ("train.weight_decay", t.weight_decay, t.weight_decay >= 0, "must be >= 0"),
      ("train.clip_norm", t.clip_norm, t.clip_norm >= 0, "must be >= 0 (0 = no clipping)"),
      ("train.memory_aux_weight", t.memory_aux_weight, t.memory_aux_weight >= 0, "must be >= 0 (0 = off)"),
      ("logging.eval_every", cfg.logging.eval_every, cfg.logging.eval_every >= 0,
       "must be >= 0 (0 = only at the end)"),
      ("logging.eval_batches", cfg.logging.eval_batches, cfg.logging.eval_batches >= 0,
       "must be >= 0 (0 = the whole held-out set)"),
      ("data.train_size", cfg.data.train_size, cfg.data.train_size >= 1, "must be >= 1"),
      ("data.eval_size", cfg.data.eval_size, cfg.data.eval_size >= 1, "must be >= 1"),
  )
  for key, value, ok, rule in checks:
    if not ok:
      raise ConfigError(f"{key}={value} {rule}")
  processes = jax.process_count()
  if t.batch_size % processes:
    raise ConfigError(f"train.batch_size={t.batch_size} is not divisible by the {processes} processes")


def check_batch_layout(cfg: RunConfig, mesh) -> None:
  """The global batch splits evenly over the mesh's batch shards and the micro-batches."""
  shards = mesh.shape["data"] * mesh.shape["fsdp"]
  micro = cfg.train.micro_batches
  if cfg.train.batch_size % (shards * micro):
    raise ConfigError(f"train.batch_size={cfg.train.batch_size} must be divisible by data*fsdp "
                      f"({shards}) * train.micro_batches ({micro}) so every micro-batch splits evenly")


def check_eval_set(cfg: RunConfig, eval_source) -> None:
  """The held-out set holds at least one whole evaluation batch (of train.batch_size rows) per process.

  Evaluation reads whole batches only: a smaller set would evaluate nothing, after all of training.
  """
  processes = jax.process_count()
  per_process = cfg.train.batch_size // processes
  rows = len(eval_source)
  if rows // processes < per_process:
    where = ("data.eval_files" if cfg.data.kind == "text" else "data.eval_size")
    raise ConfigError(f"the held-out set has {rows} rows ({where}), fewer than one evaluation batch of "
                      f"train.batch_size={cfg.train.batch_size}" +
                      (f" ({per_process} per process for {processes} processes)" if processes > 1 else "")
                      + f"; give at least {per_process * processes} held-out rows or lower train.batch_size")


DATA_FINGERPRINT_FILE = "data_fingerprint.json"
_HASH_CHUNK = 1 << 24  # tokens hashed per update: bounded memory on a memory-mapped stream


def data_fingerprint(train_source) -> dict | None:
  """{"tokens", "rows", "sha256"} of a packed text corpus's token stream; None for generated sources.

  Generated rows (qa, recall) are a function of the data config, which the resumed run reads from the same
  config; a text corpus is files that may change between runs.
  """
  tokens = getattr(train_source, "tokens", None)
  if tokens is None:
    return None
  digest = hashlib.sha256()
  for start in range(0, len(tokens), _HASH_CHUNK):
    digest.update(np.ascontiguousarray(tokens[start:start + _HASH_CHUNK]).tobytes())
  digest.update(np.ascontiguousarray(train_source.doc_starts).tobytes())
  return {"tokens": int(len(tokens)), "rows": int(len(train_source)), "sha256": digest.hexdigest()}


def check_data_unchanged(cfg: RunConfig, train_source, resumed_step: int | None, write: bool) -> None:
  """A resumed text run reads the token stream it started on; a fresh run records that stream.

  Args:
    cfg: the run config (its run directory holds the record).
    train_source: the training rows of this attempt.
    resumed_step: the checkpoint step this attempt resumes from (None: a fresh start).
    write: record the fingerprint (process 0 of a fresh start).

  Raises:
    ConfigError: the corpus (or its tokenization) differs from the one the checkpoint was trained on: the
      resumed run would continue on other rows at the saved position, which is no longer an exact resume.
  """
  current = data_fingerprint(train_source)
  path = pathlib.Path(cfg.run_dir) / DATA_FINGERPRINT_FILE
  if current is None:
    return
  if resumed_step is not None and path.is_file():
    try:
      recorded = json.loads(path.read_text(encoding="utf-8"))
    except ValueError:
      recorded = None  # cut short by a kill while written: record again below
    if recorded is not None and recorded != current:
      raise ConfigError(
          f"data.train_files changed since this run started: the corpus now packs into {current['rows']} "
          f"rows of {current['tokens']} tokens (sha256 {current['sha256'][:12]}), the checkpoint at step "
          f"{resumed_step} was trained on {recorded.get('rows')} rows of {recorded.get('tokens')} tokens "
          f"(sha256 {str(recorded.get('sha256'))[:12]}); restore the files, or start a new run "
          f"(another name=) to train on the new corpus ({path} records the old one)")
    if recorded is not None:
      return
  if write:
    scratch = path.with_name(path.name + ".tmp")
    scratch.write_text(json.dumps(current), encoding="utf-8")
    scratch.replace(path)
