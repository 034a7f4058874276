"""The run configuration: typed sections loaded from YAML, composed by experiment files, overridable.

An experiment file (configs/experiment/*.yaml) is a mapping of sections. A section's value is either a
mapping or a path to a YAML file holding that mapping (relative to the file that names it), so
`model: ../model/small.yaml` pulls in a model preset; a section mapping may also name such a file under
`include:` and override some of its keys (`model: {include: ../model/small.yaml, d_model: 128}`). A top-level `base: other.yaml` starts from
another experiment and deep-merges this file's sections on top. Command-line overrides are dotted
`key=value` pairs whose values are parsed as YAML (`train.steps=200`, `model.use_memory=false`).

Every section except `model` is a frozen dataclass here; `model` stays a plain mapping because its schema
belongs to `lm2_jax.model.ModelConfig`, which validates it (`RunConfig.model_config`). Unknown keys and
values of the wrong type fail at load time with the dotted key, so a typo never trains silently.
"""

from __future__ import annotations

import dataclasses
import pathlib
import types
import typing
from typing import Any, Literal

import yaml

from lm2_jax import yaml_io


class ConfigError(ValueError):
  """A run configuration that cannot be used; the message names the file and/or dotted key."""


@dataclasses.dataclass(frozen=True)
class TrainConfig:
  """Optimisation and step counts.

  Attributes:
    steps: optimizer steps of the whole run (a resumed run continues up to this number).
    batch_size: global batch (rows) per optimizer step, over all processes.
    micro_batches: gradient-accumulation chunks per step; must divide batch_size.
    seed: seeds parameter init and the step RNG.
    learning_rate: peak learning rate, reached after `warmup_steps`.
    warmup_steps: linear warm-up from 0.
    decay_steps: length of the cosine decay after warm-up; 0 = until `steps`.
    min_lr_ratio: the cosine decays to learning_rate * min_lr_ratio.
    b1, b2, eps: AdamW moments.
    weight_decay: decoupled weight decay, applied to matrices only (see optimizer.py).
    clip_norm: global gradient-norm clip; 0 disables it.
    init_from: checkpoint whose parameters start a fresh run (lm2_jax.train.warm_start): a
      `python -m lm2_jax.convert import` directory or a train.py run/checkpoints/step directory;
      empty = random init. Ignored when the run resumes from its own checkpoint.
    memory_aux_weight: w >= 0 of an auxiliary loss on the memory write: the training objective adds
      w * memory_aux, memory_aux = -(mutual information, in nats, between a segment's real tokens and the
      memory rows they write to) = -(H(the segment's mean write weights) - mean over its real tokens of
      H(a token's write weights)), averaged over memory blocks and (row, segment with a real token)
      (`lm2_jax.train.diagnostics.write_information`): it rewards writes spread over the rows with each
      token decisive. Logged as `memory_aux` in metrics.jsonl; `loss` stays the NLL. Needs LM2 memory
      blocks that sow write weights: `memory_write` slots, keyed or delta (not tokens, not RMT). 0 = off.
  """

  steps: int = 1000
  batch_size: int = 32
  micro_batches: int = 1
  seed: int = 0
  learning_rate: float = 1e-3
  warmup_steps: int = 100
  decay_steps: int = 0
  min_lr_ratio: float = 0.1
  b1: float = 0.9
  b2: float = 0.95
  eps: float = 1e-8
  weight_decay: float = 0.1
  clip_norm: float = 1.0
  init_from: str = ""
  memory_aux_weight: float = 0.0


