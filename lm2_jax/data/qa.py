"""QA training rows for the segment-recurrent model: C segments of T tokens, the question in the last.

Layout of a row (C = num_segments, T = segment_length):

    segments 0..C-2   the story's facts, in order, at sentence boundaries, mixed with whole filler
                      sentences (`filler_density` of the free space), then PAD. No fact straddles a
                      segment boundary; facts land on random segments within `fact_segments`, so the
                      distance from the last supporting fact to the question varies.
    segment  C-1      [filler][PAD][question][SEP][answer][EOS][PAD...]; the question starts at a fixed
                      offset (`question_offset`, from the task's longest question and answer), and the
                      filler before it comes from a stream that depends only on the row, never the story.

With `questions="every"` (training rows of qa1 only) each context segment that has room after its facts
also ends with [question][SEP][answer][EOS] about an actor met so far (in this segment or an earlier one):
several answers per row instead of one, at distances 0..C-2, like the interleaved questions of the original
bAbI stories. The last segment keeps the story's own question at its fixed offset.

So nothing before the answer depends on the answer except the facts: the position of the question, and the
text before it, are the same whatever the answer is. (A layout that padded before the question leaked the
answer's length, and a memory-less model learnt it.) Targets are next-token targets over the whole row.

With `bind=True` (qa1 only) a row also carries `bound`: at each position the token id of the latest actor
name at or before it (-1 before the first), the id whose input embedding the model adds to the position's
own. It hands the model "who this is about" and never an answer (qa1 answers are locations).

A `curriculum` makes the story length depend on the training step: `QASource.row_at_step(i, step)` draws
row i with the story length of the last curriculum entry at or before `step`. The data pipeline
(`lm2_jax.data.pipeline`) calls it with the step of the batch the row lands in, so the rows of a step are a
pure function of the step and the pipeline's position, and a resumed run reads what an uninterrupted one
would have. A `segment_curriculum` does the same for how far back the facts lie (RMT-style): from an
entry (step, n) on, a row's facts lie in the last n context segments, C-1-n..C-2, so the memory first
carries facts across one segment, later across more. The row's shape never changes.
"""

from __future__ import annotations

import numpy as np

from lm2_jax.data import babi, filler as filler_lib, tokenizers

LOSS_ON = ("answer", "all")
QUESTIONS = ("final", "every")


def actor_ids(task: str, tokenizer: tokenizers.Tokenizer) -> np.ndarray:
  """int32 ids of `task`'s actor names; `bind` is defined for qa1 only, where each name is one token.

  Raises:
    ValueError: another task, or a tokenizer that splits a name into several tokens.
  """
  if task != "qa1":
    raise ValueError(f"bind (the latest-actor channel) supports qa1 only, got {task}")
  ids = [tokenizer.encode(name) for name in babi.entities(task)[0]]
  if any(len(i) != 1 for i in ids):
    raise ValueError(f"bind needs a tokenizer that encodes every actor name as one token (e.g. `words`); "
                     f"got {dict(zip(babi.entities(task)[0], ids))}")
  return np.asarray([i[0] for i in ids], np.int32)


def latest_actor(tokens: np.ndarray, actors: np.ndarray, fill: int = -1) -> np.ndarray:
  """[..., S] tokens -> [..., S] int32: the latest id of `actors` at or before each position, else `fill`."""
  tokens = np.asarray(tokens)
  positions = np.where(np.isin(tokens, actors), np.arange(tokens.shape[-1]), -1)
  index = np.maximum.accumulate(positions, axis=-1)
  found = np.take_along_axis(tokens, np.maximum(index, 0), axis=-1)
  return np.where(index >= 0, found, fill).astype(np.int32)


class QALayoutError(ValueError):
  """A sample does not fit the row layout (too many or too long facts, or a too short segment)."""


