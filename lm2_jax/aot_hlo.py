"""Reading HLO text for `lm2_jax.aot`: loop trip counts, matmul FLOPs and collectives.

XLA's `cost_analysis()` counts a while loop's body once, and the train step is nested loops (micro-batches,
segments, scanned layers). Here each computation gets a multiplier: how many times one step runs it
(the product of the trip counts of the loops around it). A loop's trip count is XLA's `known_trip_count`
annotation when there is one, else read from its condition, `counter < constant(N)`, the form
`jax.lax.scan` lowers to; a loop whose condition has another form counts once and is reported in
`Analysis.unknown_loops`.

Matmul FLOPs are counted from `dot` instructions (2 x output elements x contracted size) of the program
before XLA's optimisations (on TPU the optimised program turns dots into convolutions). Collectives and
HBM traffic are read from the optimised, partitioned program, whose shapes are per device: the traffic
of an instruction of a control-flow computation (the entry, loop bodies, branches; not the insides of
fusions) is its operands' and result's bytes, as XLA's cost analysis counts a fusion.
"""

from __future__ import annotations

import collections
import dataclasses
import math
import re

_BYTES = {"pred": 1, "s4": 0.5, "u4": 0.5, "s8": 1, "u8": 1, "f8e4m3fn": 1, "f8e5m2": 1, "bf16": 2,
          "f16": 2, "s16": 2, "u16": 2, "f32": 4, "s32": 4, "u32": 4, "f64": 8, "s64": 8, "u64": 8,
          "c64": 8, "c128": 16}
_ARRAY = re.compile(r"\b([a-z][a-z0-9]*)\[([0-9,]*)\]")
_HEADER = re.compile(r"^(?:ENTRY\s+)?%?([^\s(]+)\s.*\{\s*$")
_INSTR = re.compile(r"^\s+(ROOT\s+)?%?([^\s=]+)\s*=\s*(.*)$")
_CALLEE = re.compile(r"\b(calls|to_apply|body|condition|true_computation|false_computation)=%?([\w.\-]+)")
_CALLEE_LISTS = re.compile(r"\b(?:branch_computations|called_computations)=\{([^}]*)\}")
COLLECTIVES = ("all-reduce", "all-gather", "reduce-scatter", "all-to-all", "collective-permute")
# Instructions that move no data through HBM by themselves.
_NO_TRAFFIC = {"parameter", "get-tuple-element", "tuple", "bitcast", "constant", "while", "call",
               "conditional", "after-all", "partition-id", "replica-id", "opt-barrier"}


@dataclasses.dataclass
class Instr:
  name: str
  shape: str      # the result shape text (a tuple in parentheses, or one array)
  opcode: str
  rest: str       # operands and attributes
  root: bool = False


@dataclasses.dataclass
class CollectiveStats:
  """One kind of collective over a step, per device.

  Attributes:
    kind: e.g. all-gather. count: instructions in the program. executed: times one step runs them.
    bytes: result bytes (reduce-scatter: operand bytes) per device over a step.
    wire_bytes: bytes each device sends over a step with ring algorithms: (n-1)/n of the data for
      gathers, scatters and all-to-all, 2 (n-1)/n for all-reduce, all of it for a permute.
  """

  kind: str
  count: int = 0
  executed: float = 0.0
  bytes: float = 0.0
  wire_bytes: float = 0.0


@dataclasses.dataclass
class Analysis:
  """What `analyze` reads from one HLO module.

  Attributes:
    dot_flops: matmul FLOPs of one step (loop bodies times their trip counts).
    dot_flops_once: the same with every loop body counted once, as `cost_analysis()` counts.
    loops: trip counts of the while loops, outermost first.
    unknown_loops: while loops whose trip count could not be read (counted once).
    collectives: per kind.
    hbm_bytes: operand and result bytes of the instructions outside fusions, over a step.
    hbm_bytes_once: the same with every loop body counted once (compare `cost_analysis()`).
  """

  dot_flops: float
  dot_flops_once: float
  loops: list[int]
  unknown_loops: int
  collectives: dict[str, CollectiveStats]
  hbm_bytes: float = 0.0
  hbm_bytes_once: float = 0.0

  @property
  def trip_factor(self) -> float:
    """dot_flops / dot_flops_once: scales a loop-bodies-once count to a whole step."""
    return self.dot_flops / self.dot_flops_once if self.dot_flops_once else 1.0


def array_bytes(shape: str) -> float:
  """Bytes of a shape text (tuples summed); layouts and tiling annotations are ignored."""
  shape = re.sub(r"\{[^{}]*\}", "", shape)
  return sum(_BYTES.get(dt, 4) * math.prod(int(d) for d in dims.split(",") if d)
             for dt, dims in _ARRAY.findall(shape))