@dataclasses.dataclass(frozen=True)
class DataConfig:
  """Where batches come from (the segment length T comes from the model config).

  Attributes:
    kind: `qa` (generated bAbI rows, `lm2_jax.data.qa.QASource`), `text` (a packed local corpus) or
      `recall` (synthetic key-value recall rows, `lm2_jax.data.recall.RecallSource`; no tokenizer).
    num_segments: C, segments per row.
    task: the bAbI task (`qa1`..`qa10`) of a QA run.
    train_size, eval_size: rows of the training and held-out splits (QA: the `train` and
      `validation` story streams, which never share a story).
    seed: the QA story-stream seed; also the shuffle seed of the training pipeline.
    loss_on: `answer` (answer tokens + EOS) or `all` (every real token) for training; held-out QA rows are
      always scored on the answer.
    filler_density: fraction of each segment's free space filled with distractor sentences (QA).
    questions: `final` (one question per row, in the last segment) or `every` (qa1 training rows also
      ask a question after the facts of each context segment that has room: more answers per row, at
      every distance); held-out rows always ask one final question.
    num_sentences, max_sentences: story length in sentences (QA): exactly num_sentences, or a uniform
      range num_sentences..max_sentences when max_sentences > 0; 0 = the task's default range.
    curriculum: the training stories' length by step (QA): [[step, max_sentences], ...], the first at
      step 0, steps increasing. From each entry's step on, training stories have num_sentences..that
      many sentences (num_sentences 0: from the task's default minimum). It replaces max_sentences for
      training rows only; held-out rows keep num_sentences..max_sentences. The rows of a step depend on
      the step alone, so a resumed run reads the same rows. Empty = none.
    segment_curriculum: how far back the training rows' facts lie, by step (QA; RMT-style):
      [[step, n], ...], the first at step 0, steps increasing, 1 <= n <= num_segments - 1. From each
      entry's step on, a training row's facts lie in the last n context segments before the question
      segment (segments C-1-n..C-2), so the memory first carries facts across few segments, later across
      more. The row's shape does not change (no recompilation); it composes with `curriculum` and is
      exactly resumable likewise. Held-out rows keep every context segment. Empty = none.
    tokenizer: `byte` (no file), `words` (built-in bAbI vocabulary, or a vocabulary file),
      `sentencepiece` or `hf`; tokenizer_path: its file.
    train_files, eval_files: comma-separated files / directories / globs of a `text` run, or
      `stdlib:train` / `stdlib:held_out` (the running Python's standard library sources, split by a hash of
      each file's path: `lm2_jax.data.stdlib`).
    on_error: what a `text` run does with an undecodable file or a bad JSONL line: `fail` (stop, naming
      the file and the line or byte offset) or `skip` (skip it and count it; the counts are printed).
    text_field: the (dotted) key of the document text in JSONL lines of a `text` run.
    align: how a `text` run cuts documents into rows: `stream` (greedy concatenation) or `document`
      (every document starts a row, its last row padded: segment c of such a row is segment c of the
      document; `lm2_jax.data.packing`).
    shuffle: reshuffle the training rows every epoch.
    worker_count: Grain worker processes (0 = in-process); batches do not depend on it.
    bind: rows also carry `bound`, the id whose embedding the model adds to each position's (the oracle
      channel): the latest actor name in qa1 rows, the fact's key in recall rows. qa1 and recall only.
    recall_pairs: key-value pairs per context segment (recall).
    recall_keys, recall_values: key and value vocabulary sizes (recall); the model's vocab_size must hold
      `lm2_jax.data.recall.recall_vocab_size` of them (PAD, QUERY, keys, values, 16 filler ids).
    recall_overwrite: probability that a fact reassigns a key met earlier in the row (recall).
    recall_filler: random filler tokens per context segment, between pairs (recall).
    recall_queries: queries in the last segment; training rows score all of them, held-out rows the
      first only (recall).
    recall_fact_segments: segments holding facts, the rest up to the last being filler (recall);
      0 = num_segments - 1.
  """

  kind: Literal["qa", "text", "recall"] = "qa"
  num_segments: int = 4
  task: str = "qa1"
  train_size: int = 20000
  eval_size: int = 1024
  seed: int = 0
  loss_on: Literal["answer", "all"] = "answer"
  filler_density: float = 0.0
  questions: Literal["final", "every"] = "final"
  num_sentences: int = 0
  max_sentences: int = 0
  curriculum: tuple[tuple[int, int], ...] = ()
  segment_curriculum: tuple[tuple[int, int], ...] = ()
  tokenizer: str = "byte"
  tokenizer_path: str = ""
  train_files: str = ""
  eval_files: str = ""
  align: Literal["stream", "document"] = "stream"
  on_error: Literal["fail", "skip"] = "fail"
  text_field: str = "text"
  shuffle: bool = True
  worker_count: int = 0
  bind: bool = False
  recall_pairs: int = 2
  recall_keys: int = 16
  recall_values: int = 16
  recall_overwrite: float = 0.0
  recall_filler: int = 0
  recall_queries: int = 4
  recall_fact_segments: int = 0


