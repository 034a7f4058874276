"""Corpus reading (formats, paths, bad input, counts) and packing (conservation, targets, resets, cache)."""

import gzip
import json
import pickle

import numpy as np
import pytest
from array_record.python import array_record_module

from lm2_jax.data import corpora, packing
from lm2_jax.data.tokenizers import ByteTokenizer


def _read(paths, **options):
  stats = corpora.CorpusStats()
  docs = list(corpora.iter_documents(corpora.CorpusConfig(paths=paths, **options), stats))
  return docs, stats


def _write_array_record(path, records):
  writer = array_record_module.ArrayRecordWriter(str(path), "group_size:1")
  for record in records:
    writer.write(record)
  writer.close()


def test_txt_one_document_per_file_or_blank_line_separated(tmp_path):
  (tmp_path / "a.txt").write_text("first doc\n\nstill first\n")
  (tmp_path / "b.txt").write_text("\n\nsecond\nline two\n \n\n\nthird\n\n")
  docs, stats = _read([str(tmp_path)])
  assert docs == ["first doc\n\nstill first\n", "\n\nsecond\nline two\n \n\n\nthird\n\n"]
  docs, stats = _read([str(tmp_path)], txt_split="blank_lines")
  assert docs == ["first doc", "still first", "second\nline two", "third"]
  assert (stats.files, stats.documents, stats.skipped) == (2, 4, {})


def test_jsonl_gz_and_array_record(tmp_path):
  lines = [json.dumps({"meta": {"body": f"doc {i}"}, "id": i}) for i in range(3)]
  (tmp_path / "a.jsonl").write_text("\n".join(lines[:2]) + "\n\n")
  with gzip.open(tmp_path / "b.jsonl.gz", "wt") as f:
    f.write(lines[2] + "\n")
  _write_array_record(tmp_path / "c.array_record", [b"rec zero", "r\xe9c one".encode()])
  _write_array_record(tmp_path / "d.array_record", [json.dumps({"meta": {"body": "json rec"}}).encode()])
  docs, stats = _read([str(tmp_path / "*.jsonl*"), str(tmp_path / "c.array_record")], text_field="meta.body")
  assert docs == ["doc 0", "doc 1", "doc 2", "rec zero", "r\xe9c one"]
  assert (stats.files, stats.documents) == (3, 5)
  docs, _ = _read([str(tmp_path / "d.array_record")], array_record_format="json", text_field="meta.body")
  assert docs == ["json rec"]


def test_paths_resolve_sorted_deduplicated_and_errors(tmp_path):
  (tmp_path / "sub").mkdir()
  for name in ("sub/z.txt", "b.txt", "a.txt", "notes.md"):
    (tmp_path / name).write_text(name)
  files = corpora.resolve_paths([str(tmp_path), str(tmp_path / "a.txt"), str(tmp_path / "**/*.txt")])
  assert files == [str(tmp_path / n) for n in ("a.txt", "b.txt", "sub/z.txt")]
  with pytest.raises(FileNotFoundError, match="missing.txt' does not exist"):
    corpora.resolve_paths([str(tmp_path / "missing.txt")])
  with pytest.raises(FileNotFoundError, match=r"\*.jsonl' matches no"):
    corpora.resolve_paths([str(tmp_path / "*.jsonl")])
  with pytest.raises(corpora.CorpusError, match="notes.md' has an unknown suffix"):
    corpora.resolve_paths([str(tmp_path / "notes.md")])
  with pytest.raises(ValueError, match="corpus.on_error is 'ignore'"):
    corpora.CorpusConfig(paths=[str(tmp_path)], on_error="ignore")