def question_offset(task: str, tokenizer: tokenizers.Tokenizer, segment_length: int) -> int:
  """Fixed start of the question in the last segment: room for the task's longest question and answer.

  Raises:
    QALayoutError: the segment cannot hold the longest question, SEP, the longest answer and EOS.
  """
  max_q = max(len(tokenizer.encode(q)) for q in babi.all_questions(task))
  max_a = max(len(tokenizer.encode(a)) for a in babi.answer_vocab(task))
  offset = segment_length - (max_q + max_a + 2)
  if offset < 0:
    raise QALayoutError(f"{task}: segment_length {segment_length} is too short for the question block "
                        f"({max_q} question + {max_a} answer + SEP + EOS tokens); raise segment_length")
  return offset


def _greedy_end(lengths, i, seg, fill, capacity) -> int:
  """Segment where greedy packing of facts i.. ends, starting in `seg` already holding `fill` tokens."""
  for n in lengths[i:]:
    if fill + n > capacity[seg]:
      seg, fill = seg + 1, 0
      if seg >= len(capacity) or n > capacity[seg]:
        return len(capacity)
    fill += n
  return seg


def assign_segments(lengths, capacity, low: int, high: int, rng: np.random.Generator) -> list[int]:
  """A segment for every fact, in order, within [low, high], never overflowing a segment's capacity.

  Each fact aims for a sorted uniform draw over [low, high] and is clipped to the range that still lets
  the remaining facts fit, so facts spread across the range whenever they can.

  Raises:
    QALayoutError: the facts cannot fit in segments low..high.
  """
  cap = list(capacity[:high + 1])
  if any(n > max(cap[low:]) for n in lengths) or _greedy_end(lengths, 0, low, 0, cap) > high:
    raise QALayoutError(f"{len(lengths)} facts ({sum(lengths)} tokens, longest {max(lengths)}) do not fit "
                        f"in segments {low}..{high} of {cap[low:]} tokens")
  aims = np.sort(rng.integers(low, high + 1, size=len(lengths)))
  seg, fill, out = low, 0, []
  for i, n in enumerate(lengths):
    earliest = seg if fill + n <= cap[seg] else seg + 1
    latest = earliest
    for s in range(earliest, high + 1):
      start_fill = (fill if s == seg else 0) + n
      if start_fill <= cap[s] and _greedy_end(lengths, i + 1, s, start_fill, cap) <= high:
        latest = s
    choice = int(np.clip(aims[i], earliest, latest))
    fill = (fill if choice == seg else 0) + n
    seg = choice
    out.append(choice)
  return out


def _filler_tokens(stream, budget: int, tokenizer) -> list[list[int]]:
  """Whole filler sentences (tokenized, each with a trailing space) totalling at most `budget` tokens."""
  out, used = [], 0
  while True:
    ids = tokenizer.encode(next(stream) + " ")
    if used + len(ids) > budget:
      return out
    out.append(ids)
    used += len(ids)


def _where_questions(sample: babi.BabiSample, where: list[int], tokenizer, rng: np.random.Generator,
                     num_context: int) -> dict[int, tuple[list[int], list[int]]]:
  """For each context segment: (question ids, answer ids) about an actor met up to its end (qa1 only).

  A qa1 fact is "<Actor> <verb...> the <location>.", so an actor's location after a segment is the last
  word of its last fact so far. A segment with no fact so far gets no question.
  """
  state, out = {}, {}
  for c in range(num_context):
    for sentence, seg in zip(sample.sentences, where):
      if seg == c:
        words = sentence.rstrip(".").split()
        state[words[0]] = words[-1]
    if state:
      actor = sorted(state)[int(rng.integers(len(state)))]
      out[c] = (tokenizer.encode(f"Where is {actor}?"), tokenizer.encode(state[actor]))
  return out