@dataclasses.dataclass(frozen=True)
class MeshConfig:
  """Device mesh shape over axes (data, fsdp, tensor); -1 on one axis = the rest of the devices.

  Attributes:
    data, fsdp, tensor: axis sizes.
    num_devices: use the first N devices only (0 = all of them).
  """

  data: int = -1
  fsdp: int = 1
  tensor: int = 1
  num_devices: int = 0


@dataclasses.dataclass(frozen=True)
class CheckpointConfig:
  """Orbax checkpointing.

  Attributes:
    enabled: write checkpoints at all (tests and quick sweeps may turn it off).
    every: save every N steps (and always at the end, on SIGTERM/SIGINT).
    keep: keep the last K checkpoints.
    async_save: save in a background thread while training continues.
  """

  enabled: bool = True
  every: int = 500
  keep: int = 3
  async_save: bool = True


@dataclasses.dataclass(frozen=True)
class LoggingConfig:
  """Metrics, evaluation and progress display.

  Attributes:
    every: log train metrics every N steps.
    eval_every: evaluate on the held-out split every N steps (0 = only at the end).
    eval_batches: batches per periodic evaluation (0 = the whole held-out split).
    tensorboard: also write TensorBoard event files.
    progress: show a tqdm progress bar with ETA.
    peak_flops: peak FLOP/s per device for MFU; 0 = measure with a timed matmul at start-up.
    memory_diagnostics: with LM2 memory (not RMT), every evaluation also logs per memory block the read
      entropy over the memory rows (/ log M), the effective number of rows a segment writes to and the
      input/forget gate means (`lm2_jax.train.diagnostics`) as `memory/block<i>/<name>` (metrics.jsonl,
      TensorBoard) and `memory` in final_eval.json. The eval step then holds the read and write weights
      of every segment and memory block of a batch (C x L_mem x B x Nm x T x M floats each): turn it off
      where that does not fit (the paper-size presets do).
  """

  every: int = 10
  eval_every: int = 0
  eval_batches: int = 0
  tensorboard: bool = True
  progress: bool = True
  peak_flops: float = 0.0
  memory_diagnostics: bool = True


@dataclasses.dataclass(frozen=True)
class RunConfig:
  """A whole run: the sections above plus the model mapping and where outputs go.

  Attributes:
    name: run name; outputs go to `<runs_dir>/<name>/`.
    runs_dir: parent of run directories.
    compare_to: run directory whose final_eval.json is printed next to this run's; empty = the sibling
      `<name>-nomem` when it exists.
    model: keyword arguments of `ModelConfig.from_dict` (validated by `model_config`).
  """

  name: str = "default"
  runs_dir: str = "runs"
  compare_to: str = ""
  model: dict = dataclasses.field(default_factory=dict)
  train: TrainConfig = TrainConfig()
  data: DataConfig = DataConfig()
  mesh: MeshConfig = MeshConfig()
  checkpoint: CheckpointConfig = CheckpointConfig()
  logging: LoggingConfig = LoggingConfig()

  @property
  def run_dir(self) -> pathlib.Path:
    return pathlib.Path(self.runs_dir) / self.name

  def model_config(self):
    """The frozen `ModelConfig` of this run; its ValueError (naming the key) becomes a ConfigError."""
    from lm2_jax.model import ModelConfig  # pylint: disable=g-import-not-at-top

    try:
      model_cfg = ModelConfig.from_dict(dict(self.model))
    except (ValueError, TypeError) as e:
      raise ConfigError(f"model section: {e}") from e
    _check_memory_aux(self.train.memory_aux_weight, model_cfg)
    return model_cfg

  def to_dict(self) -> dict:
    return dataclasses.asdict(self)


