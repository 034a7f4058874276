"""Grain pipelines: per-epoch shuffling, disjoint process shards, exact resume, worker-count invariance."""

import numpy as np
import pytest

from lm2_jax.data import corpora, packing, pipeline
from lm2_jax.data.tokenizers import ByteTokenizer

C, T = 2, 4


def _qa_source(n=23):
  """A fake QA source: the dict-of-arrays contract, with row i recognisable by `answer_id == i`."""
  rng = np.random.default_rng(1)
  return pipeline.ArraySource({
      "inputs": rng.integers(0, 50, (n, C * T)).astype(np.int32),
      "targets": rng.integers(0, 50, (n, C * T)).astype(np.int32),
      "loss_mask": np.ones((n, C * T), np.float32),
      "valid": np.ones((n, C * T), bool),
      "resets": np.tile(np.array([True, False]), (n, 1)),
      "answer_id": np.arange(n, dtype=np.int32),
      "fact_segment": np.zeros(n, np.int32),
      "question_segment": np.full(n, C - 1, np.int32),
  })


def _ids(iterator, steps):
  return [next(iterator)["answer_id"].tolist() for _ in range(steps)]


def test_batches_are_stacked_dicts_and_epochs_are_reshuffled_permutations():
  source = _qa_source()
  it = pipeline.make_iterator(source, batch_size=1, seed=7, num_epochs=3)
  batch = pipeline.make_iterator(source, batch_size=4, seed=7).__next__()
  assert batch["inputs"].shape == (4, C * T) and batch["resets"].shape == (4, C)
  assert batch["answer_id"].shape == (4,) and batch["answer_id"].dtype == np.int32
  order = [b["answer_id"][0] for b in it]
  epochs = [order[:23], order[23:46], order[46:]]
  assert all(sorted(e) == list(range(23)) for e in epochs)
  assert epochs[0] != epochs[1] != epochs[2] and epochs[0] != list(range(23))
  again = [b["answer_id"][0] for b in pipeline.make_iterator(source, batch_size=1, seed=7, num_epochs=1)]
  other = [b["answer_id"][0] for b in pipeline.make_iterator(source, batch_size=1, seed=8, num_epochs=1)]
  assert again == epochs[0] and other != epochs[0]
  unshuffled = [b["answer_id"][0] for b in pipeline.make_iterator(
      source, batch_size=1, seed=7, shuffle=False, num_epochs=1)]
  assert unshuffled == list(range(23))


@pytest.mark.parametrize("n, count", [(24, 3), (23, 3), (23, 1)])
def test_process_shards_partition_each_epoch(n, count):
  source = _qa_source(n)
  per_process = [
      [b["answer_id"][0] for b in pipeline.make_iterator(
          source, batch_size=1, seed=3, process_index=i, process_count=count, num_epochs=2)]
      for i in range(count)]
  assert len({len(p) for p in per_process}) == 1  # lock step: every process yields as many batches
  shard_len = n // count
  for epoch in range(2):
    parts = [set(p[epoch * shard_len:(epoch + 1) * shard_len]) for p in per_process]
    union = set().union(*parts)
    assert sum(len(p) for p in parts) == len(union) == shard_len * count  # disjoint, nothing repeated
    assert union <= set(range(n)) and len(union) == n - n % count


def test_finite_epochs_drop_only_the_last_partial_batch():
  batches = list(pipeline.make_iterator(_qa_source(23), batch_size=5, seed=0, num_epochs=2))
  assert len(batches) == 46 // 5
  assert all(len(b["answer_id"]) == 5 for b in batches)


@pytest.mark.parametrize("stop", [0, 1, 5, 13])
def test_resume_from_saved_state_is_exact(stop):
  source = _qa_source()
  kwargs = dict(batch_size=4, seed=11, process_index=1, process_count=2)
  reference = _ids(pipeline.make_iterator(source, **kwargs), stop + 6)
  it = pipeline.make_iterator(source, **kwargs)
  assert _ids(it, stop) == reference[:stop]
  state = it.get_state()
  _ids(it, 3)  # the interrupted run goes on a little before dying
  resumed = pipeline.make_iterator(source, state=state, **kwargs)
  assert _ids(resumed, 6) == reference[stop:]


def test_orbax_checkpoint_of_the_iterator_resumes_exactly(tmp_path):
  import orbax.checkpoint as ocp  # pylint: disable=g-import-not-at-top

  source = _qa_source()
  reference = _ids(pipeline.make_iterator(source, batch_size=3, seed=5), 9)
  it = pipeline.make_iterator(source, batch_size=3, seed=5)
  _ids(it, 4)
  with ocp.CheckpointManager(tmp_path / "ckpt") as manager:
    manager.save(4, args=ocp.args.Composite(data=pipeline.checkpoint_save_args(it)))
    manager.wait_until_finished()
  fresh = pipeline.make_iterator(source, batch_size=3, seed=5)
  with ocp.CheckpointManager(tmp_path / "ckpt") as manager:
    manager.restore(4, args=ocp.args.Composite(data=pipeline.checkpoint_restore_args(fresh)))
  assert _ids(fresh, 5) == reference[4:]


def test_bad_arguments_are_clear_errors():
  source = _qa_source(5)
  with pytest.raises(ValueError, match="process_index 2 is not in"):
    pipeline.make_dataset(source, batch_size=1, seed=0, process_index=2, process_count=2)
  with pytest.raises(ValueError, match="batch_size must be >= 1"):
    pipeline.make_dataset(source, batch_size=0, seed=0)
  with pytest.raises(ValueError, match="fewer than process_count=8"):
    pipeline.make_dataset(source, batch_size=1, seed=0, process_count=8)
  with pytest.raises(ValueError, match="make no batch of 8"):
    pipeline.make_dataset(source, batch_size=8, seed=0, num_epochs=1)
  with pytest.raises(ValueError, match="equal leading lengths"):
    pipeline.ArraySource({"a": np.zeros(3), "b": np.zeros(4)})


def test_packed_corpus_through_the_pipeline_with_workers(tmp_path):
  """Worker processes give the zero-worker batches, and resume exactly (source pickled by cache path)."""
  (tmp_path / "a.txt").write_text("\n\n".join(f"story {i}: " + "abc " * (i % 9) for i in range(200)))
  config = corpora.CorpusConfig(paths=[str(tmp_path / "a.txt")], txt_split="blank_lines")
  packed = packing.pack_corpus(config, ByteTokenizer(), num_segments=C, segment_len=T,
                               cache_dir=str(tmp_path / "cache"))
  kwargs = dict(batch_size=4, seed=2)
  reference = [next(it)["inputs"] for it in [pipeline.make_iterator(packed, **kwargs)] for _ in range(10)]
  it = pipeline.make_iterator(packed, worker_count=2, **kwargs)
  try:
    got = [next(it)["inputs"] for _ in range(6)]
    state = it.get_state()
  finally:
    it.close()
  resumed = pipeline.make_iterator(packed, worker_count=2, state=state, **kwargs)
  try:
    got += [next(resumed)["inputs"] for _ in range(4)]
  finally:
    resumed.close()
  assert len(reference) == len(got) == 10
  for want, have in zip(reference, got):
    np.testing.assert_array_equal(have, want)
  assert len({r.tobytes() for r in reference}) == 10  # batches differ: the comparison can fail
