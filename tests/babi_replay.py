"""An independent bAbI reader for tests: parses story sentences back into a world and answers questions.

It shares no code with `lm2_jax.data.babi*`: it only knows the English forms. Every sentence is checked
against the world's rules while replaying (an illegal action raises `IllegalStory`), and `answer` /
`supporting` derive the answer and the supporting facts from the replayed state alone.
"""

from __future__ import annotations

import re

MOVE = re.compile(r"^(\w+) (?:moved|went|journeyed|travelled|went back) to the (\w+)\.$")
GET = re.compile(r"^(\w+) (?:got|grabbed|picked up|took) the (\w+)(?: there)?\.$")
DROP = re.compile(r"^(\w+) (?:dropped|put down|discarded|left) the (\w+)(?: there)?\.$")
GIVE = re.compile(r"^(\w+) (?:gave|passed|handed) the (\w+) to (\w+)\.$")
REL = re.compile(r"^The (\w+) is (north|south|east|west) of the (\w+)\.$")
NO_LONGER = re.compile(r"^(\w+) is no longer in the (\w+)\.$")
NOT_IN = re.compile(r"^(\w+) is not in the (\w+)\.$")
EITHER = re.compile(r"^(\w+) is either in the (\w+) or the (\w+)\.$")

INVERSE = {"north": "south", "south": "north", "east": "west", "west": "east"}
NUMBERS = ["none", "one", "two", "three"]


class IllegalStory(AssertionError):
  """A sentence breaks the world's rules."""