def _check_memory_aux(weight: float, model_cfg) -> None:
  """`train.memory_aux_weight` > 0 needs LM2 memory blocks that sow their write weights."""
  if weight <= 0:
    return
  key = f"train.memory_aux_weight={weight}"
  if model_cfg.use_memory and model_cfg.memory_kind == "rmt":
    raise ConfigError(f"{key} is a loss on the LM2 memory write; model.memory_kind=rmt writes memory tokens "
                      "with attention, not weights over memory rows")
  if model_cfg.num_memory_layers == 0:
    raise ConfigError(f"{key} is a loss on the LM2 memory write; this model has no memory blocks "
                      "(model.use_memory / model.memory_layers)")
  if model_cfg.memory_write == "tokens":
    raise ConfigError(f"{key} needs per-token write weights over the memory rows; model.memory_write=tokens "
                      "rewrites every row from all tokens (use slots, keyed or delta)")


def _check_type(value: Any, tp: Any, key: str) -> Any:
  """Returns `value` checked (and int -> float widened) against annotation `tp`; raises ConfigError."""
  origin = typing.get_origin(tp)
  if origin is Literal:
    if value not in typing.get_args(tp):
      raise ConfigError(f"{key}: {value!r} is not one of {list(typing.get_args(tp))}")
    return value
  if origin is tuple:
    args = typing.get_args(tp)
    if not isinstance(value, (list, tuple)):
      raise ConfigError(f"{key}: expected a list, got {type(value).__name__} {value!r}")
    if len(args) == 2 and args[1] is Ellipsis:
      return tuple(_check_type(v, args[0], f"{key}[{i}]") for i, v in enumerate(value))
    if len(value) != len(args):
      raise ConfigError(f"{key}: expected a list of {len(args)} values, got {value!r}")
    return tuple(_check_type(v, a, f"{key}[{i}]") for i, (v, a) in enumerate(zip(value, args)))
  if origin in (typing.Union, types.UnionType):
    args = typing.get_args(tp)
    if value is None and type(None) in args:
      return None
    for arg in args:
      if arg is type(None):
        continue
      try:
        return _check_type(value, arg, key)
      except ConfigError:
        pass
    raise ConfigError(f"{key}: {value!r} does not have type {tp}")
  if tp is float:
    if isinstance(value, (int, float)) and not isinstance(value, bool):
      return float(value)
    if isinstance(value, str):
      # YAML 1.1 reads `1e-4` (no dot) as a string; accept numeric text for float fields.
      try:
        return float(value)
      except ValueError:
        pass
  elif tp is int:
    if isinstance(value, int) and not isinstance(value, bool):
      return value
  elif tp in (bool, str, dict):
    if isinstance(value, tp):
      return value
  else:
    raise ConfigError(f"{key}: unsupported field type {tp}")
  raise ConfigError(f"{key}: expected {tp.__name__}, got {type(value).__name__} {value!r}")


