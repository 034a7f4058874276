"""The standard library corpus: what it reads, its split, document-aligned rows of it, and the sweep over it."""

import os
import pathlib
import pickle

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from lm2_jax import sweep
from lm2_jax.data import corpora, packing, stdlib
from lm2_jax.data.tokenizers import ByteTokenizer
from lm2_jax.model import LM2
from lm2_jax.train.config import load_config


def test_split_is_a_fixed_function_of_the_relative_path():
  # Pinned: sha256 of the path, not Python's per-process hash(), so every machine agrees.
  assert [stdlib.split_of(p) for p in ("os.py", "typing.py", "json/__init__.py", "asyncio/threads.py",
                                       "collections/abc.py", "_py_abc.py")] == [
      "train", "train", "train", "held_out", "held_out", "held_out"]
  held = sum(stdlib.split_of(f"pkg/module_{i}.py") == "held_out" for i in range(4000))
  assert abs(held / 4000 - stdlib.HELD_OUT_PERCENT / 100) < 0.015


def test_fake_tree_excludes_tests_packages_and_build_files(tmp_path):
  names = ["a.py", "pkg/b.py", "pkg/c.txt", "test/test_a.py", "pkg/tests/t.py", "idlelib/idle_test/x.py",
           "site-packages/numpy/core.py", "__pycache__/a.py", "_sysconfigdata__linux.py",
           "config-3.12-x86_64/python-config.py"] + [f"m{i}.py" for i in range(40)]
  for name in names:
    (tmp_path / name).parent.mkdir(parents=True, exist_ok=True)
    (tmp_path / name).write_text(f"# {name}\n")
  train, held = (stdlib.stdlib_files(s, root=tmp_path) for s in stdlib.SPLITS)
  relative = {pathlib.Path(p).relative_to(tmp_path).as_posix() for p in train + held}
  assert relative == {"a.py", "pkg/b.py"} | {f"m{i}.py" for i in range(40)}
  assert train and held and not set(train) & set(held)
  assert all(stdlib.split_of(pathlib.Path(p).relative_to(tmp_path).as_posix()) == "held_out" for p in held)
  with pytest.raises(ValueError, match="stdlib split 'valid' is unknown"):
    stdlib.stdlib_files("valid", root=tmp_path)


@pytest.fixture(scope="module")
def splits():
  return {s: stdlib.stdlib_files(s) for s in stdlib.SPLITS}


def test_real_split_is_deterministic_disjoint_and_only_stdlib_sources(splits):
  root = stdlib.stdlib_dir()
  train, held = splits["train"], splits["held_out"]
  assert len(train) > 200 and len(held) > 20
  assert not set(train) & set(held)
  assert {s: stdlib.stdlib_files(s) for s in stdlib.SPLITS} == splits
  for path in train + held:
    relative = pathlib.Path(path).relative_to(root)
    assert relative.suffix == ".py" and os.path.isfile(path)
    assert not set(relative.parts[:-1]) & {"site-packages", "dist-packages", "test", "tests", "idle_test"}
  assert os.path.join(root, "os.py") in train
  assert corpora.resolve_paths(["stdlib:held_out"]) == held


def test_documents_are_the_files_whole(splits):
  stats = corpora.CorpusStats()
  docs = list(corpora.iter_documents(corpora.CorpusConfig(paths=("stdlib:held_out",)), stats))
  texts = [pathlib.Path(p).read_text(encoding="utf-8") for p in splits["held_out"]]
  assert docs == [t for t in texts if t.strip()]
  assert stats.files == len(splits["held_out"]) and stats.documents == len(docs)
  with pytest.raises(corpora.CorpusError, match="'stdlib:dev'.*unknown"):
    corpora.resolve_paths(["stdlib:dev"])


def test_py_files_are_read_when_named_not_found_by_a_directory_search(tmp_path):
  (tmp_path / "a.txt").write_text("text")
  (tmp_path / "b.py").write_text("x = 1\n\ny = 2\n")
  assert corpora.resolve_paths([str(tmp_path)]) == [str(tmp_path / "a.txt")]
  assert corpora.resolve_paths([str(tmp_path / "*")]) == [str(tmp_path / "a.txt")]
  assert corpora.resolve_paths([str(tmp_path / "*.py")]) == [str(tmp_path / "b.py")]
  docs = list(corpora.iter_documents(corpora.CorpusConfig(paths=(str(tmp_path / "b.py"),),
                                                          txt_split="blank_lines")))
  assert docs == ["x = 1\n\ny = 2\n"]  # a source file is one document, whatever txt_split says