class Replay:
  """The state of a story after reading its sentences."""

  def __init__(self, sentences):
    self.place = {}       # actor -> ("at", L) | ("not", L) | ("either", A, B)
    self.about = {}       # actor -> index of the latest sentence stating its place
    self.holder = {}      # object -> actor or None
    self.where = {}       # object -> location, once known
    self.trail = {}       # object -> [(location, cause sentence, acquisition sentence)]
    self.held = {}        # actor -> [objects in acquisition order]
    self.got_at = {}      # object -> sentence by which its holder got it
    self.lost = {}        # actor -> latest sentence where it dropped/gave something
    self.drop_info = {}   # object -> (drop sentence, the dropper's place sentence)
    self.gives = []       # (sentence, giver, object, recipient)
    self.relations = []   # (a, direction, b, sentence)
    for i, s in enumerate(sentences):
      self._read(i, s)

  def _loc(self, actor):
    state = self.place.get(actor)
    return state[1] if state and state[0] == "at" else None

  def _read(self, i, s):
    if m := MOVE.match(s):
      actor, loc = m.groups()
      if self._loc(actor) == loc:
        raise IllegalStory(f"{s!r}: already there")
      self.place[actor] = ("at", loc)
      self.about[actor] = i
      for obj in self.held.get(actor, []):
        self.where[obj] = loc
        self.trail[obj].append((loc, i, self.got_at[obj]))
    elif m := GET.match(s):
      actor, obj = m.groups()
      loc = self._loc(actor)
      if loc is None or self.holder.get(obj) or self.where.get(obj, loc) != loc:
        raise IllegalStory(f"{s!r}: cannot get")
      self.holder[obj] = actor
      self.held.setdefault(actor, []).append(obj)
      self.got_at[obj] = i
      self.drop_info.pop(obj, None)
      if obj not in self.where:
        self.where[obj] = loc
        self.trail[obj] = [(loc, self.about[actor], i)]
    elif m := DROP.match(s):
      actor, obj = m.groups()
      if self.holder.get(obj) != actor:
        raise IllegalStory(f"{s!r}: not holding it")
      self.holder[obj] = None
      self.held[actor].remove(obj)
      self.lost[actor] = i
      self.drop_info[obj] = (i, self.about[actor])
    elif m := GIVE.match(s):
      actor, obj, other = m.groups()
      if self.holder.get(obj) != actor or other == actor or self._loc(other) != self._loc(actor):
        raise IllegalStory(f"{s!r}: cannot give")
      self.holder[obj] = other
      self.held[actor].remove(obj)
      self.held.setdefault(other, []).append(obj)
      self.got_at[obj] = i
      self.lost[actor] = i
      self.gives.append((i, actor, obj, other))
    elif m := REL.match(s):
      a, d, b = m.groups()
      self.relations.append((a, d, b, i))
    elif m := NO_LONGER.match(s):
      actor, loc = m.groups()
      if self._loc(actor) != loc:
        raise IllegalStory(f"{s!r}: was not there")
      self.place[actor], self.about[actor] = ("not", loc), i
    elif m := NOT_IN.match(s):
      actor, loc = m.groups()
      self.place[actor], self.about[actor] = ("not", loc), i
    elif m := EITHER.match(s):
      actor, a, b = m.groups()
      if a == b:
        raise IllegalStory(f"{s!r}: same place twice")
      self.place[actor], self.about[actor] = ("either", a, b), i
    else:
      raise IllegalStory(f"unparsed sentence {s!r}")

  def _directions(self):
    facts = []
    for a, d, b, i in self.relations:
      facts += [(a, d, b, i), (b, INVERSE[d], a, i)]
    return facts

  def solve(self, question):
    """(answer, supporting sentence indices) of `question`."""
    if m := re.match(r"^Where is (\w+)\?$", question):
      return self._loc(m[1]), {self.about[m[1]]}
    if m := re.match(r"^Where is the (\w+)\?$", question):
      obj = m[1]
      holder = self.holder[obj]
      if holder:
        return self._loc(holder), {self.got_at[obj], self.about[holder]}
      return self.where[obj], set(self.drop_info[obj])
    if m := re.match(r"^Where was the (\w+) before the (\w+)\?$", question):
      trail = self.trail[m[1]]
      assert trail[-1][0] == m[2], "question must ask about the current location"
      assert [t[0] for t in trail].count(m[2]) == 1, "ambiguous question"
      return trail[-2][0], {trail[-2][1], trail[-1][1], trail[-1][2]}
    if m := re.match(r"^What is the (\w+) (\w+) of\?$", question):
      hits = [(b, i) for a, d, b, i in self._directions() if a == m[1] and d == m[2]]
      assert len({b for b, _ in hits}) == 1, f"answer not unique: {hits}"
      return hits[0][0], {i for _, i in hits if (m[1], m[2], hits[0][0], i) in self._stated()}
    if m := re.match(r"^What is (\w+) of the (\w+)\?$", question):
      hits = [(a, i) for a, d, b, i in self._directions() if d == m[1] and b == m[2]]
      assert len({a for a, _ in hits}) == 1, f"answer not unique: {hits}"
      return hits[0][0], {i for _, i in hits if (hits[0][0], m[1], m[2], i) in self._stated()}
    if m := re.match(r"^What did (\w+) give to (\w+)\?$", question):
      i, _, obj, _ = [g for g in self.gives if g[1] == m[1] and g[3] == m[2]][-1]
      return obj, {i}
    if m := re.match(r"^Who gave the (\w+) to (\w+)\?$", question):
      i, giver, _, _ = [g for g in self.gives if g[2] == m[1] and g[3] == m[2]][-1]
      return giver, {i}
    if m := re.match(r"^Who received the (\w+)\?$", question):
      i, _, _, recipient = [g for g in self.gives if g[2] == m[1]][-1]
      return recipient, {i}
    if m := re.match(r"^How many objects is (\w+) carrying\?$", question):
      held = self.held.get(m[1], [])
      return NUMBERS[len(held)], self._holding_support(m[1])
    if m := re.match(r"^What is (\w+) carrying\?$", question):
      held = self.held.get(m[1], [])
      return ",".join(held) or "nothing", self._holding_support(m[1])
    if m := re.match(r"^Is (\w+) in the (\w+)\?$", question):
      kind, *places = self.place[m[1]]
      if kind == "at":
        answer = "yes" if places[0] == m[2] else "no"
      elif kind == "not":
        assert places[0] == m[2], "undecidable question"
        answer = "no"
      else:
        answer = "maybe" if m[2] in places else "no"
      return answer, {self.about[m[1]]}
    raise AssertionError(f"unparsed question {question!r}")

  def _stated(self):
    return set(self.relations)

  def _holding_support(self, actor):
    held = self.held.get(actor, [])
    if held:
      return {self.got_at[o] for o in held}
    return {self.lost.get(actor, self.about.get(actor))}


def solve(sentences, question):
  """(answer, supporting) of `question` about the story `sentences`."""
  return Replay(sentences).solve(question)
