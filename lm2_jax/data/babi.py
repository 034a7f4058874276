"""bAbI qa1-qa10 samples, generated on demand, seeded and random-access.

`generate(task, seed, index)` computes sample `index` of stream `seed` from (task, seed, index) alone, so a
Grain map-style source can read any sample in any order. Each sample is a short story (the context
sentences), one question, its answer, and the indices of the supporting sentences. Answers are right by
construction: stories come from the legal world simulator in `babi_world.py`, and the answer is read from
its state, never guessed.

Splits: `generate(..., split="train"|"validation"|"test")` draws from a split-specific seed
(`split_seed`) AND keeps only stories whose text hashes into that split's bucket, so no story text is
ever shared by two splits, even for tasks whose space of stories is small (qa4 has two sentences).
"""

from __future__ import annotations

import dataclasses
import functools
import hashlib
import itertools

import numpy as np

from lm2_jax.data import babi_world as bw

TASKS = tuple(f"qa{i}" for i in range(1, 11))
SPLITS = ("train", "validation", "test")

# Default story lengths (context sentences) per task: bAbI-like, single question at the end.
DEFAULT_NUM_SENTENCES = {
    "qa1": (2, 10), "qa2": (4, 12), "qa3": (5, 14), "qa4": (2, 2), "qa5": (4, 12),
    "qa6": (2, 10), "qa7": (3, 10), "qa8": (3, 10), "qa9": (2, 10), "qa10": (2, 10),
}
_MIN_SENTENCES = {"qa1": 1, "qa2": 2, "qa3": 3, "qa4": 2, "qa5": 3, "qa6": 1, "qa7": 1, "qa8": 1,
                  "qa9": 1, "qa10": 1}
_MAX_TRIES = 2000


@dataclasses.dataclass(frozen=True)
class BabiSample:
  """One bAbI question with its story.

  Attributes:
    task: 'qa1'..'qa10'.
    sentences: the context sentences, in order, each ending with a period.
    question: the question, ending with '?'.
    answer: the answer ('kitchen', 'yes', 'two', 'apple,milk', ...).
    supporting: sorted indices into `sentences` of the facts the answer depends on.
  """

  task: str
  sentences: tuple[str, ...]
  question: str
  answer: str
  supporting: tuple[int, ...]


def check_task(task: str) -> str:
  """Returns `task` or raises a ValueError that lists the valid task names."""
  if task not in TASKS:
    raise ValueError(f"unknown bAbI task {task!r}; valid tasks: {', '.join(TASKS)}")
  return task


def split_seed(split: str, seed: int) -> int:
  """The stream seed of `split` for user seed `seed`; distinct (split, seed) pairs never share a seed."""
  if split not in SPLITS:
    raise ValueError(f"unknown split {split!r}; valid splits: {', '.join(SPLITS)}")
  if seed < 0:
    raise ValueError(f"seed must be >= 0, got {seed}")
  return len(SPLITS) * seed + SPLITS.index(split)


def story_split(sentences) -> str:
  """The split that owns a story: a fixed hash of its text, 10% test, 10% validation, 80% train."""
  digest = hashlib.blake2b("\n".join(sentences).encode("utf-8"), digest_size=8).digest()
  bucket = int.from_bytes(digest, "little") % 10
  return "test" if bucket == 0 else "validation" if bucket == 1 else "train"