def _dims(shape: str) -> list[int]:
  match = _ARRAY.search(shape)
  return [int(d) for d in match.group(2).split(",") if d] if match else []


def _split_shape(text: str) -> tuple[str, str]:
  """'(a, b) op(...)' or 'f32[2]{0} op(...)' -> (shape, the rest)."""
  if text.startswith("("):
    depth = 0
    for i, ch in enumerate(text):
      depth += {"(": 1, ")": -1}.get(ch, 0)
      if depth == 0:
        return text[:i + 1], text[i + 1:].lstrip()
  shape, _, rest = text.partition(" ")
  return shape, rest


def parse(text: str) -> tuple[dict[str, list[Instr]], str]:
  """HLO module text -> ({computation: instructions}, entry computation name)."""
  comps: dict[str, list[Instr]] = {}
  entry, current = "", None
  for line in text.splitlines():
    if not line.startswith((" ", "\t")):
      header = _HEADER.match(line)
      if header and not line.startswith("HloModule"):
        current = header.group(1)
        comps[current] = []
        if line.startswith("ENTRY"):
          entry = current
      elif line.startswith("}"):
        current = None
      continue
    instr = _INSTR.match(line)
    if current is None or not instr:
      continue
    shape, rest = _split_shape(instr.group(3))
    opcode, _, rest = rest.partition("(")
    comps[current].append(Instr(instr.group(2), shape, opcode.strip(), rest, bool(instr.group(1))))
  return comps, entry


def _trip_count(condition: list[Instr]) -> int | None:
  """N of a `counter < constant(N)` loop condition, else None."""
  constants = [i for i in condition if i.opcode == "constant" and re.match(r"[su](8|16|32|64)\[\]", i.shape)]
  compares = [i for i in condition if i.opcode == "compare" and "direction=LT" in i.rest]
  if len(constants) == 1 and len(compares) == 1:
    return int(re.match(r"\s*(-?\d+)", constants[0].rest).group(1))
  return None


def _callees(instr: Instr) -> list[tuple[str, str]]:
  found = [(kind, name) for kind, name in _CALLEE.findall(instr.rest)]
  for names in _CALLEE_LISTS.findall(instr.rest):
    found += [("call", n.strip().lstrip("%")) for n in names.split(",") if n.strip()]
  return found


def _control_flow(comps: dict[str, list[Instr]], entry: str) -> set[str]:
  """The entry and the computations it runs as control flow (loop bodies and conditions, branches,
  calls), not as the inside of one instruction (fusions, reduction regions)."""
  found, todo = {entry}, [entry]
  while todo:
    for instr in comps.get(todo.pop(), []):
      if instr.opcode not in ("while", "conditional", "call"):
        continue
      for _, callee in _callees(instr):
        if callee not in found and callee in comps:
          found.add(callee)
          todo.append(callee)
  return found


def multipliers(comps: dict[str, list[Instr]], entry: str, trips: bool = True
                ) -> tuple[dict[str, float], list[int], int]:
  """How many times one run of `entry` runs each computation (every loop once with `trips=False`);
  also the loops' trip counts and how many loops have none."""
  edges: dict[str, list[tuple[str, float]]] = collections.defaultdict(list)
  loops, unknown = [], 0
  for name, instrs in comps.items():
    for instr in instrs:
      callees = dict((k, v) for k, v in _callees(instr) if k in ("body", "condition"))
      if instr.opcode == "while" and "body" in callees:
        known = re.search(r'known_trip_count":\{"n":"(\d+)"', instr.rest)  # XLA:GPU annotates it
        count = int(known.group(1)) if known else _trip_count(comps.get(callees.get("condition", ""), []))
        if count is None:
          unknown += 1
        else:
          loops.append(count)
        edges[name].append((callees["body"], float(count or 1) if trips else 1.0))
        continue
      edges[name] += [(callee, 1.0) for kind, callee in _callees(instr) if kind != "condition"]
  order, seen = [], set()

  def visit(node):  # post-order DFS: callees after all their callers once reversed
    seen.add(node)
    for callee, _ in edges.get(node, []):
      if callee not in seen and callee in comps:
        visit(callee)
    order.append(node)

  visit(entry)
  mult = collections.defaultdict(float, {entry: 1.0})
  for node in reversed(order):
    for callee, factor in edges.get(node, []):
      mult[callee] += mult[node] * factor
  return mult, loops, unknown


def _operands(instr: Instr) -> list[str]:
  """Operand tokens: a name, or a shape and a name."""
  return [t.strip() for t in instr.rest.split(")", 1)[0].split(",") if t.strip()]


def _operand_shapes(instr: Instr, shapes: dict[str, str]) -> list[str]:
  return [t if _ARRAY.search(t) else shapes.get(t.lstrip("%"), "") for t in _operands(instr)]