def test_undecodable_bytes_fail_with_offset_or_skip_and_count(tmp_path):
  (tmp_path / "a.txt").write_bytes(b"good one\n\nbad \xff here\n\nlast")
  with pytest.raises(corpora.CorpusError, match=r"a.txt: invalid UTF-8 at byte offset 14"):
    _read([str(tmp_path / "a.txt")], txt_split="blank_lines")
  docs, stats = _read([str(tmp_path / "a.txt")], txt_split="blank_lines", on_error="skip")
  assert docs == ["good one", "last"]
  assert stats.skipped == {"decode_error": 1} and "byte offset 14" in stats.examples[0]
  (tmp_path / "b.jsonl").write_bytes(b'{"text": "ok"}\n{"text": "\xc3("}\n')
  with pytest.raises(corpora.CorpusError, match=r"b.jsonl:2: invalid UTF-8 at byte offset 25"):
    _read([str(tmp_path / "b.jsonl")])


def test_bad_jsonl_lines_fail_with_line_number_or_skip_and_count(tmp_path):
  path = tmp_path / "a.jsonl"
  path.write_text('{"text": "one"}\n{"text": \n{"body": "x"}\n{"text": 3}\n{"text": ""}\n{"text": "two"}\n')
  with pytest.raises(corpora.CorpusError, match=r"a.jsonl:2: not JSON"):
    _read([str(path)])
  path.write_text('{"text": "one"}\n\n{"body": "x"}\n')
  with pytest.raises(corpora.CorpusError, match=r"a.jsonl:3: no field 'text'"):
    _read([str(path)])
  path.write_text('{"text": "one"}\n{"text": \n{"body": "x"}\n{"text": 3}\n{"text": ""}\n{"text": "two"}\n')
  docs, stats = _read([str(path)], on_error="skip")
  assert docs == ["one", "two"]
  assert stats.skipped == {"bad_json": 1, "missing_field": 1, "not_text": 1, "empty": 1}
  assert stats.documents == 2 and len(stats.examples) == 4


def test_corrupt_gzip_and_array_record(tmp_path):
  (tmp_path / "a.jsonl.gz").write_bytes(b"not gzip at all")
  with pytest.raises(corpora.CorpusError, match="a.jsonl.gz: unreadable"):
    _read([str(tmp_path / "a.jsonl.gz")])
  (tmp_path / "b.array_record").write_bytes(b"garbage")
  with pytest.raises(corpora.CorpusError, match="b.array_record: not a readable ArrayRecord"):
    _read([str(tmp_path / "b.array_record")])
  (tmp_path / "c.txt").write_text("fine")
  docs, stats = _read([str(tmp_path)], on_error="skip")
  assert docs == ["fine"] and stats.skipped == {"bad_file": 2}


def test_empty_corpus_is_an_error(tmp_path):
  (tmp_path / "a.txt").write_text("  \n")
  with pytest.raises(corpora.CorpusError, match="has no documents"):
    _read([str(tmp_path)])


def _random_docs(rng, count, max_len):
  return [rng.integers(0, 250, rng.integers(0, max_len)).tolist() for _ in range(count)]


@pytest.mark.parametrize("final_row", ["pad", "drop"])
def test_packing_conserves_tokens_and_shifts_targets(final_row):
  rng = np.random.default_rng(0)
  docs = _random_docs(rng, 40, 50)  # some longer than a row of 3x8, some empty
  c, t, eos, pad = 3, 8, 258, 256
  packed = packing.pack_documents(docs, eos_id=eos, pad_id=pad, num_segments=c, segment_len=t,
                                  final_row=final_row)
  stream = np.concatenate([np.array(d + [eos], np.int32) for d in docs])
  rows = [packed[i] for i in range(len(packed))]
  for row in rows:
    assert {k: (v.dtype, v.shape) for k, v in row.items()} == {
        "inputs": (np.int32, (c * t,)), "targets": (np.int32, (c * t,)), "loss_mask": (np.float32, (c * t,)),
        "valid": (np.bool_, (c * t,)), "resets": (np.bool_, (c,))}
  inputs = np.concatenate([r["inputs"][r["valid"]] for r in rows])
  kept = len(packed) * c * t if final_row == "drop" else len(stream)
  np.testing.assert_array_equal(inputs, stream[:kept])
  targets = np.concatenate([r["targets"] for r in rows])
  mask = np.concatenate([r["loss_mask"] for r in rows]).astype(bool)
  np.testing.assert_array_equal(targets[mask], stream[1:][:mask.sum()])
  assert mask.sum() == (kept if final_row == "drop" else kept - 1)
  assert packed.stats.tokens == len(stream) and packed.stats.documents == 40
  if final_row == "pad":
    assert packed.stats.padded_tokens == len(packed) * c * t - len(stream) > 0
    assert (rows[-1]["inputs"][~rows[-1]["valid"]] == pad).all()
  else:
    assert packed.stats.dropped_tokens == len(stream) - kept > 0