def generate(task: str, seed: int, index: int, num_sentences=None, split: str | None = None) -> BabiSample:
  """Sample `index` of stream `seed` of `task`; a pure function of its arguments.

  Args:
    task: 'qa1'..'qa10'.
    seed: the stream (>= 0).
    index: the sample's index in the stream (>= 0).
    num_sentences: None (the task's default range), an int, or an inclusive (low, high) range of context
      sentences. qa4 stories always have two statements.
    split: None for the raw stream, or 'train' / 'validation' / 'test' for split-disjoint stories.

  Returns:
    The `BabiSample`.
  """
  check_task(task)
  if index < 0 or seed < 0:
    raise ValueError(f"seed and index must be >= 0, got seed={seed} index={index}")
  low, high = sentence_range(task, num_sentences)
  stream = seed if split is None else split_seed(split, seed)
  rng = np.random.default_rng([TASKS.index(task), stream, index, 0 if split is None else 1])
  for _ in range(_MAX_TRIES):
    sample = _GENERATORS[task](rng, int(rng.integers(low, high + 1)))
    if sample is not None and (split is None or story_split(sample.sentences) == split):
      return sample
  raise RuntimeError(f"{task}: no valid story with {low}..{high} sentences after {_MAX_TRIES} tries")


def sentence_range(task: str, num_sentences) -> tuple[int, int]:
  """The inclusive (low, high) story length of `generate`'s `num_sentences` for `task`.

  Raises:
    ValueError: a range the task cannot generate (low below its minimum, or low > high).
  """
  if task == "qa4":
    return 2, 2
  if num_sentences is None:
    return DEFAULT_NUM_SENTENCES[task]
  low, high = (num_sentences, num_sentences) if isinstance(num_sentences, int) else num_sentences
  if not _MIN_SENTENCES[task] <= low <= high:
    raise ValueError(f"{task}: num_sentences must satisfy {_MIN_SENTENCES[task]} <= low <= high, "
                     f"got {num_sentences!r}")
  return int(low), int(high)


# Vocabulary: every question form and every answer of a task, for layouts and answer ids.

def entities(task: str) -> tuple[tuple[str, ...], tuple[str, ...], tuple[str, ...]]:
  """(actors, locations, objects) that may appear in `task`'s stories."""
  check_task(task)
  if task == "qa4":
    return (), bw.LOCATIONS, ()
  if task == "qa5":
    return bw.QA5_ACTORS, bw.LOCATIONS, bw.OBJECTS
  if task == "qa10":
    return bw.QA10_ACTORS, bw.QA10_LOCATIONS, ()
  objects = bw.OBJECTS if task in ("qa2", "qa3", "qa7", "qa8") else ()
  return bw.ACTORS, bw.LOCATIONS, objects


@functools.cache
def answer_vocab(task: str) -> tuple[str, ...]:
  """Every answer `task` can give, in a fixed order (the index is the trainer's `answer_id`)."""
  actors, locations, objects = entities(task)
  if task in ("qa1", "qa2", "qa3", "qa4"):
    return tuple(locations)
  if task == "qa5":
    return tuple(objects) + tuple(actors)
  if task in ("qa6", "qa9"):
    return ("yes", "no")
  if task == "qa10":
    return ("yes", "no", "maybe")
  if task == "qa7":
    return bw.COUNT_WORDS
  lists = [",".join(p) for r in (1, 2, 3) for p in itertools.permutations(bw.OBJECTS, r)]
  return ("nothing",) + tuple(lists)


@functools.cache
def all_questions(task: str) -> tuple[str, ...]:
  """Every question `task` can ask (used to fix the question's offset in a QA row)."""
  actors, locations, objects = entities(task)
  if task in ("qa1", "qa7", "qa8"):
    form = {"qa1": "Where is {}?", "qa7": "How many objects is {} carrying?", "qa8": "What is {} carrying?"}
    return tuple(form[task].format(a) for a in actors)
  if task == "qa2":
    return tuple(f"Where is the {o}?" for o in objects)
  if task == "qa3":
    return tuple(f"Where was the {o} before the {l}?" for o in objects for l in locations)
  if task == "qa4":
    return tuple(q for d in bw.DIRECTIONS for l in locations
                 for q in (f"What is the {l} {d} of?", f"What is {d} of the {l}?"))
  if task == "qa5":
    return tuple([f"What did {a} give to {b}?" for a in actors for b in actors if a != b]
                 + [f"Who gave the {o} to {b}?" for o in objects for b in actors]
                 + [f"Who received the {o}?" for o in objects])
  return tuple(f"Is {a} in the {l}?" for a in actors for l in locations)