def _traffic(instr: Instr, shapes: dict[str, str], comps: dict[str, list[Instr]]) -> float:
  """HBM bytes an instruction outside fusions reads and writes. Like XLA's cost analysis, an operand a
  fusion only slices (a scan reading layer i of stacked weights) counts the slice, and a result written by
  an in-place dynamic-update-slice (a scan storing step i) counts the update."""
  operands = _operand_shapes(instr, shapes)
  if instr.opcode == "dynamic-slice":
    return 2 * array_bytes(instr.shape)
  if instr.opcode == "dynamic-update-slice":
    return 2 * array_bytes(operands[1])
  read = [array_bytes(o) for o in operands]
  written = 0.0 if instr.opcode.endswith("-start") else array_bytes(instr.shape)
  fused = comps.get(dict(_callees(instr)).get("calls", ""), [])
  if instr.opcode == "fusion" and fused:
    params = {int(re.match(r"\s*(\d+)", i.rest).group(1)): i.name for i in fused if i.opcode == "parameter"}
    users = {}
    for i in fused:
      for token in _operands(i):
        users.setdefault(token.split()[-1].lstrip("%"), []).append(i)
    for index, name in params.items():
      uses = users.get(name, [])
      if index < len(read) and uses and all(u.opcode in ("dynamic-slice", "slice") and
                                            _operands(u)[0].split()[-1].lstrip("%") == name for u in uses):
        read[index] = sum(array_bytes(u.shape) for u in uses)
    root = next((i for i in fused if i.root), None)
    if root is not None and root.opcode == "dynamic-update-slice":
      written = array_bytes(_operand_shapes(root, {i.name: i.shape for i in fused})[1])
      buffer = _operands(root)[0].split()[-1].lstrip("%")
      for index, name in params.items():
        if name == buffer and index < len(read):
          read[index] = 0.0  # updated in place: the rest of the buffer is neither read nor written
  return sum(read) + written


def _dot_flops(instr: Instr, shapes: dict[str, str]) -> float:
  lhs = _operand_shapes(instr, shapes)[0]
  contracting = re.search(r"lhs_contracting_dims=\{([0-9,]*)\}", instr.rest)
  dims = _dims(lhs)
  k = math.prod(dims[int(i)] for i in contracting.group(1).split(",") if i) if contracting else 1
  return 2.0 * math.prod(_dims(instr.shape)) * k


def _group_size(instr: Instr, devices: int) -> int:
  iota = re.search(r"replica_groups=\[(\d+),(\d+)\]<=", instr.rest)
  if iota:
    return int(iota.group(2))
  groups = re.search(r"replica_groups=\{\{([0-9,]*)\}", instr.rest)
  if groups:
    return len(groups.group(1).split(","))
  return devices


def analyze(text: str, devices: int = 1) -> Analysis:
  """Dot FLOPs and collectives of an HLO module text, with loop bodies multiplied by their trip counts."""
  comps, entry = parse(text)
  mult, loops, unknown = multipliers(comps, entry)
  once, _, _ = multipliers(comps, entry, trips=False)
  reachable = [name for name in comps if mult.get(name, 0.0) > 0]
  control = _control_flow(comps, entry)
  flops = flops_once = traffic = traffic_once = 0.0
  stats: dict[str, CollectiveStats] = {}
  for name in reachable:
    shapes = {i.name: i.shape for i in comps[name]}
    for instr in comps[name]:
      if name in control and instr.opcode not in _NO_TRAFFIC and not instr.opcode.endswith("-done"):
        moved = _traffic(instr, shapes, comps)
        traffic += moved * mult[name]
        traffic_once += moved * once[name]
      if instr.opcode == "dot":
        f = _dot_flops(instr, shapes)
        flops += f * mult[name]
        flops_once += f * once[name]
        continue
      kind = instr.opcode.removesuffix("-start")
      if kind not in COLLECTIVES or instr.opcode.endswith("-done"):
        continue
      n = _group_size(instr, devices)
      size = array_bytes(instr.shape)
      if kind == "reduce-scatter":
        size = sum(array_bytes(s) for s in _operand_shapes(instr, shapes)) or size * n
      elif instr.opcode in ("all-gather-start", "collective-permute-start"):
        # These return (operands, results, ...): count the largest result.
        size = max((array_bytes(f"{dt}[{d}]") for dt, d in _ARRAY.findall(instr.shape)), default=0)
      share = (n - 1) / n if n > 1 else 0.0
      wire = size * {"all-reduce": 2 * share, "collective-permute": 1.0}.get(kind, share)
      s = stats.setdefault(kind, CollectiveStats(kind))
      s.count += 1
      s.executed += mult[name]
      s.bytes += size * mult[name]
      s.wire_bytes += wire * mult[name]
  return Analysis(flops, flops_once, loops, unknown, stats, traffic, traffic_once)
