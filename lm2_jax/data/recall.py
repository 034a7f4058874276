"""Associative-recall rows: key-value facts in the context segments, queries about them in the last one.

Synthetic integer tokens, no tokenizer. Id layout (K = num_keys, V = num_values, N = num_filler):

    0                     PAD (valid=False, never a target of the loss)
    1                     QUERY marker
    2 .. 2+K-1            keys
    2+K .. 2+K+V-1        values
    2+K+V .. 2+K+V+N-1    filler tokens

`recall_vocab_size(K, V, N)` is the total. Layout of a row (C = num_segments, T = segment_length,
F = fact_segments, P = pairs_per_segment):

    segments 0..F-1     P facts [key, value] each, with `filler` random filler tokens spread over the
                        P+1 gaps between pairs (never inside one), then PAD. A pair never straddles a
                        segment boundary.
    segments F..C-2     `filler` filler tokens, then PAD (all PAD when filler is 0): the distance the
                        memory must carry the facts, for streamed-length evaluation.
    segment  C-1        `queries` queries [QUERY, key, value] from position 0, then PAD.

Each fact after the first reassigns, with probability `overwrite_rate`, a key assigned earlier in the row
to a new value (different from its current one), otherwise it assigns a fresh key; the latest assignment is
the answer, as when a bAbI actor moves. Overwrites are skipped when they would leave fewer distinct keys
than queries. Queries ask distinct assigned keys in random order. Targets are next-token targets over the
row; the loss is on the queries' values (the target of each query's key position). Held-out rows
(`validation`, `test`) score only the first query, so a row is one scored query and its row fields
(`fact_segment`, `overwritten`, `answer_id`) describe that query.

With `bind=True` a row also carries `bound`, the id whose input embedding the model adds to each
position's: the pair's key at both positions of a fact and at a query's key position, -1 elsewhere. It
names what a position is about, never a value.
"""

from __future__ import annotations

import numpy as np

PAD, QUERY = 0, 1
FIRST_KEY = 2
NUM_FILLER = 16
SPLITS = ("train", "validation", "test")


def recall_vocab_size(num_keys: int, num_values: int, num_filler: int = NUM_FILLER) -> int:
  """Ids a recall row may use: PAD, QUERY, the keys, the values and the filler tokens."""
  return FIRST_KEY + num_keys + num_values + num_filler