def _build(cls, data: Any, prefix: str):
  """Builds dataclass `cls` from mapping `data`, rejecting unknown keys and wrong types."""
  if not isinstance(data, dict):
    raise ConfigError(f"{prefix or 'config'}: expected a mapping, got {type(data).__name__}")
  hints = typing.get_type_hints(cls)
  fields = {f.name for f in dataclasses.fields(cls)}
  unknown = sorted(map(str, set(data) - fields))   # YAML keys may be numbers, null or empty
  if unknown:
    where = f"{prefix}." if prefix else ""
    # Quoted unless a plain name, so an empty or blank key still shows.
    shown = [where + k if k.isidentifier() else repr(where + k) for k in unknown]
    raise ConfigError(f"unknown key(s) {', '.join(shown)}; "
                      f"known keys of {prefix or 'the top level'}: {sorted(fields)}")
  kwargs = {}
  for name, value in data.items():
    key = f"{prefix}.{name}" if prefix else name
    tp = hints[name]
    if dataclasses.is_dataclass(tp):
      kwargs[name] = _build(tp, value, key)
    else:
      kwargs[name] = _check_type(value, tp, key)
  return cls(**kwargs)


def read_yaml(path: pathlib.Path) -> dict:
  """The top-level mapping of a YAML file ({} for an empty file); ConfigError names the file and why."""
  return yaml_io.read_mapping(path, ConfigError)


def _deep_merge(base: dict, top: dict) -> dict:
  out = dict(base)
  for k, v in top.items():
    out[k] = _deep_merge(out[k], v) if isinstance(v, dict) and isinstance(out.get(k), dict) else v
  return out


def load_experiment(path: str | pathlib.Path, _seen: tuple = ()) -> dict:
  """Reads an experiment file into one plain mapping, resolving `base:` and section file includes."""
  path = pathlib.Path(path).resolve()
  if path in _seen:
    raise ConfigError(f"{path}: `base:` cycle through {[str(p) for p in _seen]}")
  data = read_yaml(path)
  merged: dict = {}
  if "base" in data:
    base = data.pop("base")
    if not isinstance(base, str):
      raise ConfigError(f"{path}: `base` must be a path string, got {base!r}")
    merged = load_experiment(path.parent / base, _seen + (path,))
  for section, value in data.items():
    if isinstance(value, str) and value.endswith((".yaml", ".yml")):
      value = read_yaml(path.parent / value)
    elif isinstance(value, dict) and "include" in value:
      value = dict(value)
      include = value.pop("include")
      if not isinstance(include, str):
        raise ConfigError(f"{path}: {section}.include must be a path string, got {include!r}")
      value = _deep_merge(read_yaml(path.parent / include), value)
    if isinstance(value, dict) and isinstance(merged.get(section), dict):
      value = _deep_merge(merged[section], value)
    merged[section] = value
  return merged


def apply_overrides(data: dict, overrides: list[str]) -> dict:
  """Applies dotted `key=value` overrides (values parsed as YAML) to a plain config mapping."""
  data = _deep_merge({}, data)
  for item in overrides:
    if "=" not in item:
      raise ConfigError(f"override {item!r}: expected dotted key=value, e.g. train.steps=200")
    key, raw = item.split("=", 1)
    try:
      value = yaml.safe_load(raw) if raw else ""
    except yaml.YAMLError as e:
      raise ConfigError(f"override {item!r}: value is not valid YAML: {e}") from e
    parts = key.strip().split(".")
    node = data
    for part in parts[:-1]:
      child = node.setdefault(part, {})
      if not isinstance(child, dict):
        raise ConfigError(f"override {item!r}: {part} is not a section")
      node = child
    node[parts[-1]] = value
  return data


