"""Memory read attention and memory updates of one sample (paper Fig. 6), as arrays and PNG plots.

The sample (context, question, SEP; the QA prompt layout of `streaming`) is streamed segment by segment
through a jitted segment forward that also returns the sown intermediates. For a chosen block it records:

- the read attention [T, M] (tokens x slots, averaged over memory heads) of every segment: the first
  segment reads the initial memory, later ones a memory that has absorbed the earlier segments;
- the update norm per slot, ||mem_{c+1}[m] - mem_c[m]|| [C, M]: how much each segment rewrote each slot.
"""

from __future__ import annotations

import dataclasses
import pathlib

import flax.linen as nn
import jax
import numpy as np

from lm2_jax.eval import streaming
from lm2_jax.eval.babilong_eval import max_answer_tokens
from lm2_jax.eval.checkpoints import EvalModel
from lm2_jax.model import LM2, ModelConfig
from lm2_jax.model.layout import unstack_layers


@dataclasses.dataclass(frozen=True)
class MemoryTrace:
  """What the memory did over one sample.

  Attributes:
    read_attention: float [C, T, M] the block's read attention per segment (mean over heads).
    valid: bool [C, T] real tokens of each segment.
    update_norm: float [C, M] per-slot norm of the memory change each segment wrote.
    block: the block index.
  """

  read_attention: np.ndarray
  valid: np.ndarray
  update_norm: np.ndarray
  block: int


def trace_memory(cfg: ModelConfig, variables, tokens: np.ndarray, valid: np.ndarray, block: int) -> MemoryTrace:
  """Streams one row tokens [1, C*T] and records `block`'s read attention and the memory updates.

  Raises:
    ValueError: a memory-less model, or a block without memory.
  """
  if not cfg.use_memory:
    raise ValueError("attention maps need a model with memory (use_memory: true)")
  if not 0 <= block < cfg.num_memory_layers:
    raise ValueError(f"--block {block}: the model has memory in blocks 0..{cfg.num_memory_layers - 1}")
  params = nn.unbox(variables["params"])
  if cfg.scan_layers:
    params = unstack_layers(params, cfg)
  cfg = cfg.replace(scan_layers=False, remat="none")
  model = LM2(cfg)

  @jax.jit
  def step(params, tokens, valid, memory):
    (_, new_memory), state = model.apply({"params": params}, tokens, memory=memory, valid=valid,
                                         mutable=["intermediates"])
    attention = state["intermediates"][f"block_{block}"]["memory"]["read_attention"][0]
    return attention[0, 0].mean(axis=0), new_memory   # [segment=1, B=1, Nm, T, M] -> [T, M]

  t = cfg.segment_length
  memory = model.apply({"params": params}, 1, method=LM2.initial_memory)
  maps, norms = [], []
  for start in range(0, tokens.shape[1], t):
    attention, new_memory = step(params, tokens[:, start:start + t], valid[:, start:start + t], memory)
    before = memory if cfg.memory_flow == "chained" else memory[block]
    after = new_memory if cfg.memory_flow == "chained" else new_memory[block]
    norms.append(np.linalg.norm(np.asarray(after - before)[0], axis=-1))
    maps.append(np.asarray(attention))
    memory = new_memory
  return MemoryTrace(np.stack(maps), valid.reshape(-1, t).astype(bool), np.stack(norms), block)


def sample_tokens(model: EvalModel, row: dict) -> tuple[np.ndarray, np.ndarray]:
  """[1, C*T] tokens and validity of one BABILong row's prompt (padded at the end to a whole segment)."""
  tok, t = model.tokenizer, model.cfg.segment_length
  budget = max_answer_tokens(row["task"], [row["answer"]], tok)
  batch = streaming.build_qa_batch([tok.encode(row["input"] + " ")], [tok.encode(row["question"])],
                                   segment_length=t, max_new_tokens=budget, pad_id=tok.pad_id,
                                   sep_id=tok.sep_id)
  pad = -batch.tokens.shape[1] % t
  tokens = np.pad(batch.tokens, ((0, 0), (0, pad)), constant_values=tok.pad_id)
  return tokens, np.pad(batch.valid, ((0, 0), (0, pad)))


def plot_trace(trace: MemoryTrace, out_dir: str | pathlib.Path, title: str = "") -> list[pathlib.Path]:
  """Writes attention_block{b}.png (first vs last segment), memory_updates.png and memory_trace.npz."""
  import matplotlib  # pylint: disable=g-import-not-at-top
  matplotlib.use("Agg")
  import matplotlib.pyplot as plt  # pylint: disable=g-import-not-at-top

  out_dir = pathlib.Path(out_dir)
  out_dir.mkdir(parents=True, exist_ok=True)
  # The first segment with a real token reads the initial memory; the last one, everything before it.
  real = np.flatnonzero(trace.valid.any(axis=1))
  first, last = int(real[0]), int(real[-1])
  fig, axes = plt.subplots(1, 2, figsize=(11, 4.5), squeeze=False)
  for ax, c, label in ((axes[0, 0], first, "before (initial memory)"),
                       (axes[0, 1], last, f"after {last} segments absorbed")):
    rows = trace.valid[c]
    image = ax.imshow(trace.read_attention[c][rows], aspect="auto", cmap="magma", interpolation="nearest")
    ax.set_title(f"segment {c}: {label}")
    ax.set_xlabel("memory slot")
    ax.set_ylabel("token (real tokens of the segment)")
    fig.colorbar(image, ax=ax)
  fig.suptitle(f"{title} block {trace.block}: memory read attention")
  attention_png = out_dir / f"attention_block{trace.block}.png"
  fig.savefig(attention_png, dpi=100)
  plt.close(fig)

  fig, (ax0, ax1) = plt.subplots(1, 2, figsize=(11, 4.5))
  image = ax0.imshow(trace.update_norm.T, aspect="auto", cmap="viridis", interpolation="nearest")
  ax0.set_xlabel("segment")
  ax0.set_ylabel("memory slot")
  ax0.set_title("||memory update|| per slot")
  fig.colorbar(image, ax=ax0)
  ax1.plot(trace.update_norm.mean(axis=1), marker="o")
  ax1.set_xlabel("segment")
  ax1.set_ylabel("mean update norm over slots")
  ax1.set_title("how much each segment rewrites the memory")
  fig.suptitle(f"{title} memory updates (block {trace.block}'s bank)")
  updates_png = out_dir / "memory_updates.png"
  fig.savefig(updates_png, dpi=100)
  plt.close(fig)

  arrays = out_dir / "memory_trace.npz"
  np.savez(arrays, read_attention=trace.read_attention, valid=trace.valid, update_norm=trace.update_norm)
  return [attention_png, updates_png, arrays]


def plot_sample(model: EvalModel, row: dict, block: int, out_dir) -> list[pathlib.Path]:
  """Traces one BABILong row through `model` and writes the plots (see `plot_trace`)."""
  tokens, valid = sample_tokens(model, row)
  trace = trace_memory(model.cfg, model.variables, tokens, valid, block)
  return plot_trace(trace, out_dir, f"{model.name} {row['task']} {row['length']}")
