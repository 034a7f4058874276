"""The command line of `eval.py`: BABILong (default), perplexity, multiple choice, memory attention maps.

    python eval.py --run runs/A --run runs/B --tasks qa1,qa2 --lengths 0k,1k,4k
    python eval.py --run runs/A --data FILE.jsonl      # the file's tasks and lengths, unless given
    python eval.py perplexity --run runs/A --files data/*.txt     # several files, or comma-separated
    python eval.py perplexity --run runs/A --run runs/B --files stdlib:held_out --by-segment --max-segments 16
    python eval.py mc --run runs/A --file mmlu.jsonl
    python eval.py attention --run runs/A --task qa1 --length 1k --block 0
    python eval.py recall --run runs/R --lengths 1,4,16   # a recall or qa run over k x its segments

Results go to `<run dir>/eval/` of the first model, or to `--out`. A BABILong run replaces the predictions
files of models it did not evaluate there, so the directory describes the latest run.
"""

from __future__ import annotations

import argparse
import pathlib
import re
import sys

COMMANDS = ("babilong", "perplexity", "mc", "attention", "recall")
DEFAULT_LENGTHS = "0k,1k,2k,4k"
PREDICTIONS = "babilong_predictions_{}.jsonl"
# The corpus reader's and the perplexity library's errors name their own options; here they are flags.
_FLAG_NAMES = {"corpus.on_error='skip'": "--on-error skip", "corpus.on_error": "--on-error",
               "corpus.paths": "--files", "corpus.text_field": "--text-field",
               "corpus.txt_split": "--txt-split", "max_unknown": "--max-unknown"}


class UsageError(ValueError):
  """A bad command line (the message says which flag)."""


def _parse_list(text: str, valid, what: str) -> list[str]:
  from lm2_jax.data import babilong  # pylint: disable=g-import-not-at-top
  try:
    return babilong.parse_list(text, valid, what)
  except ValueError as e:
    raise UsageError(str(e)) from None


def _add_model_args(parser: argparse.ArgumentParser, multiple: bool) -> None:
  action = "append" if multiple else "store"
  parser.add_argument("--run", action=action, default=[] if multiple else None,
                      help="run directory runs/NAME (newest checkpoint)" + (", repeatable" if multiple else ""))
  parser.add_argument("--checkpoint", action=action, default=[] if multiple else None,
                      help="a checkpoints/ or checkpoints/STEP directory" + (", repeatable" if multiple else ""))
  parser.add_argument("--model-config", default=None,
                      help="model YAML to use instead of the checkpoint's saved config")
  parser.add_argument("--out", default=None, help="output directory (default: <first run>/eval)")
  parser.add_argument("--no-progress", action="store_true", help="no progress bars")