def test_resets_mark_segments_where_a_document_starts():
  c, t = 2, 4
  # Offsets in the stream (row = 8 tokens): doc A at 0 (len 2+1), B at 3 (len 9+1: runs into row 1), C at
  # 13 (row 1, segment 1), D at 16 (row 2, segment 0).
  docs = [[1, 2], list(range(10, 19)), [5, 5], [7]]
  packed = packing.pack_documents(docs, eos_id=0, pad_id=99, num_segments=c, segment_len=t)
  resets = np.stack([packed[i]["resets"] for i in range(len(packed))])
  np.testing.assert_array_equal(resets, [[True, False], [False, True], [True, False]])
  assert np.asarray(packed.doc_starts).tolist() == [0, 3, 13, 16]


def test_packing_drop_with_too_little_text_is_an_error():
  with pytest.raises(ValueError, match="fewer than one row"):
    packing.pack_documents([[1, 2]], eos_id=0, pad_id=9, num_segments=2, segment_len=4, final_row="drop")


class _BatchByteTokenizer(ByteTokenizer):
  calls = 0

  def encode_batch(self, texts):
    type(self).calls += 1
    return [self.encode(x) for x in texts]


def test_pack_corpus_counts_cache_and_pickle(tmp_path):
  texts = [f"document {i} " * (i % 7 + 1) for i in range(600)]
  (tmp_path / "data").mkdir()
  with open(tmp_path / "data" / "a.jsonl", "w") as f:
    for i, text in enumerate(texts):
      f.write(json.dumps({"text": text}) + "\n" + ("oops\n" if i == 5 else ""))
  config = corpora.CorpusConfig(paths=[str(tmp_path / "data")], on_error="skip")
  plain = packing.pack_corpus(config, ByteTokenizer(), num_segments=2, segment_len=16)
  assert plain.corpus_stats.documents == 600 and plain.corpus_stats.skipped == {"bad_json": 1}
  assert plain.corpus_stats.tokens == plain.stats.tokens == sum(len(x.encode()) + 1 for x in texts)
  cache = tmp_path / "cache"
  first = packing.pack_corpus(config, _BatchByteTokenizer(), num_segments=2, segment_len=16,
                              cache_dir=str(cache))
  assert _BatchByteTokenizer.calls == 3  # 600 documents in chunks of 256
  second = packing.pack_corpus(config, _BatchByteTokenizer(), num_segments=2, segment_len=16,
                               cache_dir=str(cache))
  assert _BatchByteTokenizer.calls == 3  # served from the cache: no tokenization
  assert isinstance(second.tokens, np.memmap) and second.corpus_stats == plain.corpus_stats
  revived = pickle.loads(pickle.dumps(second))
  assert len(pickle.dumps(second)) < 10_000  # pickled by path, not by value
  for i in (0, 7, len(plain) - 1):
    for key, value in plain[i].items():
      np.testing.assert_array_equal(first[i][key], value)
      np.testing.assert_array_equal(revived[i][key], value)
  with open(tmp_path / "data" / "a.jsonl", "a") as f:
    f.write(json.dumps({"text": "one more"}) + "\n")
  third = packing.pack_corpus(config, _BatchByteTokenizer(), num_segments=2, segment_len=16,
                              cache_dir=str(cache))
  assert third.corpus_stats.documents == 601 and len(list(cache.iterdir())) == 2
