"""Resumable, multi-process Grain pipelines over random-access sources of dict-of-array rows.

Any source with `__len__` and `__getitem__(i) -> dict of numpy arrays` works: a `PackedCorpus` (packed
text), a QA source, or `ArraySource` (rows of in-memory arrays). The pipeline, in order:

    source -> shuffle (per epoch) -> this process's shard -> repeat -> [rows by step] -> batch
           -> iter (threads) -> workers

* Shuffle: a global permutation of the source that changes every epoch, seeded by `seed` (Grain folds the
  epoch into the seed). Every process computes the same permutation.
* Shard: process i of n takes positions i, i+n, i+2n, ... of the permuted epoch, truncated so that every
  process gets exactly len // n rows per epoch. Shards of one epoch are disjoint and their union is the
  epoch except its last len % n permuted rows (different rows each epoch when shuffling). Equal shard sizes
  keep the processes in lock step: every process yields the same number of batches.
* Repeat: `num_epochs` passes (None: forever). Batches may straddle an epoch boundary; with a finite
  `num_epochs` the last partial batch is dropped.
* Rows by step: a source with `row_at_step(index, step)` (a curriculum, `lm2_jax.data.qa.QASource`) is
  read through it, with the step of the batch the row lands in (position in this process's stream //
  batch_size: batch k is optimizer step k). Which rows are drawn is the same as without it.
* Batch: rows stacked into a dict of numpy arrays with a leading per-process batch axis, built BEFORE the
  worker processes, so worker `w` produces whole batches w, w+k, w+2k, ... and the batches do not depend on
  `worker_count`.
* The iterator's `get_state()` / `set_state()` (or `grain.checkpoint.CheckpointSave/CheckpointRestore`
  inside an Orbax `Composite`) resume exactly: a restored iterator yields the batches an uninterrupted one
  would have yielded next. State is only guaranteed to restore on the same Grain version and the same
  pipeline arguments.

Worker processes are started with `spawn`: the source must pickle (a cached `PackedCorpus` pickles by path
and memory-maps its tokens in the worker), and `absl.flags.FLAGS.mark_as_parsed()` must have run in the
main process before the first batch is read (entry points and tests/conftest.py do it).
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any, Protocol

import grain
import numpy as np


class RowSource(Protocol):
  """What the pipeline reads: random-access rows, each a dict of numpy arrays of fixed shapes."""

  def __len__(self) -> int:
    ...

  def __getitem__(self, index: int) -> Mapping[str, np.ndarray]:
    ...


class RowsAtStep:
  """Reads row `index` of a step-dependent source as the step of its batch sees it (a picklable map).

  Attributes:
    source: a source with `row_at_step(index, step)`.
    batch_size: rows per batch on this process; position p of the stream is in batch p // batch_size.
  """

  def __init__(self, source, batch_size: int):
    self.source, self.batch_size = source, batch_size

  def __call__(self, position: int, index: int) -> Mapping[str, np.ndarray]:
    return self.source.row_at_step(int(index), int(position) // self.batch_size)


class ArraySource:
  """Rows of in-memory arrays: row i is `{name: array[i]}`.

  Attributes:
    arrays: the arrays, all with the same leading length.
  """

  def __init__(self, arrays: Mapping[str, np.ndarray]):
    lengths = {name: len(a) for name, a in arrays.items()}
    if not arrays or len(set(lengths.values())) != 1:
      raise ValueError(f"ArraySource needs at least one array and equal leading lengths; got {lengths}.")
    self.arrays = {name: np.asarray(a) for name, a in arrays.items()}
    self._length = next(iter(lengths.values()))

  def __len__(self) -> int:
    return self._length

  def __getitem__(self, index: int) -> dict[str, np.ndarray]:
    return {name: a[index] for name, a in self.arrays.items()}


def _shuffle_seed(seed: int) -> int:
  # Grain shuffles epoch e with seed + e; hashing the user's seed keeps seed s at epoch 1 from equalling seed
  # s + 1 at epoch 0.
  return int(np.random.SeedSequence(seed).generate_state(1, np.uint32)[0])


def make_map_dataset(source: RowSource, *, batch_size: int, seed: int, shuffle: bool = True,
                     process_index: int = 0, process_count: int = 1,
                     num_epochs: int | None = None) -> grain.MapDataset:
  """The random-access part of the pipeline: element k is this process's k-th batch.

  Args:
    source: the rows.
    batch_size: rows per batch on this process (the global batch is `batch_size * process_count`).
    seed: the shuffle seed, the same on every process.
    shuffle: permute the rows, differently each epoch.
    process_index: this process, in [0, process_count).
    process_count: processes reading disjoint shards.
    num_epochs: passes over the data; None repeats forever.

  Returns:
    A `grain.MapDataset` of batches (dicts of numpy arrays with a leading `batch_size` axis); with a
    source that has `row_at_step`, batch k's rows are read at step k.

  Raises:
    ValueError: a bad argument, or fewer rows than processes.
  """
  if batch_size < 1:
    raise ValueError(f"batch_size must be >= 1 (got {batch_size}).")
  if process_count < 1 or not 0 <= process_index < process_count:
    raise ValueError(f"process_index {process_index} is not in [0, process_count={process_count}).")
  if num_epochs is not None and num_epochs < 1:
    raise ValueError(f"num_epochs must be >= 1 or None (got {num_epochs}).")
  if not 0 <= seed < 2**63:
    raise ValueError(f"seed must be a non-negative integer (got {seed}).")
  shard_len = len(source) // process_count
  if shard_len == 0:
    raise ValueError(f"the source has {len(source)} rows, fewer than process_count={process_count}.")
  if num_epochs is not None and shard_len * num_epochs < batch_size:
    raise ValueError(
        f"{num_epochs} epoch(s) of {shard_len} rows per process make no batch of {batch_size}; lower "
        "batch_size or raise num_epochs.")
  by_step = callable(getattr(source, "row_at_step", None))
  # By step: the pipeline carries row indices, so the row is read knowing its position.
  ds = grain.MapDataset.range(len(source)) if by_step else grain.MapDataset.source(source)
  if shuffle:
    ds = ds.shuffle(seed=_shuffle_seed(seed))
  ds = ds.slice(slice(process_index, shard_len * process_count, process_count))
  ds = ds.repeat(num_epochs)
  if by_step:
    ds = ds.map_with_index(RowsAtStep(source, batch_size))
  return ds.batch(batch_size, drop_remainder=True)


def make_dataset(source: RowSource, *, batch_size: int, seed: int, shuffle: bool = True,
                 process_index: int = 0, process_count: int = 1, num_epochs: int | None = None,
                 worker_count: int = 0, worker_buffer_size: int = 2, read_threads: int = 2,
                 read_buffer_size: int = 8) -> grain.IterDataset:
  """The whole pipeline, as an iterable dataset of this process's batches.

  Args:
    source, batch_size, seed, shuffle, process_index, process_count, num_epochs: see `make_map_dataset`.
    worker_count: worker processes building batches (0: in this process). Batches do not depend on it.
    worker_buffer_size: batches each worker prepares ahead.
    read_threads: threads reading batches (in each worker when `worker_count > 0`).
    read_buffer_size: batches the reading threads prepare ahead.

  Returns:
    A `grain.IterDataset`; `iter()` of it is a `grain.DatasetIterator` with `get_state`/`set_state`.
  """
  if worker_count < 0:
    raise ValueError(f"worker_count must be >= 0 (got {worker_count}).")
  ds = make_map_dataset(source, batch_size=batch_size, seed=seed, shuffle=shuffle,
                        process_index=process_index, process_count=process_count, num_epochs=num_epochs)
  ds = ds.to_iter_dataset(
      grain.ReadOptions(num_threads=read_threads, prefetch_buffer_size=read_buffer_size))
  if worker_count > 0:
    ds = ds.mp_prefetch(grain.MultiprocessingOptions(num_workers=worker_count,
                                                     per_worker_buffer_size=worker_buffer_size))
  return ds


def make_iterator(source: RowSource, *, state: Mapping[str, Any] | None = None,
                  **kwargs) -> grain.DatasetIterator:
  """An iterator over `make_dataset(source, **kwargs)`, resumed from `state` (a `get_state()`) if given.

  Close an iterator with workers (`it.close()`) when done with it, to stop its processes promptly.
  """
  iterator = iter(make_dataset(source, **kwargs))
  if state is not None:
    iterator.set_state(state)
  return iterator


def checkpoint_save_args(iterator: grain.DatasetIterator):
  """Orbax `Composite` entry that saves the iterator's position, e.g. `Composite(data=...)`."""
  return grain.checkpoint.CheckpointSave(iterator)


def checkpoint_restore_args(iterator: grain.DatasetIterator):
  """Orbax `Composite` entry that restores a saved position into `iterator` (a fresh one, same arguments)."""
  return grain.checkpoint.CheckpointRestore(iterator)
