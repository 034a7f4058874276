"""BABILong-style long-context QA: a bAbI story's facts hidden, in order, inside filler text.

For a target length (0k, 1k, ... 128k; k = 1024 tokens of the configured tokenizer) the builder draws
filler sentences until their token counts fill the budget left by the facts and the question, inserts the
facts at sorted random sentence boundaries, and appends the question. `0k` means the facts alone. A sample
whose facts and question alone exceed the target is skipped (`build_sample` returns None) and counted by
`build_set`. Sentences are tokenized one at a time and their lengths summed, so building a 64k sample costs
one pass over its sentences; one final tokenization of the whole text checks the count.

Command line (fixed evaluation sets as JSONL, one object per line):

    python -m lm2_jax.data.babilong --tasks qa1,qa2 --lengths 0k,1k,4k --samples 100 --seed 0 --out FILE
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import sys

import numpy as np

from lm2_jax.data import babi, filler as filler_lib, tokenizers

LENGTHS = {f"{k}k": k * 1024 for k in (0, 1, 2, 4, 8, 16, 32, 64, 128)}


@dataclasses.dataclass(frozen=True)
class BabiLongSample:
  """One long-context QA sample.

  Attributes:
    task, length: 'qa1'..'qa10' and the length name ('0k'..'128k').
    input: the context: filler sentences with the facts inserted, joined by single spaces.
    question, answer: from the bAbI sample.
    supporting: indices of the supporting facts among the story's facts.
    facts: the story's sentences, in order (each appears intact in `input`).
    num_tokens: tokens of `input + " " + question` under the builder's tokenizer (<= the target).
    target_tokens: the target length in tokens.
  """

  task: str
  length: str
  input: str
  question: str
  answer: str
  supporting: tuple[int, ...]
  facts: tuple[str, ...]
  num_tokens: int
  target_tokens: int

  def to_json(self) -> dict:
    row = dataclasses.asdict(self)
    row["supporting"], row["facts"] = list(self.supporting), list(self.facts)
    return row


def check_length(name: str) -> int:
  """Target tokens of a length name, or a ValueError listing the valid names."""
  if name not in LENGTHS:
    raise ValueError(f"unknown BABILong length {name!r}; valid lengths: {', '.join(LENGTHS)}")
  return LENGTHS[name]


def build_context(sample: babi.BabiSample, target_tokens: int, tokenizer: tokenizers.Tokenizer,
                  filler, rng: np.random.Generator, length_name: str = "") -> BabiLongSample | None:
  """Hides `sample`'s facts in filler so that context + question take at most `target_tokens` tokens.

  Args:
    sample: the bAbI sample.
    target_tokens: the budget; 0 means the facts alone, with no filler.
    tokenizer: measures lengths.
    filler: a filler source (`stream(seed)`), e.g. `filler.TemplateFiller()`.
    rng: draws the filler stream's seed and the fact positions.
    length_name: recorded in the result.

  Returns:
    The sample, or None when the facts and question alone exceed `target_tokens`.
  """
  count = lambda text: len(tokenizer.encode(text))  # noqa: E731
  facts = list(sample.sentences)
  stream_seed = int(rng.integers(2**62))
  base = count(" ".join(facts + [sample.question]))
  if target_tokens == 0:
    return _result(sample, length_name, " ".join(facts), base, 0)
  if base > target_tokens:
    return None
  budget = target_tokens - base
  space = max(count(" "), 1)
  fill, used = [], 0
  for sentence in filler.stream(stream_seed):
    cost = count(sentence) + space
    if used + cost > budget:
      break
    fill.append(sentence)
    used += cost
  parts = filler_lib.place_facts(facts, fill, rng)
  text = " ".join(parts)
  num_tokens = count(text + " " + sample.question)
  # Sub-word tokenizers may merge across sentence joins; drop filler until the exact count fits.
  while num_tokens > target_tokens:
    drop = max(i for i, p in enumerate(parts) if p not in facts)
    parts.pop(drop)
    text = " ".join(parts)
    num_tokens = count(text + " " + sample.question)
  return _result(sample, length_name, text, num_tokens, target_tokens)


def _result(sample, length_name, text, num_tokens, target_tokens) -> BabiLongSample:
  return BabiLongSample(sample.task, length_name, text, sample.question, sample.answer, sample.supporting,
                        sample.sentences, num_tokens, target_tokens)


def build_sample(task: str, length: str, seed: int, index: int, tokenizer: tokenizers.Tokenizer,
                 filler=None, split: str | None = "test", target_tokens: int | None = None,
                 num_sentences=None) -> BabiLongSample | None:
  """Sample `index` of (task, length, seed): a pure function of its arguments (random access).

  Args:
    task: 'qa1'..'qa10'.
    length: '0k'..'128k'.
    seed, index: the stream and the position in it; the same (seed, index) embeds the same bAbI story
      at every length.
    tokenizer: measures lengths.
    filler: a filler source; default the built-in `TemplateFiller`.
    split: the bAbI split the stories come from (None: the raw stream).
    target_tokens: overrides the length's token count (for tests and custom sizes).
    num_sentences: story length knob passed to `babi.generate`.

  Returns:
    The sample, or None when it is skipped (its facts and question alone exceed the target).
  """
  target = check_length(length) if target_tokens is None else int(target_tokens)
  sample = babi.generate(task, seed, index, num_sentences=num_sentences, split=split)
  rng = np.random.default_rng([babi.TASKS.index(task), target, seed, index, 0xB10])
  return build_context(sample, target, tokenizer, filler or filler_lib.TemplateFiller(), rng, length)


def build_set(tasks, lengths, samples: int, seed: int, tokenizer: tokenizers.Tokenizer, filler=None,
              split: str | None = "test", max_skips: int | None = None):
  """`samples` built samples for every (task, length), skipping samples that do not fit.

  Returns:
    (rows, skipped): the `BabiLongSample`s in (task, length, index) order, and a dict
    {(task, length): number of skipped indices}.

  Raises:
    RuntimeError: more than `max_skips` (default 10 * samples) skips for one (task, length).
  """
  max_skips = 10 * samples if max_skips is None else max_skips
  rows, skipped = [], {}
  for task in tasks:
    babi.check_task(task)
    for length in lengths:
      check_length(length)
      got, index, skips = 0, 0, 0
      while got < samples:
        row = build_sample(task, length, seed, index, tokenizer, filler, split)
        index += 1
        if row is None:
          skips += 1
          if skips > max_skips:
            raise RuntimeError(f"{task} at {length}: {skips} samples skipped (facts longer than the "
                               f"target); choose a longer length")
          continue
        rows.append(row)
        got += 1
      skipped[(task, length)] = skips
  return rows, skipped


def parse_list(text: str, valid, what: str) -> list[str]:
  """The comma-separated names of a `--{what}` flag, each checked against `valid` (ValueError)."""
  items = [t.strip() for t in text.split(",") if t.strip()]
  bad = [t for t in items if t not in valid]
  if bad or not items:
    raise ValueError(f"--{what}: unknown {what} {bad or text!r}; valid {what}: {', '.join(valid)}")
  return items


def main(argv=None) -> int:
  parser = argparse.ArgumentParser(description="Build fixed BABILong-style evaluation sets as JSONL.")
  parser.add_argument("--tasks", default="qa1", help="comma-separated, e.g. qa1,qa2")
  parser.add_argument("--lengths", default="0k", help="comma-separated, e.g. 0k,1k,4k")
  parser.add_argument("--samples", type=int, default=100, help="samples per (task, length)")
  parser.add_argument("--seed", type=int, default=0)
  parser.add_argument("--split", default="test", choices=babi.SPLITS)
  parser.add_argument("--tokenizer-kind", default="byte", choices=tokenizers.TOKENIZER_KINDS)
  parser.add_argument("--tokenizer-path", default=None, help="tokenizer file for sentencepiece / hf")
  parser.add_argument("--filler-files", default=None, help="comma-separated local text files (default: "
                      "built-in template filler)")
  parser.add_argument("--out", required=True, help="output JSONL file")
  args = parser.parse_args(argv)
  try:
    rows, skipped = _build_and_write(args)
  except (ValueError, OSError, RuntimeError) as e:
    # Bad flags, tokenizer or filler files, an --out that cannot be written: one line, exit 2 like argparse.
    print(f"error: {e}", file=sys.stderr)
    return 2
  for (task, length), n in skipped.items():
    counts = [r.num_tokens for r in rows if r.task == task and r.length == length]
    target = LENGTHS[length]
    ratio = "" if target == 0 else (f", tokens/target min {min(counts) / target:.3f} mean "
                                    f"{np.mean(counts) / target:.3f} max {max(counts) / target:.3f}")
    print(f"{task} {length}: {len(counts)} samples, {n} skipped, tokens min {min(counts)} mean "
          f"{np.mean(counts):.0f} max {max(counts)}{ratio}", file=sys.stderr)
  return 0


def _build_and_write(args) -> tuple[list[BabiLongSample], dict]:
  """Builds the set the parsed flags describe and writes it to --out; ValueError / OSError name the flag."""
  tasks = parse_list(args.tasks, babi.TASKS, "tasks")
  lengths = parse_list(args.lengths, LENGTHS, "lengths")
  if args.samples < 1:
    raise ValueError(f"--samples must be >= 1, got {args.samples}")
  try:
    tokenizer = tokenizers.make_tokenizer(args.tokenizer_kind, args.tokenizer_path)
  except (ValueError, OSError) as e:
    raise ValueError(f"--tokenizer-kind / --tokenizer-path: {e}") from None
  try:
    filler = (filler_lib.TextFileFiller([f for f in args.filler_files.split(",") if f.strip()])
              if args.filler_files else filler_lib.TemplateFiller())
  except (ValueError, OSError) as e:
    raise ValueError(f"--filler-files: {e}") from None
  rows, skipped = build_set(tasks, lengths, args.samples, args.seed, tokenizer, filler, args.split)
  try:
    with open(args.out, "w", encoding="utf-8") as f:
      for row in rows:
        f.write(json.dumps(row.to_json()) + "\n")
  except OSError as e:
    raise OSError(e.errno, f"--out: cannot write {args.out!r}: {e.strerror}") from None
  return rows, skipped


if __name__ == "__main__":
  sys.exit(main())