# Task generators: (rng, num_sentences) -> BabiSample, or None when this draw cannot ask a question.

def _sample(task, world_or_sentences, question, answer, supporting) -> BabiSample:
  sentences = getattr(world_or_sentences, "sentences", world_or_sentences)
  return BabiSample(task, tuple(sentences), question, answer, tuple(sorted(set(supporting))))


def _run(rng, n, weights, social=0.0, **entities_kw) -> bw.World:
  world = bw.World(rng, **entities_kw)
  while len(world.sentences) < n:
    world.step(weights, social)
  return world


def _pick(rng, options):
  return options[rng.integers(len(options))]


def _qa1(rng, n):
  world = _run(rng, n, {"move": 1.0})
  actor = _pick(rng, sorted(world.actor_loc))
  return _sample("qa1", world, f"Where is {actor}?", world.actor_loc[actor], [world.last_move[actor]])


def _qa6(rng, n):
  world = _run(rng, n, {"move": 1.0})
  actor = _pick(rng, sorted(world.actor_loc))
  here = world.actor_loc[actor]
  place = here if rng.random() < 0.5 else _pick(rng, [l for l in bw.LOCATIONS if l != here])
  return _sample("qa6", world, f"Is {actor} in the {place}?", "yes" if place == here else "no",
                 [world.last_move[actor]])


_OBJECT_WEIGHTS = {"move": 0.5, "get": 0.35, "drop": 0.15}


def _qa2(rng, n):
  world = _run(rng, n, _OBJECT_WEIGHTS)
  known = [o for o in bw.OBJECTS if world.history[o]]
  if not known:
    return None
  obj = _pick(rng, known)
  holder = world.holder[obj]
  if holder is not None:
    support = [world.acquired_at[obj], world.last_move[holder]]
    answer = world.actor_loc[holder]
  else:
    support = list(world.dropped_at[obj])
    answer = world.history[obj][-1].location
  return _sample("qa2", world, f"Where is the {obj}?", answer, support)


def _qa3(rng, n):
  world = _run(rng, n, _OBJECT_WEIGHTS)
  candidates = []
  for obj in bw.OBJECTS:
    visits = world.history[obj]
    if len(visits) >= 2 and [v.location for v in visits].count(visits[-1].location) == 1:
      candidates.append(obj)
  if not candidates:
    return None
  obj = _pick(rng, candidates)
  prev, last = world.history[obj][-2:]
  return _sample("qa3", world, f"Where was the {obj} before the {last.location}?", prev.location,
                 [prev.cause, last.acquired, last.cause])


def _qa4(rng, n):
  del n
  names = [bw.LOCATIONS[i] for i in rng.permutation(len(bw.LOCATIONS))]
  first, second = names[0], names[1]
  d1 = _pick(rng, bw.DIRECTIONS)
  pos = {second: (0, 0), first: bw.DIRECTION_VECTORS[d1]}
  statements = [(first, d1, second)]
  anchor = _pick(rng, [first, second])
  d2 = _pick(rng, [d for d in bw.DIRECTIONS
                   if tuple(np.add(pos[anchor], bw.DIRECTION_VECTORS[d])) not in pos.values()])
  third = names[2]
  # Half the time the new location is the subject ("The third is d2 of anchor"), else the object.
  if rng.random() < 0.5:
    statements.append((third, d2, anchor))
  else:
    statements.append((anchor, _OPPOSITE[d2], third))
  sentences = [f"The {a} is {d} of the {b}." for a, d, b in statements]
  k = int(rng.integers(2))
  a, d, b = statements[k]
  if rng.random() < 0.5:
    return _sample("qa4", sentences, f"What is the {a} {d} of?", b, [k])
  return _sample("qa4", sentences, f"What is {d} of the {b}?", a, [k])