def _parser() -> argparse.ArgumentParser:
  parser = argparse.ArgumentParser(prog="eval.py", description=__doc__,
                                   formatter_class=argparse.RawDescriptionHelpFormatter)
  sub = parser.add_subparsers(dest="command")
  bl = sub.add_parser("babilong", help="BABILong QA accuracy, task x length")
  _add_model_args(bl, multiple=True)
  bl.add_argument("--tasks", default=None,
                  help="comma-separated (default: those of --data, else qa1-qa10)")
  bl.add_argument("--lengths", default=None,
                  help=f"comma-separated (default: those of --data, else {DEFAULT_LENGTHS})")
  bl.add_argument("--data", default=None, help="JSONL from `python -m lm2_jax.data.babilong` "
                  "(default: build --samples per task and length now)")
  bl.add_argument("--samples", type=int, default=20, help="samples per (task, length) when building")
  bl.add_argument("--seed", type=int, default=0)
  bl.add_argument("--split", default="test", choices=("train", "validation", "test"))
  bl.add_argument("--batch-size", type=int, default=8)
  bl.add_argument("--max-context", type=int, default=None,
                  help="cut every context to its last N tokens (default: all for memory models, the "
                       "training context for memory-less ones)")
  bl.add_argument("--temperature", type=float, default=0.0)
  bl.add_argument("--top-k", type=int, default=None)
  bl.add_argument("--top-p", type=float, default=None)

  ppl = sub.add_parser("perplexity", help="perplexity of local text, streamed segment by segment")
  _add_model_args(ppl, multiple=True)
  ppl.add_argument("--files", nargs="+", required=True,
                   help="files, directories or globs (several, as a shell glob expands, or comma-separated)")
  ppl.add_argument("--text-field", default="text")
  ppl.add_argument("--txt-split", default="file", choices=("file", "blank_lines"))
  ppl.add_argument("--on-error", default="fail", choices=("fail", "skip"),
                   help="a malformed document, line or file: stop with an error, or skip it and count it")
  ppl.add_argument("--max-documents", type=int, default=0, help="0 = all")
  ppl.add_argument("--max-unknown", type=float, default=None,
                   help="refuse text whose share of unknown-token ids (words outside the tokenizer's "
                        "vocabulary) exceeds this (default 0.05; 1 = score anyway; the share is reported)")
  ppl.add_argument("--by-segment", action="store_true",
                   help="perplexity by segment index within a document, each document streamed from its "
                        "start with the memory carried (a table across the models, and "
                        "perplexity_by_segment.json)")
  ppl.add_argument("--max-segments", type=int, default=None,
                   help="with --by-segment: segments scored per document, past the trained length too "
                        "(default 16)")
  ppl.add_argument("--batch-size", type=int, default=None,
                   help="with --by-segment: documents scored together (default 8)")
  ppl.add_argument("--baseline", default=None,
                   help="with --by-segment: a model name (its run directory's name) the others are "
                        "compared with, segment index by segment index")

  mc = sub.add_parser("mc", help="multiple choice (MMLU-style JSONL) by log-likelihood")
  _add_model_args(mc, multiple=True)
  mc.add_argument("--file", required=True, help="JSONL with question, choices, answer[, subject]")
  mc.add_argument("--normalize", action="store_true", help="rank by mean (not summed) log-likelihood")

  att = sub.add_parser("attention", help="memory read-attention heatmaps and memory updates (one sample)")
  _add_model_args(att, multiple=False)
  att.add_argument("--data", default=None, help="BABILong JSONL (default: build one sample now)")
  att.add_argument("--task", default="qa1")
  att.add_argument("--length", default="1k")
  att.add_argument("--index", type=int, default=0, help="which sample of (task, length)")
  att.add_argument("--seed", type=int, default=0)
  att.add_argument("--block", type=int, default=0)

  rc = sub.add_parser("recall", help="a recall or qa run's accuracy on rows of k x its trained segments")
  rc.add_argument("--run", action="append", default=[], required=True,
                  help="run directory of a data.kind: recall or qa run (repeatable)")
  rc.add_argument("--lengths", default="1,4,16", help="comma-separated segment multipliers")
  rc.add_argument("--rows", type=int, default=512, help="held-out rows per length")
  rc.add_argument("--batch-size", type=int, default=32)
  rc.add_argument("--pairs", type=int, default=None,
                  help="facts per context segment (default: the run's data.recall_pairs)")
  rc.add_argument("--filler-density", type=float, default=None,
                  help="qa runs: fraction of each segment's free space given to filler sentences "
                       "(default: the run's data.filler_density)")
  rc.add_argument("--out", default=None, help="output directory (default: <first run>/eval)")
  return parser


def _load_models(args) -> list:
  from lm2_jax.eval import checkpoints  # pylint: disable=g-import-not-at-top
  from lm2_jax.model import ModelConfig  # pylint: disable=g-import-not-at-top

  paths = ([args.run] if isinstance(args.run, str) else list(args.run or []))
  paths += ([args.checkpoint] if isinstance(args.checkpoint, str) else list(args.checkpoint or []))
  if not paths:
    raise UsageError("give a model: --run runs/NAME or --checkpoint DIR")
  override = ModelConfig.from_yaml(args.model_config) if args.model_config else None
  models, seen = [], set()
  for path in paths:
    model = checkpoints.load_model(path, model_config=override)
    name = model.name if model.name not in seen else f"{model.name}@{model.step}"
    seen.add(name)
    models.append(checkpoints.EvalModel(name, model.cfg, model.variables, model.tokenizer,
                                        model.trained_length, model.step, model.source))
  return models


def _out_dir(args, models) -> pathlib.Path:
  if args.out:
    out = pathlib.Path(args.out)
  else:
    step_dir = pathlib.Path(models[0].source)
    base = step_dir.parent.parent if step_dir.parent.name == "checkpoints" else step_dir
    out = base / "eval"
  out.mkdir(parents=True, exist_ok=True)
  return out


