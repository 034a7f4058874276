#!/usr/bin/env bash
# One call's worth of checks on a lent GPU machine (issue 15's bf16 throughput, issue 12's capacity runs,
# issue 13's Fig. 5 sweep), run as: bash scripts/device_checks.sh SECONDS. grain's wheels travel in .whl/.
#   GPU, one after another: bench/bench_train.py (bf16 MFU of small.yaml, and of lm2-300m.yaml with the
#   delta and the slot-routed write), bench/bench_vs_torch.py on CUDA (bf16), then the capacity sweep's
#   delta cells;
#   CPU cores at the same time (JAX_PLATFORMS=cpu, cores 0-13): the Fig. 5 sweep, 9 runs at once.
# Writes $OUT/gpu.log, $OUT/tables.md and $OUT/runs.tgz (final_eval.json, metrics.jsonl, sweep.log).
set -u
limit=$1
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl \
  && export PYTHONPATH=/tmp/site:$PWD || exit 1
export XLA_PYTHON_CLIENT_PREALLOCATE=false PYTHONUNBUFFERED=1
common="checkpoint.enabled=false logging.progress=false logging.tensorboard=false"
nvidia-smi --query-gpu=name,memory.total --format=csv,noheader; nproc
t0=$(date +%s)
pin=""; command -v taskset > /dev/null && pin="taskset -c 0-13"
(JAX_PLATFORMS=cpu timeout "$limit" $pin python3 -m lm2_jax.sweep configs/sweep/fig5-memory-layers.yaml \
   --jobs 9 $common logging.peak_flops=1e11 > /tmp/fig5.out 2>&1) &
(
  b="python3 bench/bench_train.py --steps 10 --peak-tflops 989"
  timeout 120 $b --batch 32 dtype=bfloat16
  timeout 150 $b --model configs/model/lm2-300m.yaml --batch 8 --segments 4
  timeout 150 $b --model configs/model/lm2-300m.yaml --batch 8 --segments 4 memory_write=slots \
    memory_init=identity memory_flow=chained memory_heads=16
  timeout 120 python3 bench/bench_vs_torch.py --device cuda --dtype bfloat16 --rounds 3 --steps 5
  echo "gpu benches done at $(( $(date +%s) - t0 )) s"
  timeout $(( limit - $(date +%s) + t0 )) python3 -m lm2_jax.sweep configs/sweep/memory-recall-capacity.yaml \
    --jobs 2 --cells delta-m32-pairs12,delta-m64-pairs24 $common logging.peak_flops=1e12 > /tmp/capacity.out 2>&1
) 2>&1 | grep -v "^W0\|^I0\|^E0" | tee "$OUT/gpu.log"
wait
echo "all done at $(( $(date +%s) - t0 )) s"
for s in fig5-memory-layers memory-recall-capacity; do
  echo "## $s"; grep -hE "^\[|runs," /tmp/fig5.out /tmp/capacity.out | grep -v "^$"
  python3 -m lm2_jax.sweep "configs/sweep/$s.yaml" --table $common | tail -n +2
done | tee "$OUT/tables.md"
tar czf "$OUT/runs.tgz" $(find runs -name final_eval.json -o -name metrics.jsonl -o -name sweep.log) 2>/dev/null
for f in runs/*/*/sweep.log; do echo "== $f"; tail -n 2 "$f"; done | tail -n 60