def encode_qa_row(sample: babi.BabiSample, tokenizer: tokenizers.Tokenizer, num_segments: int,
                  segment_length: int, rng: np.random.Generator, *, loss_on: str = "answer",
                  filler_density: float = 0.0, filler=None, fact_segments: tuple[int, int] | None = None,
                  add_bos: bool = False, offset: int | None = None,
                  question_seed: int | None = None, questions: str = "final",
                  bind: bool = False) -> dict[str, np.ndarray]:
  """One training row of `sample`.

  Args:
    sample: the bAbI sample.
    tokenizer: any `Tokenizer`; its PAD, SEP, EOS (and BOS) ids are used.
    num_segments: C >= 2.
    segment_length: T.
    rng: draws fact placement and the filler streams' seeds.
    loss_on: 'answer' (the answer tokens and the EOS after them) or 'all' (every real target token).
    filler_density: fraction in [0, 1] of each segment's free space filled with whole filler sentences;
      0 gives facts + PAD only.
    filler: the filler source (`stream(seed)`); default the built-in `TemplateFiller`.
    fact_segments: inclusive (first, last) range of segments the facts are spread over; default
      (0, C-2), every context segment.
    add_bos: put BOS at the start of the row.
    offset: the question's start in the last segment; default `question_offset(task, ...)`. Pass it to
      skip recomputing it.
    question_seed: seed of the filler stream before the question; default drawn from `rng`. `QASource`
      derives it from the row index alone, so that text is provably the same whatever the story.
    questions: "final" (one question, in the last segment) or "every" (qa1 only: also a question after the
      facts of each context segment with room for it; every answer is in the loss).
    bind: also return `bound` (qa1 only; the tokenizer must encode each actor name as one token).

  Returns:
    inputs int32[C*T], targets int32[C*T] (inputs shifted left, PAD last), loss_mask float32[C*T],
    valid bool[C*T] (real input tokens), resets bool[C] (True at segment 0), and int32 scalars
    answer_id (index in `babi.answer_vocab`, or -1), fact_segment (segment of the last supporting fact)
    and question_segment (C-1); with `bind`, bound int32[C*T] (the latest actor's id, -1 before any).

  Raises:
    QALayoutError: the sample does not fit the layout.
    ValueError: bad arguments (`bind` on a task other than qa1 included).
  """
  C, T = num_segments, segment_length
  if C < 2 or T < 1:
    raise QALayoutError(f"need num_segments >= 2 and segment_length >= 1, got {C} and {T}")
  if loss_on not in LOSS_ON:
    raise ValueError(f"loss_on must be one of {LOSS_ON}, got {loss_on!r}")
  if questions not in QUESTIONS:
    raise ValueError(f"questions must be one of {QUESTIONS}, got {questions!r}")
  if questions == "every" and sample.task != "qa1":
    raise ValueError(f"questions='every' supports qa1 stories only, got {sample.task}")
  if not 0.0 <= filler_density <= 1.0:
    raise ValueError(f"filler_density must be in [0, 1], got {filler_density}")
  low, high = (0, C - 2) if fact_segments is None else fact_segments
  if not 0 <= low <= high <= C - 2:
    raise ValueError(f"fact_segments must satisfy 0 <= first <= last <= num_segments - 2 = {C - 2}, "
                     f"got {fact_segments}")
  actors = actor_ids(sample.task, tokenizer) if bind else None
  filler = filler or filler_lib.TemplateFiller()
  offset = question_offset(sample.task, tokenizer, T) if offset is None else offset
  pad = tokenizer.pad_id

  facts = [tokenizer.encode(s + " ") for s in sample.sentences]
  capacity = [T - (1 if add_bos and c == 0 else 0) for c in range(C - 1)]
  where = assign_segments([len(f) for f in facts], capacity, low, high, rng)
  context_stream = filler.stream(int(rng.integers(2**62)))
  question_seed = int(rng.integers(2**62)) if question_seed is None else question_seed
  question_stream = filler.stream(question_seed)

  asked = _where_questions(sample, where, tokenizer, rng, C - 1) if questions == "every" else {}
  rows, answer_spans = [], []
  for c in range(C - 1):
    mine = [f for f, s in zip(facts, where) if s == c]
    free = capacity[c] - sum(len(f) for f in mine)
    block, q_len = [], 0
    if c in asked and len(asked[c][0]) + len(asked[c][1]) + 2 <= free:
      q, a = asked[c]
      block, q_len = q + [tokenizer.sep_id] + a + [tokenizer.eos_id], len(q)
      free -= len(block)
    fill = _filler_tokens(context_stream, int(filler_density * free), tokenizer) if filler_density else []
    ids = [tokenizer.bos_id] if add_bos and c == 0 else []
    for piece in filler_lib.place_facts(mine, fill, rng):
      ids += piece
    if block:
      # Targets of positions SEP .. last answer token are the answer and EOS.
      answer_spans.append((c * T + len(ids) + q_len, len(block) - q_len - 1))
      ids += block
    rows.append(ids + [pad] * (T - len(ids)))

  question, answer = tokenizer.encode(sample.question), tokenizer.encode(sample.answer)
  block = question + [tokenizer.sep_id] + answer + [tokenizer.eos_id]
  if offset + len(block) > T:
    raise QALayoutError(f"question block of {len(block)} tokens does not fit after offset {offset} in a "
                        f"segment of {T}: {sample.question!r} / {sample.answer!r}")
  fill = _filler_tokens(question_stream, int(filler_density * offset), tokenizer) if filler_density else []
  head = [t for piece in fill for t in piece]
  rows.append(head + [pad] * (offset - len(head)) + block + [pad] * (T - offset - len(block)))

  inputs = np.asarray(rows, dtype=np.int32).reshape(C * T)
  targets = np.concatenate([inputs[1:], np.asarray([pad], np.int32)])
  valid = inputs != pad
  if loss_on == "all":
    loss_mask = valid & (targets != pad)
  else:
    sep = (C - 1) * T + offset + len(question)
    loss_mask = np.zeros(C * T, bool)
    loss_mask[sep:sep + len(answer) + 1] = True
    for start, n in answer_spans:
      loss_mask[start:start + n] = True
  vocab = babi.answer_vocab(sample.task)
  row = {
      "inputs": inputs,
      "targets": targets,
      "loss_mask": loss_mask.astype(np.float32),
      "valid": valid,
      "resets": np.arange(C) == 0,
      "answer_id": np.int32(vocab.index(sample.answer) if sample.answer in vocab else -1),
      "fact_segment": np.int32(where[max(sample.supporting)]),
      "question_segment": np.int32(C - 1),
      # 1 when the story's last sentence is the (last) supporting fact: "answer with the latest fact"
      # is right exactly on these rows, so accuracy on the others checks for that shortcut.
      "last_fact_supports": np.int32(max(sample.supporting) == len(sample.sentences) - 1),
  }
  if bind:
    row["bound"] = latest_actor(inputs, actors)
  return row


