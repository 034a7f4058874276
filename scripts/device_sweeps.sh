#!/usr/bin/env bash
# Runs sweeps (python -m lm2_jax.sweep) on a lent GPU machine, where jax/flax/optax/orbax come from the
# machine's image and grain's wheels travel in .whl/. Usage: bash scripts/device_sweeps.sh JOBS SECONDS
# SWEEP... [-- overrides]. Writes $OUT/tables.md and $OUT/runs.tgz (final_eval.json, metrics.jsonl, logs).
set -u
jobs=$1 limit=$2; shift 2
sweeps=(); while [ $# -gt 0 ] && [ "$1" != "--" ]; do sweeps+=("$1"); shift; done; [ "${1:-}" = "--" ] && shift
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl \
  && export PYTHONPATH=/tmp/site:$PWD || exit 1
export XLA_PYTHON_CLIENT_PREALLOCATE=false PYTHONUNBUFFERED=1
python3 -c "import jax, flax, optax, grain; print('jax', jax.__version__, 'flax', flax.__version__, jax.devices())"
nvidia-smi --query-gpu=name,memory.total --format=csv,noheader
common="checkpoint.enabled=false logging.progress=false logging.tensorboard=false logging.peak_flops=1e12"
t0=$(date +%s)
for spec in "${sweeps[@]}"; do
  s=${spec%%:*}; cells=(); [ "$s" != "$spec" ] && cells=(--cells "${spec#*:}")
  timeout "$limit" python3 -m lm2_jax.sweep "configs/sweep/$s.yaml" --jobs "$jobs" "${cells[@]}" $common "$@" \
    > "/tmp/$s.out" 2>&1 &
done
wait
echo "sweeps took $(( $(date +%s) - t0 )) s"
for spec in "${sweeps[@]}"; do
  s=${spec%%:*}
  echo "## $s"; grep -E "^\[|runs," "/tmp/$s.out"; python3 -m lm2_jax.sweep "configs/sweep/$s.yaml" --table $common "$@" | tail -n +2
done | tee "$OUT/tables.md"
tar czf "$OUT/runs.tgz" $(find runs -name final_eval.json -o -name metrics.jsonl -o -name sweep.log) 2>/dev/null
for f in runs/*/*/sweep.log; do echo "== $f"; tail -n 3 "$f"; done | tail -n 80