def _document_rows(docs, c, t):
  return packing.pack_documents(docs, eos_id=0, pad_id=99, num_segments=c, segment_len=t, align="document")


def test_document_rows_start_at_document_starts_and_hold_nothing_else():
  rng = np.random.default_rng(1)
  c, t = 2, 4
  docs = [rng.integers(1, 50, n).tolist() for n in (0, 3, 7, 8, 20, 1, 15)]
  packed = _document_rows(docs, c, t)
  expected = []  # (tokens of the row, the token after them in the document or None, first row of it)
  for doc in docs:
    full = doc + [0]
    expected += [(full[k:k + c * t], full[k + c * t] if k + c * t < len(full) else None, k == 0)
                 for k in range(0, len(full), c * t)]
  assert len(packed) == len(expected) == sum(-(-(len(d) + 1) // (c * t)) for d in docs)
  for i, (tokens, after, first) in enumerate(expected):
    row, n = packed[i], len(tokens)
    np.testing.assert_array_equal(row["inputs"][row["valid"]], tokens)
    assert row["valid"].tolist() == [True] * n + [False] * (c * t - n)
    assert (row["inputs"][n:] == 99).all()
    # Targets stay inside the document: a document's EOS predicts nothing, not the next document.
    weighted = tokens[1:] + ([after] if after is not None else [])
    assert row["loss_mask"].tolist() == [1.0] * len(weighted) + [0.0] * (c * t - len(weighted))
    np.testing.assert_array_equal(row["targets"][:len(weighted)], weighted)
    assert row["resets"].tolist() == [first] + [False] * (c - 1)
  assert packed.stats.padded_tokens == len(packed) * c * t - packed.stats.tokens
  assert packed.stats.dropped_tokens == 0


def test_document_rows_of_the_stdlib_corpus_cached_and_pickled(tmp_path):
  config = corpora.CorpusConfig(paths=("stdlib:held_out",))
  c, t = 4, 64
  packed = packing.pack_corpus(config, ByteTokenizer(), num_segments=c, segment_len=t, align="document",
                               cache_dir=str(tmp_path))
  starts = set(np.asarray(packed.doc_starts).tolist())
  firsts = 0
  for i in range(len(packed)):
    start, end = packed.row_span(i)
    row = packed[i]
    firsts += start in starts
    assert row["resets"][0] == (start in starts) and not row["resets"][1:].any()
    if start not in starts:  # a continuation: the previous row is the same document, full
      assert packed.row_span(i - 1) == (start - c * t, end)
  assert firsts == packed.stats.documents
  revived = pickle.loads(pickle.dumps(packed))
  for i in (0, len(packed) // 2, len(packed) - 1):
    for key, value in packed[i].items():
      np.testing.assert_array_equal(revived[i][key], value)
  with pytest.raises(ValueError, match="needs final_row='pad'"):
    packing.pack_documents([[1]], eos_id=0, pad_id=9, num_segments=2, segment_len=4, align="document",
                           final_row="drop")


def test_stdlib_sweep_cells_have_the_parameter_counts_its_comment_gives():
  spec = sweep.load_sweep("configs/sweep/stdlib-lm.yaml")
  counts = {}
  for cell, overrides in spec["cells"].items():
    run = load_config(spec["base"], spec["overrides"] + overrides)
    assert (run.data.kind, run.data.align, run.data.train_files, run.data.eval_files) == (
        "text", "document", "stdlib:train", "stdlib:held_out")
    cfg = run.model_config()
    shapes = jax.eval_shape(lambda c=cfg: LM2(c).init(jax.random.key(0), jnp.zeros((1, c.segment_length),
                                                                                      jnp.int32)))
    counts[cell] = sum(x.size for x in jax.tree.leaves(shapes))
  assert counts == {"lm2": 1_165_952, "rmt": 1_166_976, "llama": 1_164_928, "llama-full": 1_164_928}