def _check_schedule(name: str, schedule) -> tuple:
  """`schedule` ((first_step, value), ...) with int steps; ValueError unless they start at 0 and increase."""
  steps = [int(first) for first, _ in schedule]
  if schedule and (steps[0] != 0 or any(b <= a for a, b in zip(steps, steps[1:]))):
    raise ValueError(f"{name} steps must start at 0 and increase, got {steps}")
  return tuple((int(first), value) for first, value in schedule)


def _at_step(schedule: tuple, step: int, default):
  """The value of the last entry of `schedule` whose first_step <= step, else `default`."""
  value = default
  for first, entry in schedule:
    if first <= step:
      value = entry
  return value


class QASource:
  """Random-access QA rows of one bAbI task and split (wrap it in a Grain `MapDataset`).

  Row i is a pure function of the constructor arguments and i (and, with a curriculum, the step:
  `row_at_step`). A story that does not fit the layout is replaced by the next draw for the same row
  (story index i + attempt * num_samples of the split's stream, so rows never share a story);
  `rejections(i)` says how many draws row i skipped. `bind` (qa1 only) adds the `bound` channel to every
  row. `curriculum`: ((first_step, num_sentences), ...), first_step 0 first and increasing; a row read at
  step s has the story length of the last entry whose first_step <= s; `source[i]` is row i at step 0.
  `segment_curriculum`: ((first_step, n), ...), likewise: a row read at step s has its facts in segments
  C-1-n..C-2 (1 <= n <= C-1) of the last entry at or before s; it replaces `fact_segments`.
  """

  def __init__(self, task: str, split: str, seed: int, tokenizer: tokenizers.Tokenizer, num_segments: int,
               segment_length: int, num_samples: int, *, loss_on: str = "answer",
               filler_density: float = 0.0, filler=None, fact_segments: tuple[int, int] | None = None,
               num_sentences=None, add_bos: bool = False, questions: str = "final", bind: bool = False,
               curriculum: tuple = (), segment_curriculum: tuple = (), max_attempts: int = 64):
    babi.check_task(task)
    if bind:
      actor_ids(task, tokenizer)
    babi.split_seed(split, seed)
    if num_samples < 1:
      raise ValueError(f"num_samples must be >= 1, got {num_samples}")
    self.curriculum = _check_schedule("curriculum", curriculum)
    for _, length in self.curriculum:
      babi.sentence_range(task, length)
    self.segment_curriculum = _check_schedule("segment_curriculum", segment_curriculum)
    if self.segment_curriculum and fact_segments is not None:
      raise ValueError("pass fact_segments or segment_curriculum, not both")
    for _, n in self.segment_curriculum:
      if not 1 <= n <= num_segments - 1:
        raise ValueError(f"segment_curriculum: n={n} context segments must be in 1..num_segments - 1 = "
                         f"{num_segments - 1}")
    self.task, self.split, self.seed, self.tokenizer = task, split, seed, tokenizer
    self.num_segments, self.segment_length, self.num_samples = num_segments, segment_length, num_samples
    self.num_sentences, self.fact_segments, self.max_attempts = num_sentences, fact_segments, max_attempts
    self.offset = question_offset(task, tokenizer, segment_length)
    self._row_kw = dict(loss_on=loss_on, filler_density=filler_density,
                        filler=filler or filler_lib.TemplateFiller(), add_bos=add_bos, offset=self.offset,
                        questions=questions, bind=bind)

  def __len__(self) -> int:
    return self.num_samples

  def story_length(self, step: int):
    """The `num_sentences` of rows read at `step`: the curriculum's entry then, else the constructor's."""
    return _at_step(self.curriculum, step, self.num_sentences)

  def fact_range(self, step: int) -> tuple[int, int] | None:
    """The `fact_segments` of rows read at `step`: (C-1-n, C-2) of the segment curriculum's entry n then,
    else the constructor's (None: every context segment)."""
    n = _at_step(self.segment_curriculum, step, None)
    last = self.num_segments - 2
    return self.fact_segments if n is None else (last + 1 - n, last)

  def _draw(self, index: int, step: int = 0):
    if not 0 <= index < self.num_samples:
      raise IndexError(f"row {index} out of range for a QASource of {self.num_samples} rows")
    errors = []
    num_sentences, fact_segments = self.story_length(step), self.fact_range(step)
    for attempt in range(self.max_attempts):
      sample = babi.generate(self.task, self.seed, index + attempt * self.num_samples,
                             num_sentences=num_sentences, split=self.split)
      stream = babi.split_seed(self.split, self.seed)
      rng = np.random.default_rng([babi.TASKS.index(self.task), stream, index, attempt, 0x9A])
      question_seed = int(np.random.default_rng([stream, index, 0x9B]).integers(2**62))
      try:
        return attempt, encode_qa_row(sample, self.tokenizer, self.num_segments, self.segment_length, rng,
                                      question_seed=question_seed, fact_segments=fact_segments,
                                      **self._row_kw)
      except QALayoutError as e:
        errors.append(str(e))
    raise ValueError(f"{self.task}: row {index}: no story fits {self.num_segments} segments of "
                     f"{self.segment_length} tokens in {self.max_attempts} draws (last: {errors[-1]}); "
                     f"use shorter stories (num_sentences) or longer/more segments")

  def __getitem__(self, index: int) -> dict[str, np.ndarray]:
    return self._draw(int(index))[1]

  def row_at_step(self, index: int, step: int) -> dict[str, np.ndarray]:
    """Row `index` as training step `step` reads it (the curricula's story length and fact segments at
    that step)."""
    return self._draw(int(index), int(step))[1]

  def rejections(self, index: int, step: int = 0) -> int:
    """How many stories row `index` (read at `step`) skipped because they did not fit."""
    return self._draw(int(index), int(step))[0]
