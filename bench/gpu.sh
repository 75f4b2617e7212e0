#!/usr/bin/env bash
# The device script. A task gets 15 minutes of device time in all (machine start 1-2 min, every call, idle time);
# one call may run 600 s. Run from the repo root on the device machine (the tree comes without .git: pass the
# commit in). Installs nothing.
#
#   BTFAST_COMMIT=$(git rev-parse HEAD) bash bench/gpu.sh           first call: the headline (planned device time: 290 s)
#   BTFAST_COMMIT=$(git rev-parse HEAD) bash bench/gpu.sh sweep     second call, only if time is left (<= 420 s)
#   bash bench/gpu.sh tests                                         the CUDA tests (<= 300 s)
#
# headline: `btfast bench --preset headline`: smoke checks (Triton kernels against torch at the model's shapes,
#   btfast against HF eager in bf16, a CUDA-graph replay against an eager call; a failure is reported and the
#   benchmark goes on), then base, bf16, text 40, batch 128 and 1: hf-eager, hf-compile (max-autotune, batch 128),
#   btfast default / kernels=False / kernels="all", timed rounds interleaved; build time apart; MFU against the
#   published bf16 peak and a GEMM peak measured in the run; error against hf-eager-fp32; a profiler split of
#   btfast at batch 128 and the kernel race's verdicts. Stopped at BENCH_TIMEOUT (default 270 s), it still writes
#   what it measured (SIGTERM), so a machine start, this call and a rerun fit one lease.
# sweep: `--preset gpu` (base and large, fp32 and bf16, the 16/64/512 sweep, all pairs) and hf-compile at batch 1.
#
# Writes under $OUT (headline: 5 files): env.txt, bench.log, <date>-<gpu>-<preset>.{json,md,png}. Copy the JSON,
# Markdown and PNG into bench/results/ and commit them; the .md's table goes to README.
# Triton and inductor caches live in .cache/ of this tree (git-ignored): a rerun on a warm machine reuses them.
# Knobs: PYTHON (a python with torch; default: the first of python3 / python that has it), BENCH_TIMEOUT (s),
# BENCH_ARGS (more `btfast bench` options; CI's CPU dry run: "--model tiny --device cpu --compile-backend eager").
set -uo pipefail
cd "$(dirname "$0")/.."
ROOT=$PWD
OUT=${OUT:?"set OUT to the folder that comes back"}
MODE=${1:-headline}
mkdir -p "$OUT" "$ROOT/.cache"
T0=$(date +%s)
say() { echo "[gpu.sh +$(( $(date +%s) - T0 ))s] $*"; }

PY=""
for cand in ${PYTHON:-} python3 python; do
  if command -v "$cand" >/dev/null 2>&1 && "$cand" -c "import torch" >/dev/null 2>&1; then PY=$(command -v "$cand"); break; fi
done
[ -n "$PY" ] || { say "no python with torch found (tried: ${PYTHON:-} python3 python)"; exit 1; }

# btfast from this tree, uninstalled: kernels/ is the package btfast.kernels (as setup.py maps it)
export PYTHONPATH="$ROOT${PYTHONPATH:+:$PYTHONPATH}"
if ! "$PY" -c "import btfast.kernels" >/dev/null 2>&1; then
  SHIM="$ROOT/.cache/shim"; mkdir -p "$SHIM"
  cat > "$SHIM/sitecustomize.py" <<EOF
# written by bench/gpu.sh: maps btfast.kernels to $ROOT/kernels, as the editable install does
import importlib.util, sys

class _BtfastKernels:
    @classmethod
    def find_spec(cls, name, path=None, target=None):
        if name != "btfast.kernels":
            return None
        return importlib.util.spec_from_file_location(
            name, "$ROOT/kernels/__init__.py", submodule_search_locations=["$ROOT/kernels"])

sys.meta_path.insert(0, _BtfastKernels)
EOF
  export PYTHONPATH="$PYTHONPATH:$SHIM"
fi
unset TRITON_INTERPRET  # the kernels run for real on a GPU
export TRITON_CACHE_DIR="$ROOT/.cache/triton" TORCHINDUCTOR_CACHE_DIR="$ROOT/.cache/inductor"

{
  echo "date: $(date -u +%Y-%m-%dT%H:%M:%SZ) mode: $MODE commit: ${BTFAST_COMMIT:-unknown} python: $PY"
  "$PY" -c "
import importlib, torch
for m in ('torch', 'triton', 'transformers', 'matplotlib'):
    try:
        print(m, importlib.import_module(m).__version__)
    except Exception as e:
        print(m, 'MISSING', type(e).__name__, e)
print('cuda', torch.version.cuda, torch.cuda.get_device_name() if torch.cuda.is_available() else 'no CUDA device')"
  echo "nproc: $(nproc)"
  nvidia-smi --query-gpu=name,memory.total,clocks.max.sm,power.limit --format=csv 2>&1 || true
} > "$OUT/env.txt" 2>&1
cat "$OUT/env.txt"

bench() {  # bench TIMEOUT ARGS...: btfast bench with its log in $OUT/bench.log; SIGTERM at TIMEOUT writes what it has
  local limit=$1; shift
  say "btfast bench $* (at most ${limit}s) ..."
  # shellcheck disable=SC2086  # BENCH_ARGS is a list of options
  BTFAST_COMMIT=${BTFAST_COMMIT:-} timeout -k 20 "$limit" "$PY" -m btfast.cli bench "$@" --out "$OUT" ${BENCH_ARGS:-} \
    >> "$OUT/bench.log" 2>&1
  local rc=$?
  say "bench exit status $rc$([ $rc -eq 124 ] && echo ' (timed out: partial results written)')"
  tail -n 40 "$OUT/bench.log"
  return $rc
}

case "$MODE" in
  headline) bench "${BENCH_TIMEOUT:-270}" --preset headline ;;
  sweep)
    bench "${BENCH_TIMEOUT:-300}" --preset gpu --budget 260
    bench 120 --systems hf-eager-bf16,hf-compile-bf16 --batch-sizes 1 ;;  # hf-compile at batch 1: <date>-<gpu>-default.*
  tests)
    timeout -k 10 "${BENCH_TIMEOUT:-280}" "$PY" -m pytest -q -rs -o "addopts=-p no:cacheprovider" \
      tests/test_engine_triton.py tests/test_runtime.py tests/test_kernel_race.py tests/test_half_precision.py \
      tests/test_kernels_*.py > "$OUT/pytest.log" 2>&1
    say "pytest exit status $?"; tail -n 30 "$OUT/pytest.log" ;;
  *) say "unknown mode $MODE (headline, sweep or tests)"; exit 2 ;;
esac
for md in "$OUT"/*.md; do [ -f "$md" ] && sed -n '1,/^## All figures/p' "$md"; done
say "done"