class RecallSource:
  """Random-access recall rows of one split (wrap it in a Grain `MapDataset`).

  Row i is a pure function of the constructor arguments and i; the splits draw from disjoint streams.

  Attributes:
    split, seed, num_samples, num_segments, segment_length: as given.
    pairs_per_segment, num_keys, num_values, num_filler, filler, overwrite_rate, queries, bind: as given.
    fact_segments: segments holding facts (0 given = num_segments - 1).
    vocab_size: `recall_vocab_size` of the ids above.
  """

  def __init__(self, split: str, seed: int, num_samples: int, num_segments: int, segment_length: int, *,
               pairs_per_segment: int = 2, num_keys: int = 16, num_values: int = 16,
               num_filler: int = NUM_FILLER, filler: int = 0, overwrite_rate: float = 0.0,
               queries: int = 4, fact_segments: int = 0, bind: bool = False):
    C, T, P = num_segments, segment_length, pairs_per_segment
    F = fact_segments or C - 1
    if split not in SPLITS:
      raise ValueError(f"unknown split {split!r}; valid splits: {', '.join(SPLITS)}")
    if seed < 0 or num_samples < 1:
      raise ValueError(f"need seed >= 0 and num_samples >= 1, got {seed} and {num_samples}")
    if C < 2 or T < 1:
      raise ValueError(f"need num_segments >= 2 and segment_length >= 1, got {C} and {T}")
    if not 1 <= F <= C - 1:
      raise ValueError(f"fact_segments={fact_segments} must be in [1, num_segments - 1 = {C - 1}] "
                       f"(0 = all context segments)")
    if P < 1 or filler < 0 or queries < 1:
      raise ValueError(f"need pairs_per_segment >= 1, filler >= 0 and queries >= 1, got {P}, {filler} "
                       f"and {queries}")
    if 2 * P + filler > T:
      raise ValueError(f"{P} pairs (2 tokens each) and {filler} filler tokens do not fit in a segment of "
                       f"{T} tokens")
    if 3 * queries > T:
      raise ValueError(f"{queries} queries (3 tokens each) do not fit in a segment of {T} tokens")
    if F * P > num_keys:
      raise ValueError(f"{F} fact segments x {P} pairs may need {F * P} distinct keys, more than "
                       f"num_keys={num_keys}")
    if num_values < 2:
      raise ValueError(f"num_values must be >= 2 (an overwrite needs a different value), got {num_values}")
    if not 0.0 <= overwrite_rate <= 1.0:
      raise ValueError(f"overwrite_rate must be in [0, 1], got {overwrite_rate}")
    if queries > F * P:
      raise ValueError(f"queries={queries} ask distinct keys but a row assigns at most {F * P} "
                       f"({F} fact segments x {P} pairs)")
    if filler and num_filler < 1:
      raise ValueError(f"filler={filler} tokens need num_filler >= 1 filler ids")
    self.split, self.seed, self.num_samples = split, seed, num_samples
    self.num_segments, self.segment_length, self.fact_segments = C, T, F
    self.pairs_per_segment, self.num_keys, self.num_values = P, num_keys, num_values
    self.num_filler, self.filler, self.overwrite_rate = num_filler, filler, overwrite_rate
    self.queries, self.bind = queries, bind
    self.vocab_size = recall_vocab_size(num_keys, num_values, num_filler)

  def __len__(self) -> int:
    return self.num_samples

  def key_id(self, key: int) -> int:
    return FIRST_KEY + key

  def value_id(self, value: int) -> int:
    return FIRST_KEY + self.num_keys + value

  def _facts(self, rng: np.random.Generator) -> list[tuple[int, int]]:
    """(key, value) of every fact in row order; at least `queries` distinct keys."""
    total = self.fact_segments * self.pairs_per_segment
    fresh = iter(rng.permutation(self.num_keys).tolist())
    current: dict[int, int] = {}
    facts = []
    for i in range(total):
      spare = len(current) + (total - i - 1) >= self.queries  # distinct keys still reachable
      if current and spare and rng.random() < self.overwrite_rate:
        key = list(current)[int(rng.integers(len(current)))]
        value = (current[key] + 1 + int(rng.integers(self.num_values - 1))) % self.num_values
      else:
        key, value = next(fresh), int(rng.integers(self.num_values))
      current[key] = value
      facts.append((key, value))
    return facts

  def _filler(self, rng: np.random.Generator, n: int) -> list[int]:
    first = FIRST_KEY + self.num_keys + self.num_values
    return (first + rng.integers(self.num_filler, size=n)).tolist()

  def __getitem__(self, index: int) -> dict[str, np.ndarray]:
    index = int(index)
    if not 0 <= index < self.num_samples:
      raise IndexError(f"row {index} out of range for a RecallSource of {self.num_samples} rows")
    C, T, P, F = self.num_segments, self.segment_length, self.pairs_per_segment, self.fact_segments
    rng = np.random.default_rng([0x7EC, SPLITS.index(self.split), self.seed, index])
    facts = self._facts(rng)
    inputs = np.full(C * T, PAD, np.int32)
    bound = np.full(C * T, -1, np.int32)
    latest: dict[int, tuple[int, int]] = {}  # key -> (value, segment) of its latest assignment
    count: dict[int, int] = {}
    for c in range(F):
      gaps = np.bincount(rng.integers(P + 1, size=self.filler), minlength=P + 1)
      pos = c * T
      for g in range(P + 1):
        inputs[pos:pos + gaps[g]] = self._filler(rng, int(gaps[g]))
        pos += int(gaps[g])
        if g == P:
          break
        key, value = facts[c * P + g]
        inputs[pos:pos + 2] = self.key_id(key), self.value_id(value)
        bound[pos:pos + 2] = self.key_id(key)
        latest[key] = (value, c)
        count[key] = count.get(key, 0) + 1
        pos += 2
    for c in range(F, C - 1):
      inputs[c * T:c * T + self.filler] = self._filler(rng, self.filler)

    asked = rng.permutation(list(latest))[:self.queries].tolist()
    scored = asked if self.split == "train" else asked[:1]
    loss_mask = np.zeros(C * T, np.float32)
    for j, key in enumerate(asked):
      pos = (C - 1) * T + 3 * j
      inputs[pos:pos + 3] = QUERY, self.key_id(key), self.value_id(latest[key][0])
      bound[pos + 1] = self.key_id(key)
      loss_mask[pos + 1] = float(j < len(scored))
    first = asked[0]
    row = {
        "inputs": inputs,
        "targets": np.concatenate([inputs[1:], np.asarray([PAD], np.int32)]),
        "loss_mask": loss_mask,
        "valid": inputs != PAD,
        "resets": np.arange(C) == 0,
        "answer_id": np.int32(latest[first][0]),
        "fact_segment": np.int32(latest[first][1]),
        "question_segment": np.int32(C - 1),
        "overwritten": np.int32(count[first] > 1),
    }
    if self.bind:
      row["bound"] = bound
    return row