def run_babilong(args) -> int:
  from lm2_jax.eval import babilong_eval, tables  # pylint: disable=g-import-not-at-top
  from lm2_jax.data import babi, babilong  # pylint: disable=g-import-not-at-top

  tasks = _parse_list(args.tasks, babi.TASKS, "tasks") if args.tasks else None
  lengths = _parse_list(args.lengths, babilong.LENGTHS, "lengths") if args.lengths else None
  if args.batch_size < 1 or args.samples < 1:
    raise UsageError("--batch-size and --samples must be >= 1")
  rows = None
  if args.data:
    rows = babilong_eval.select(babilong_eval.read_jsonl(args.data), tasks, lengths)
    # Unless given, the tasks and lengths are the file's own.
    tasks = tasks or [t for t in babi.TASKS if any(r["task"] == t for r in rows)]
    lengths = lengths or [n for n in babilong.LENGTHS if any(r["length"] == n for r in rows)]
  tasks = tasks or list(babi.TASKS)
  lengths = lengths or _parse_list(DEFAULT_LENGTHS, babilong.LENGTHS, "lengths")
  models = _load_models(args)
  if rows is None:
    rows = babilong_eval.build_rows(tasks, lengths, args.samples, args.seed, models[0].tokenizer,
                                    args.split)
  out = _out_dir(args, models)
  reports = []
  for model in models:
    report = babilong_eval.evaluate(model, rows, batch_size=args.batch_size, max_context=args.max_context,
                                    temperature=args.temperature, top_k=args.top_k, top_p=args.top_p,
                                    seed=args.seed, progress=not args.no_progress)
    reports.append(report)
    print(tables.format_table(report, tasks, lengths) + "\n")
  # The predictions of models this run did not evaluate would read as this run's: they go.
  current = {PREDICTIONS.format(_safe(r.name)) for r in reports}
  for stale in out.glob(PREDICTIONS.format("*")):
    if stale.name not in current:
      stale.unlink()
  for report in reports:
    babilong_eval.write_predictions(report, out / PREDICTIONS.format(_safe(report.name)))
  if len(reports) > 1:
    print(tables.format_comparison(reports, tasks, lengths) + "\n")
  text = "\n\n".join([tables.format_table(r, tasks, lengths) for r in reports]
                     + [tables.format_comparison(reports, tasks, lengths)])
  (out / "babilong.txt").write_text(text + "\n")
  tables.write_json(tables.results_json(reports, tasks, lengths), out / "babilong.json")
  tables.heatmap(reports, tasks, lengths, out / "babilong.png")
  print(f"wrote {out / 'babilong.json'}, {out / 'babilong.txt'}, {out / 'babilong.png'}")
  return 0


def _safe(name: str) -> str:
  return "".join(c if c.isalnum() or c in "-_.@" else "_" for c in name)


def _with_flags(message: str) -> str:
  """`message` with the library option names it mentions replaced by this command's flags."""
  names = sorted(_FLAG_NAMES, key=len, reverse=True)
  return re.sub("|".join(re.escape(n) for n in names), lambda m: _FLAG_NAMES[m.group(0)], message)


def run_perplexity(args) -> int:
  from lm2_jax.data import corpora  # pylint: disable=g-import-not-at-top
  from lm2_jax.eval import perplexity, tables  # pylint: disable=g-import-not-at-top

  files = [f for arg in args.files for f in arg.split(",") if f.strip()]
  if args.max_unknown is not None and not 0 <= args.max_unknown <= 1:
    raise UsageError(f"--max-unknown {args.max_unknown}: give a share in [0, 1]")
  options = {} if args.max_unknown is None else {"max_unknown": args.max_unknown}
  if args.by_segment:
    return _perplexity_by_segment(args, files, options)
  given = [f for f, v in (("--max-segments", args.max_segments), ("--batch-size", args.batch_size),
                          ("--baseline", args.baseline)) if v is not None]
  if given:
    raise UsageError(f"{', '.join(given)}: only with --by-segment")
  models = _load_models(args)
  out = _out_dir(args, models)
  results = {}
  for model in models:
    try:
      result = perplexity.corpus_perplexity(
          model, files, text_field=args.text_field, txt_split=args.txt_split, on_error=args.on_error,
          max_documents=args.max_documents or None, progress=not args.no_progress, **options)
    except (corpora.CorpusError, FileNotFoundError, perplexity.UnknownTokensError) as e:
      raise UsageError(_with_flags(str(e))) from None
    results[model.name] = result
    skipped = f"; skipped {result['skipped']}" if result["skipped"] else ""
    print(f"{model.name}: perplexity {result['perplexity']:.4f} over {result['tokens']} tokens "
          f"({result['documents']} documents; {result['unknown_share']:.1%} of the tokens are the "
          f"tokenizer's unknown id{skipped})")
  tables.write_json(results, out / "perplexity.json")
  print(f"wrote {out / 'perplexity.json'}")
  return 0