_OPPOSITE = {"north": "south", "south": "north", "east": "west", "west": "east"}


def _qa5(rng, n):
  world = _run(rng, n, {"move": 0.4, "get": 0.3, "drop": 0.1, "give": 0.6}, social=0.5,
               actors=bw.QA5_ACTORS)
  if not world.gives:
    return None
  idx, giver, obj, recipient = world.gives[-1]
  form = int(rng.integers(3))
  if form == 0:
    question, answer = f"What did {giver} give to {recipient}?", obj
  elif form == 1:
    question, answer = f"Who gave the {obj} to {recipient}?", giver
  else:
    question, answer = f"Who received the {obj}?", recipient
  return _sample("qa5", world, question, answer, [idx])


def _holding_support(world, actor) -> list[int]:
  held = world.holdings[actor]
  if held:
    return [world.acquired_at[o] for o in held]
  return [world.last_loss.get(actor, world.last_move.get(actor, -1))]


def _carrying(task):
  def make(rng, n):
    world = _run(rng, n, {"move": 0.4, "get": 0.35, "drop": 0.15, "give": 0.2}, social=0.3)
    present = sorted(set(world.actor_loc))
    holders = [a for a in present if world.holdings[a]]
    # Favour actors who hold something, so the answers are not mostly "none".
    actor = _pick(rng, holders if holders and rng.random() < 0.7 else present)
    held = world.holdings[actor]
    if task == "qa7":
      return _sample(task, world, f"How many objects is {actor} carrying?", bw.COUNT_WORDS[len(held)],
                     _holding_support(world, actor))
    return _sample(task, world, f"What is {actor} carrying?", ",".join(held) or "nothing",
                   _holding_support(world, actor))
  return make


def _state_task(task, actors, locations, extra_kind):
  """qa9 / qa10: moves mixed with negated or indefinite statements about an actor's place."""

  def make(rng, n):
    sentences, state, last = [], {}, {}
    for _ in range(n):
      actor = _pick(rng, actors)
      here = state.get(actor, ("none",))
      if rng.random() < 0.6 or actor not in state:
        place = _pick(rng, [l for l in locations if here != ("at", l)])
        sentences.append(f"{actor} {_pick(rng, bw.MOVE_VERBS)} to the {place}.")
        state[actor] = ("at", place)
      elif extra_kind == "negation":
        if here[0] == "at" and rng.random() < 0.5:
          sentences.append(f"{actor} is no longer in the {here[1]}.")
          state[actor] = ("not", here[1])
        else:
          place = _pick(rng, locations)
          sentences.append(f"{actor} is not in the {place}.")
          state[actor] = ("not", place)
      else:
        a, b = rng.choice(len(locations), size=2, replace=False)
        sentences.append(f"{actor} is either in the {locations[a]} or the {locations[b]}.")
        state[actor] = ("either", locations[a], locations[b])
      last[actor] = len(sentences) - 1
    actor = _pick(rng, sorted(state))
    kind, *places = state[actor]
    others = [l for l in locations if l not in places]
    if kind == "at":
      place, answer = (places[0], "yes") if rng.random() < 0.5 else (_pick(rng, others), "no")
    elif kind == "not":
      place, answer = places[0], "no"
    elif rng.random() < 2 / 3:
      place, answer = _pick(rng, places), "maybe"
    else:
      place, answer = _pick(rng, others), "no"
    return _sample(task, sentences, f"Is {actor} in the {place}?", answer, [last[actor]])

  return make


_GENERATORS = {
    "qa1": _qa1, "qa2": _qa2, "qa3": _qa3, "qa4": _qa4, "qa5": _qa5, "qa6": _qa6,
    "qa7": _carrying("qa7"), "qa8": _carrying("qa8"),
    "qa9": _state_task("qa9", bw.ACTORS, bw.LOCATIONS, "negation"),
    "qa10": _state_task("qa10", bw.QA10_ACTORS, bw.QA10_LOCATIONS, "indefinite"),
}