def from_dict(data: dict) -> RunConfig:
  """Validates a plain mapping into a RunConfig; the model section is checked by ModelConfig."""
  cfg = _build(RunConfig, data, "")
  if cfg.train.micro_batches < 1 or cfg.train.batch_size % cfg.train.micro_batches:
    raise ConfigError(f"train.micro_batches={cfg.train.micro_batches} must be >= 1 and divide "
                      f"train.batch_size={cfg.train.batch_size}")
  for key, value in (("train.steps", cfg.train.steps), ("train.batch_size", cfg.train.batch_size),
                     ("logging.every", cfg.logging.every), ("checkpoint.every", cfg.checkpoint.every),
                     ("checkpoint.keep", cfg.checkpoint.keep),
                     ("data.num_segments", cfg.data.num_segments)):
    if value < 1:
      raise ConfigError(f"{key}={value} must be >= 1")
  for axis in ("data", "fsdp", "tensor"):
    size = getattr(cfg.mesh, axis)
    if size == 0 or size < -1:
      raise ConfigError(f"mesh.{axis}={size}: use a positive size or -1 (the rest of the devices)")
  if cfg.mesh.num_devices < 0:
    raise ConfigError(f"mesh.num_devices={cfg.mesh.num_devices}: use 0 (all devices) or a count")
  _check_curriculum(cfg.data)
  _check_segment_curriculum(cfg.data)
  if cfg.data.bind and not (cfg.data.kind == "recall" or (cfg.data.kind == "qa" and cfg.data.task == "qa1")):
    raise ConfigError(f"data.bind=true needs data.kind=recall or a qa1 run (data.kind=qa, data.task=qa1); "
                      f"got data.kind={cfg.data.kind}, data.task={cfg.data.task}")
  if not cfg.name or "/" in cfg.name:
    raise ConfigError(f"name={cfg.name!r}: give a non-empty run name without '/'")
  return cfg


def _check_schedule(key: str, schedule: tuple, data: DataConfig, what: str, example: str) -> None:
  """A QA run's by-step schedule `key` ([[step, value], ...]): steps from 0, increasing."""
  if data.kind != "qa":
    raise ConfigError(f"{key} sets {what} of QA rows; data.kind={data.kind} has none")
  steps = [step for step, _ in schedule]
  if steps[0] != 0 or any(b <= a for a, b in zip(steps, steps[1:])):
    raise ConfigError(f"{key}: the steps must start at 0 and increase, got {steps}; {example}")


def _check_curriculum(data: DataConfig) -> None:
  """`data.curriculum`: [[step, max_sentences], ...] from step 0, steps increasing, a QA run."""
  if not data.curriculum:
    return
  example = "e.g. data.curriculum=[[0, 2], [300, 4], [600, 6]] (max_sentences from that step on)"
  _check_schedule("data.curriculum", data.curriculum, data, "the story length", example)
  for step, most in data.curriculum:
    if most < max(1, data.num_sentences):
      raise ConfigError(f"data.curriculum: max_sentences={most} at step {step} must be >= 1 and >= "
                        f"data.num_sentences={data.num_sentences}; {example}")


def _check_segment_curriculum(data: DataConfig) -> None:
  """`data.segment_curriculum`: [[step, n], ...] from step 0, steps increasing, 1 <= n <= C-1, a QA run."""
  if not data.segment_curriculum:
    return
  example = ("e.g. data.segment_curriculum=[[0, 1], [200, 2], [400, 3]] (facts in the last n context "
             "segments from that step on)")
  _check_schedule("data.segment_curriculum", data.segment_curriculum, data, "where the facts lie", example)
  for step, n in data.segment_curriculum:
    if not 1 <= n <= data.num_segments - 1:
      raise ConfigError(f"data.segment_curriculum: n={n} at step {step} must be in 1..data.num_segments - 1"
                        f" = {data.num_segments - 1} (the context segments before the question); {example}")


def load_config(path: str | pathlib.Path, overrides: list[str] = (), validate_model: bool = True
                ) -> RunConfig:
  """Loads an experiment file, applies overrides and validates every section (model included)."""
  cfg = from_dict(apply_overrides(load_experiment(path), list(overrides)))
  if validate_model:
    cfg.model_config()
  return cfg


def save_config(cfg: RunConfig, path: str | pathlib.Path) -> None:
  """Writes the resolved config as YAML; `load_config` of that file gives back the same RunConfig.

  Written to a scratch file and renamed: a run killed meanwhile leaves the old file or the new, never half.
  """
  path = pathlib.Path(path)
  scratch = path.with_name(path.name + ".tmp")
  scratch.write_text(yaml.safe_dump(cfg.to_dict(), sort_keys=False))
  scratch.replace(path)
