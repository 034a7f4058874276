"""The bAbI v1.2 world: its vocabulary, and a simulator whose actions obey the real preconditions.

A `World` holds actors, locations and objects. Every action it performs is legal (an actor moves only to a
new place; gets only an unheld object in the same place; drops only what it holds; gives only to someone
in the same place) and is rendered as one English sentence in the bAbI forms. The reader of a story only
learns what the sentences state: an actor's location is known after its first move, an object's location
after someone first gets it. The world records, for every sentence, what changed, so the task generators
in `babi.py` can answer questions and name the supporting facts by construction.
"""

from __future__ import annotations

import dataclasses

import numpy as np

ACTORS = ("John", "Mary", "Sandra", "Daniel")
LOCATIONS = ("bedroom", "kitchen", "garden", "hallway", "bathroom", "office")
OBJECTS = ("apple", "football", "milk")
QA5_ACTORS = ("Bill", "Fred", "Jeff", "Mary")
QA10_ACTORS = ("Bill", "Fred", "Julie", "Mary")
QA10_LOCATIONS = ("bedroom", "cinema", "kitchen", "office", "park", "school")
DIRECTIONS = ("north", "south", "east", "west")

MOVE_VERBS = ("moved", "went", "journeyed", "travelled", "went back")
GET_VERBS = ("got", "grabbed", "picked up", "took")
DROP_VERBS = ("dropped", "put down", "discarded", "left")
GIVE_VERBS = ("gave", "passed", "handed")
COUNT_WORDS = ("none", "one", "two", "three")

# Grid offsets of the directions (x east, y north): "the A is north of the B" puts A at B + (0, 1).
DIRECTION_VECTORS = {"north": (0, 1), "south": (0, -1), "east": (1, 0), "west": (-1, 0)}


@dataclasses.dataclass
class ObjectVisit:
  """One known location of an object, in story order.

  Attributes:
    location: where the object was.
    cause: index of the sentence that put it there (a move of its carrier, or, for the first known
      location, the move that placed its first getter there).
    acquired: index of the sentence by which the carrier came to hold it (get or give), or -1.
  """

  location: str
  cause: int
  acquired: int


