#!/usr/bin/env bash
# Full-size `pi05-export bench` for the PyTorch backends on one GPU, inside one time budget.
#
#   OUT=out/bench DEADLINE=560 benchmarks/h200_bench.sh
#
# Writes $OUT/results.jsonl (one JSON line per backend run), $OUT/bench.log (stderr of every run)
# and $OUT/gpu.csv; prints each run's table. Runs from the repository root without installing the
# package (PYTHONPATH). A backend is skipped when less than 30 s of DEADLINE (seconds) is left.
set -u
OUT=${OUT:-out/bench}
DEADLINE=${DEADLINE:-560}
STEPS=${STEPS:-1,2,3,5,10}
ITERS=${ITERS:-30}
WARMUP=${WARMUP:-5}
BACKENDS=${BACKENDS:-"torch torch-cudagraph torch-compile torch-compile-cudagraph torch"}
MODEL=${MODEL:---preset pi05 --random-init}
EXTRA=${EXTRA:-}  # e.g. "--device cpu --dtype fp32" for a dry run with MODEL="--preset tiny --random-init"
mkdir -p "$OUT"
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}" PYTHONUNBUFFERED=1

nvidia-smi --query-gpu=name,driver_version,clocks.sm,clocks.mem,temperature.gpu,power.draw,memory.used \
  --format=csv >"$OUT/gpu.csv" 2>&1
cat "$OUT/gpu.csv"
python3 -c "import sys, torch; print('python', sys.version.split()[0], 'torch', torch.__version__, 'cuda', torch.version.cuda)"

for backend in $BACKENDS; do
  left=$((DEADLINE - SECONDS))
  if [ "$left" -lt 30 ]; then echo "== skip $backend: ${left}s left"; continue; fi
  echo "== $backend (${left}s left)" | tee -a "$OUT/bench.log"
  # shellcheck disable=SC2086
  timeout "$left" python3 -c "from pi05_export.cli import main; main()" bench $MODEL --backend "$backend" \
    --steps "$STEPS" --iters "$ITERS" --warmup "$WARMUP" $EXTRA >"/tmp/bench-$backend.out" 2>>"$OUT/bench.log"
  rc=$?
  grep -v "^INFO" "$OUT/bench.log" | tail -n 22
  if [ $rc -eq 0 ]; then tail -n 1 "/tmp/bench-$backend.out" >>"$OUT/results.jsonl"; fi
  echo "== $backend rc=$rc, ${SECONDS}s elapsed"
done
nvidia-smi --query-gpu=clocks.sm,temperature.gpu,power.draw --format=csv,noheader >>"$OUT/gpu.csv" 2>&1
