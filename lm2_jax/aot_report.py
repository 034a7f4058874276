"""The text `python -m lm2_jax.aot` prints from a report of `aot.compile_plan`."""

from __future__ import annotations

from lm2_jax.aot_chips import GIB


def _gib(x: float) -> str:
  if x != x:  # NaN: XLA did not say (a fusion's scratch overflowed VMEM)
    return "    n/a"
  for unit, size in (("GiB", GIB), ("MiB", 2**20), ("KiB", 2**10)):
    if abs(x) >= size or unit == "KiB":
      return f"{x / size:7.2f} {unit}"
  return ""


def format_report(r: dict) -> str:
  """The report as the lines the command prints."""
  m = r["memory"]
  lines = [
      f"slice {r['topology']} ({r['tpu_topology']}): {r['chips']} {r['chip']} chips, {r['processes']} "
      f"process(es); mesh {r['mesh']}",
      f"batch {r['batch']} rows x {r['seq_len']} tokens ({r['segments']} segments x "
      f"{r['segment_length']}); {r['rows_per_process']} rows per process; {r['rows_per_chip']} row(s) "
      f"per chip per micro-batch x {r['micro_batches']} micro-batch(es); remat {r['remat']}, "
      f"bptt_segments {r['bptt_segments']}; {r['params']:,} parameters",
      f"lowered in {r['lower_s']:.1f} s, compiled in {r['compile_s']:.1f} s",
      "memory per chip:",
  ]
  for key in ("arguments", "outputs", "aliased", "temporaries", "code"):
    if key in m:
      lines.append(f"  {key:<12} {_gib(m[key])}")
  verdict = "FITS" if r["fits"] else "DOES NOT FIT"
  percent = f" ({m['total'] / r['hbm_chip']:.0%})" if m["total"] == m["total"] else ""
  lines.append(f"  {'total':<12} {_gib(m['total'])} of {_gib(r['hbm_chip'])} HBM{percent}: {verdict}")
  if "oom" in r:
    lines.append(f"  XLA: {r['oom']}")
  share = r["memory_share"]
  if r["use_memory"]:
    lines.append(f"  memory module: state (params + AdamW) {_gib(share['state'])}, gradient "
                 f"{_gib(share['gradient'])}, carry {_gib(share['carry'])}, carries kept for the "
                 f"backward pass (estimate) {_gib(share['saved_carries'])}")
  loops = ", ".join(str(n) for n in r["loops"]) or "none"
  lines.append(f"FLOPs per step: model {r['model_flops']:.4g} (model_flops_per_token x tokens); matmuls "
               f"of the lowered program {r['matmul_flops']:.4g} ({r['matmul_flops'] / r['model_flops']:.3f}"
               f" x model; while-loop trip counts [{loops}], trip factor {r['trip_factor']:.1f})")
  if "oom" in r:
    return "\n".join(lines)
  if r["cost_flops_per_chip"]:
    lines.append(f"  compiled cost_analysis: {r['cost_flops_per_chip']:.4g} per chip with loop bodies "
                 f"counted once; x trip factor x {r['chips']} chips = {r['flops']:.4g} "
                 f"({r['flops'] / r['model_flops']:.3f} x model)")
  else:
    lines.append("  compiled cost_analysis: none for this target; the roofline uses the lowered "
                 "program's matmuls")
  traffic = (f"the optimised program's traffic: {_gib(r['traffic_once_per_chip'])} with loop bodies "
             f"once, {_gib(r['traffic_per_chip'])} a step")
  if r["cost_bytes_per_chip"]:
    lines.append(f"HBM bytes per chip per step: {_gib(r['bytes_per_chip'])} (compiled cost_analysis "
                 f"{_gib(r['cost_bytes_per_chip'])} with loop bodies once x {r['bytes_factor']:.1f}, the "
                 f"trip factor of {traffic})")
  else:
    lines.append(f"HBM bytes per chip per step: {_gib(r['bytes_per_chip'])} ({traffic})")
  lines.append("collectives per chip per step (optimised HLO; wire = bytes sent, ring algorithms):")
  for c in r["collectives"]:
    lines.append(f"  {c['kind']:<18} {c['count']:4d} ops, executed {c['executed']:7.0f} x, "
                 f"{_gib(c['bytes'])}, wire {_gib(c['wire_bytes'])}")
  t = r["times"]
  lines.append(f"roofline per step: compute {t['compute'] * 1e3:.1f} ms, HBM {t['hbm'] * 1e3:.1f} ms, "
               f"ICI {t['ici'] * 1e3:.1f} ms -> {r['step_s'] * 1e3:.1f} ms overlapped "
               f"({r['step_s_serial'] * 1e3:.1f} ms serial); MFU {r['mfu']:.1%} "
               f"({r['mfu_serial']:.1%} serial); {r['tokens_per_step'] / r['step_s']:,.0f} tokens/s")
  return "\n".join(lines)