class World:
  """A legal bAbI world with a story of rendered sentences.

  Attributes:
    actors, locations, objects: the entities of the task.
    sentences: the story so far.
    actor_loc: each actor's location, only for actors whose location the story has stated.
    last_move: index of each actor's latest move sentence.
    holder: the actor holding each object, or None.
    holdings: each actor's held objects in the order acquired.
    acquired_at: index of the sentence by which the current holder got each held object.
    history: each object's known locations (`ObjectVisit`), consecutive entries distinct.
    last_loss: index of the latest sentence by which each actor dropped or gave something away.
    gives: (sentence index, giver, object, recipient) of every give, in order.
    dropped_at: for each object lying where it was last dropped, (drop sentence, the dropper's move
      sentence that placed it there).
  """

  def __init__(self, rng: np.random.Generator, actors=ACTORS, locations=LOCATIONS, objects=OBJECTS):
    self.rng = rng
    self.actors = tuple(actors)
    self.locations = tuple(locations)
    self.objects = tuple(objects)
    self.sentences: list[str] = []
    self.actor_loc: dict[str, str] = {}
    self.last_move: dict[str, int] = {}
    self.holder: dict[str, str | None] = {o: None for o in self.objects}
    # Where each object really lies; the reader does not know it until somebody gets the object.
    self.object_loc = {o: self.locations[rng.integers(len(self.locations))] for o in self.objects}
    self.holdings: dict[str, list[str]] = {a: [] for a in self.actors}
    self.acquired_at: dict[str, int] = {}
    self.history: dict[str, list[ObjectVisit]] = {o: [] for o in self.objects}
    self.last_loss: dict[str, int] = {}
    self.gives: list[tuple[int, str, str, str]] = []
    self.dropped_at: dict[str, tuple[int, int]] = {}

  def _pick(self, options):
    return options[self.rng.integers(len(options))]

  def _say(self, text: str) -> int:
    self.sentences.append(text)
    return len(self.sentences) - 1

  def _there(self) -> str:
    return " there" if self.rng.random() < 0.5 else ""

  # Actions. Each checks its precondition, so a caller's bug cannot produce an illegal story.

  def move(self, actor: str, location: str) -> int:
    """`actor` goes to `location`, carrying whatever it holds; returns the sentence index."""
    if self.actor_loc.get(actor) == location:
      raise ValueError(f"{actor} is already in the {location}; a move must go to a new place")
    idx = self._say(f"{actor} {self._pick(MOVE_VERBS)} to the {location}.")
    self.actor_loc[actor] = location
    self.last_move[actor] = idx
    for obj in self.holdings[actor]:
      self.object_loc[obj] = location
      self.history[obj].append(ObjectVisit(location, idx, self.acquired_at[obj]))
    return idx

  def get(self, actor: str, obj: str) -> int:
    """`actor` picks up `obj`, which must lie unheld where the actor is."""
    loc = self.actor_loc.get(actor)
    if loc is None or self.holder[obj] is not None or self.object_loc[obj] != loc:
      raise ValueError(f"{actor} cannot get the {obj}: not lying in the actor's known place")
    idx = self._say(f"{actor} {self._pick(GET_VERBS)} the {obj}{self._there()}.")
    self.holder[obj] = actor
    self.holdings[actor].append(obj)
    self.acquired_at[obj] = idx
    self.dropped_at.pop(obj, None)
    if not self.history[obj]:
      self.history[obj].append(ObjectVisit(loc, self.last_move[actor], idx))
    return idx

  def drop(self, actor: str, obj: str) -> int:
    """`actor` puts down `obj`, which it must hold."""
    if self.holder[obj] != actor:
      raise ValueError(f"{actor} cannot drop the {obj}: it does not hold it")
    idx = self._say(f"{actor} {self._pick(DROP_VERBS)} the {obj}{self._there()}.")
    self.holder[obj] = None
    self.holdings[actor].remove(obj)
    del self.acquired_at[obj]
    self.last_loss[actor] = idx
    self.dropped_at[obj] = (idx, self.last_move[actor])
    return idx

  def give(self, actor: str, obj: str, recipient: str) -> int:
    """`actor` hands `obj` to `recipient`, who must be in the same known place."""
    if (self.holder[obj] != actor or recipient == actor
        or self.actor_loc.get(recipient) != self.actor_loc.get(actor)):
      raise ValueError(f"{actor} cannot give the {obj} to {recipient}")
    idx = self._say(f"{actor} {self._pick(GIVE_VERBS)} the {obj} to {recipient}.")
    self.holder[obj] = recipient
    self.holdings[actor].remove(obj)
    self.holdings[recipient].append(obj)
    self.acquired_at[obj] = idx
    self.last_loss[actor] = idx
    self.gives.append((idx, actor, obj, recipient))
    return idx

  # Legal options, for the random policy.

  def options(self, kind: str) -> list[tuple]:
    """All legal argument tuples of action `kind` ('move', 'get', 'drop', 'give') now."""
    if kind == "move":
      return [(a, l) for a in self.actors for l in self.locations if self.actor_loc.get(a) != l]
    if kind == "get":
      return [(a, o) for a in self.actors for o in self.objects
              if a in self.actor_loc and self.holder[o] is None and self.object_loc[o] == self.actor_loc[a]]
    if kind == "drop":
      return [(a, o) for o in self.objects if (a := self.holder[o]) is not None]
    if kind == "give":
      return [(a, o, b) for o in self.objects if (a := self.holder[o]) is not None
              for b in self.actors if b != a and self.actor_loc.get(b) == self.actor_loc[a]]
    raise ValueError(f"unknown action kind {kind!r}")

  def step(self, weights: dict[str, float], social: float = 0.0) -> int:
    """Performs one random legal action; kinds are drawn by `weights` among those possible now.

    Args:
      weights: relative weight of each action kind.
      social: probability that a move goes where another actor is (makes gives possible more often).

    Returns:
      The index of the new sentence.
    """
    kinds = [k for k in weights if weights[k] > 0 and self.options(k)]
    p = np.array([weights[k] for k in kinds], dtype=np.float64)
    kind = kinds[self.rng.choice(len(kinds), p=p / p.sum())]
    if kind == "move" and social > 0 and self.rng.random() < social:
      company = [(a, self.actor_loc[b]) for a in self.actors for b in self.actors
                 if b != a and b in self.actor_loc and self.actor_loc.get(a) != self.actor_loc[b]]
      if company:
        return self.move(*self._pick(company))
    args = self._pick(self.options(kind))
    return getattr(self, kind)(*args)