def _perplexity_by_segment(args, files: list[str], options: dict) -> int:
  from lm2_jax.data import corpora, tokenizers  # pylint: disable=g-import-not-at-top
  from lm2_jax.eval import perplexity, tables  # pylint: disable=g-import-not-at-top

  max_segments = 16 if args.max_segments is None else args.max_segments
  batch_size = 8 if args.batch_size is None else args.batch_size
  if max_segments < 1 or batch_size < 1:
    raise UsageError(f"--max-segments {max_segments} and --batch-size {batch_size} must be >= 1")
  models = _load_models(args)
  if args.baseline is not None and args.baseline not in [m.name for m in models]:
    raise UsageError(f"--baseline {args.baseline}: not one of the models {[m.name for m in models]}")
  out = _out_dir(args, models)
  results = {}
  for model in models:
    try:
      results[model.name] = perplexity.segment_perplexity(
          model, files, max_segments=max_segments, batch_size=batch_size, text_field=args.text_field,
          txt_split=args.txt_split, on_error=args.on_error, max_documents=args.max_documents or None,
          progress=not args.no_progress, **options)
    except (corpora.CorpusError, FileNotFoundError, perplexity.UnknownTokensError) as e:
      raise UsageError(_with_flags(str(e))) from None
  byte = all(isinstance(m.tokenizer, tokenizers.ByteTokenizer) for m in models)
  table = perplexity.format_segment_table(results, args.baseline, unit="byte" if byte else "token")
  print(table)
  (out / "perplexity_by_segment.txt").write_text(table + "\n")
  tables.write_json({"files": files, "baseline": args.baseline, "models": results},
                    out / "perplexity_by_segment.json")
  print(f"wrote {out / 'perplexity_by_segment.json'} and .txt")
  return 0


def run_mc(args) -> int:
  from lm2_jax.eval import multiple_choice, tables  # pylint: disable=g-import-not-at-top

  models = _load_models(args)
  out = _out_dir(args, models)
  items = multiple_choice.read_jsonl(args.file)
  results = {}
  for model in models:
    result = multiple_choice.evaluate(model, items, normalize=args.normalize, progress=not args.no_progress)
    results[model.name] = result
    print(multiple_choice.format_result(model.name, result))
  tables.write_json(results, out / "multiple_choice.json")
  print(f"wrote {out / 'multiple_choice.json'}")
  return 0


def run_attention(args) -> int:
  from lm2_jax.data import babi, babilong  # pylint: disable=g-import-not-at-top
  from lm2_jax.eval import attention_maps, babilong_eval  # pylint: disable=g-import-not-at-top

  babi.check_task(args.task)
  babilong.check_length(args.length)
  (model,) = _load_models(args)
  if args.data:
    rows = babilong_eval.select(babilong_eval.read_jsonl(args.data), [args.task], [args.length])
  else:
    rows = babilong_eval.build_rows([args.task], [args.length], args.index + 1, args.seed, model.tokenizer)
  if args.index >= len(rows):
    raise UsageError(f"--index {args.index}: only {len(rows)} samples of {args.task} {args.length}")
  out = _out_dir(args, [model])
  paths = attention_maps.plot_sample(model, rows[args.index], args.block, out)
  print("wrote " + ", ".join(str(p) for p in paths))
  return 0


def run_recall(args) -> int:
  from lm2_jax.eval import recall_eval  # pylint: disable=g-import-not-at-top
  from lm2_jax.train import evaluate as eval_lib  # pylint: disable=g-import-not-at-top

  try:
    lengths = [int(x) for x in args.lengths.split(",") if x.strip()]
  except ValueError:
    raise UsageError(f"--lengths {args.lengths!r}: give comma-separated integers, e.g. 1,4,16") from None
  if not lengths or min(lengths) < 1 or args.rows < 1 or args.batch_size < 1:
    raise UsageError("--lengths, --rows and --batch-size must be positive")
  if args.pairs is not None and args.pairs < 1:
    raise UsageError("--pairs must be positive")
  if args.filler_density is not None and not 0.0 <= args.filler_density <= 1.0:
    raise UsageError(f"--filler-density {args.filler_density}: give a fraction in [0, 1]")
  results = {pathlib.Path(run).name: recall_eval.evaluate_lengths(run, lengths, args.rows, args.batch_size,
                                                                  args.pairs, args.filler_density)
             for run in args.run}
  table = recall_eval.length_table(results)
  print(table)
  out = pathlib.Path(args.out) if args.out else pathlib.Path(args.run[0]) / "eval"
  out.mkdir(parents=True, exist_ok=True)
  (out / "recall_lengths.md").write_text(table + "\n")
  eval_lib.write_json(out / "recall_lengths.json",
                      {name: {str(k): v for k, v in by_k.items()} for name, by_k in results.items()})
  print(f"wrote {out / 'recall_lengths.md'} and .json")
  return 0


def main(argv: list[str]) -> int:
  if not argv or argv[0] not in COMMANDS and argv[0] not in ("-h", "--help"):
    argv = ["babilong", *argv]
  args = _parser().parse_args(argv)
  from lm2_jax.eval.checkpoints import CheckpointError  # pylint: disable=g-import-not-at-top

  runners = {"babilong": run_babilong, "perplexity": run_perplexity, "mc": run_mc,
             "attention": run_attention, "recall": run_recall}
  try:
    return runners[args.command](args)
  except (UsageError, CheckpointError, FileNotFoundError, ValueError) as e:
    print(f"error: {e}", file=sys.stderr)
    return 2
