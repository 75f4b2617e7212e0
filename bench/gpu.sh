#!/usr/bin/env bash
# The one script a GPU session runs: versions and nvidia-smi, the tests that exercise CUDA, then the GPU preset of
# `btfast bench` (base and large, HF eager fp32/bf16, torch.compile max-autotune, btfast fp32/bf16, and all pairs:
# 64 images x 64 texts at base, pair by pair against btfast's encode-once dedup). Installs
# nothing; about 8 minutes at most on an H100 (tests <= TEST_TIMEOUT, benchmark <= BENCH_TIMEOUT; the benchmark
# has its own time budget and, if stopped, still writes what it measured).
#
# From the repo root on the device machine (the tree is copied without .git: pass the commit in):
#     BTFAST_COMMIT=<output of `git rev-parse HEAD` here> bash bench/gpu.sh
# Writes under $OUT (6 files, 1 folder deep):
#     env.txt       date, commit, Python / torch / triton / transformers versions, nvidia-smi, CPU, memory
#     pytest.log    pytest on CUDA of the tests that exercise it ($CUDA_TESTS: kernels, the Triton engine, the
#                   kernel race, runtime, half precision, bench/; benchmarks run once, untimed); the rest is
#                   device-independent and runs on the CPU machine
#     bench.log     the benchmark's progress lines and summary
#     results/<date>-<gpu>-gpu.{json,md,png}    every figure; copy these into bench/results/ and commit them,
#                   and put the .md's pairs/s table (with its date and device) in README.
# Knobs (environment): PYTHON (a python with torch + CUDA; default: the first of python3 / python that has it),
# TEST_TIMEOUT (s, default 180), BENCH_TIMEOUT (s, default 300; the benchmark's own budget is BENCH_BUDGET, default
# 260 s, so it ends and writes before the timeout), BENCH_ARGS (more `btfast bench` options,
# e.g. "--model base" or "--budget 200"), SKIP_TESTS=1 (benchmark only), KERNEL_BENCH=1 (also run
# bench/kernels_bench.py: +2 files, results/kernels.json and kernels.log; KERNEL_TIMEOUT, default 90 s).
set -uo pipefail
cd "$(dirname "$0")/.."
ROOT=$PWD
OUT=${OUT:?"set OUT to the folder that comes back"}
mkdir -p "$OUT/results"
TEST_TIMEOUT=${TEST_TIMEOUT:-180}
BENCH_TIMEOUT=${BENCH_TIMEOUT:-300}
T0=$(date +%s)
say() { echo "[gpu.sh +$(( $(date +%s) - T0 ))s] $*"; }

# -- a python with torch (never the CPU-only .venv of the development machine) --------------------------------
PY=""
for cand in ${PYTHON:-} python3 python; do
  if command -v "$cand" >/dev/null 2>&1 && "$cand" -c "import torch" >/dev/null 2>&1; then PY=$(command -v "$cand"); break; fi
done
if [ -z "$PY" ]; then say "no python with torch found (tried: ${PYTHON:-} python3 python)"; exit 1; fi

# -- btfast from this tree, without installing it: kernels/ is the package btfast.kernels (setup.py maps it) --
export PYTHONPATH="$ROOT${PYTHONPATH:+:$PYTHONPATH}"
if ! "$PY" -c "import btfast.kernels" >/dev/null 2>&1; then
  SHIM=$(mktemp -d)
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
unset TRITON_INTERPRET  # the kernels run for real on the GPU

# -- environment ------------------------------------------------------------------------------------------------
{
  echo "date: $(date -u +%Y-%m-%dT%H:%M:%SZ)"
  echo "commit: ${BTFAST_COMMIT:-$(git rev-parse HEAD 2>/dev/null || echo unknown)}"
  echo "python: $PY"
  "$PY" - <<'EOF'
import importlib, platform
print("python", platform.python_version(), platform.platform())
for name in ("torch", "triton", "transformers", "btfast", "pytest", "pytest_benchmark", "matplotlib", "tqdm", "numpy"):
    try:
        print(f"{name:18s}", getattr(importlib.import_module(name), "__version__", "?"))
    except Exception as e:
        print(f"{name:18s} MISSING ({type(e).__name__}: {e})")
import torch
print("cuda available", torch.cuda.is_available(), "cuda", torch.version.cuda,
      "device", torch.cuda.get_device_name() if torch.cuda.is_available() else None)
try:
    import btfast.kernels  # noqa: F401
    print("btfast.kernels importable")
except Exception as e:
    print("btfast.kernels NOT importable:", type(e).__name__, e)
EOF
  echo "nproc: $(nproc)"; free -g 2>/dev/null | head -2
  nvidia-smi 2>&1 || echo "nvidia-smi failed"
} > "$OUT/env.txt" 2>&1
cat "$OUT/env.txt"

# -- tests on CUDA ----------------------------------------------------------------------------------------------
# only those that exercise CUDA (the whole suite does not fit TEST_TIMEOUT), end to end first (if the timeout cuts
# the run, the kernels' own real-shape tests, slow to autotune, are what is lost); the glob is expanded here
CUDA_TESTS=()
for t in tests/test_engine_triton.py tests/test_runtime.py tests/test_kernel_race.py tests/test_half_precision.py tests/test_kernels_*.py bench; do
  [ -e "$t" ] && CUDA_TESTS+=("$t")
done
if [ "${SKIP_TESTS:-0}" != "1" ] && [ ${#CUDA_TESTS[@]} -gt 0 ]; then
  ADDOPTS=()
  if ! "$PY" -c "import pytest_benchmark" >/dev/null 2>&1; then
    # pytest.ini passes --benchmark-disable, which pytest rejects without the plugin; bench/ suites then skip
    ADDOPTS=(-o "addopts=-p no:cacheprovider")
    echo "pytest-benchmark missing: running without pytest.ini's addopts" >> "$OUT/pytest.log"
  fi
  say "pytest of the CUDA tests (at most ${TEST_TIMEOUT}s): ${CUDA_TESTS[*]} ..."
  timeout -k 10 "$TEST_TIMEOUT" "$PY" -m pytest -q -rs --durations=15 ${ADDOPTS[@]+"${ADDOPTS[@]}"} \
    "${CUDA_TESTS[@]}" >> "$OUT/pytest.log" 2>&1
  rc=$?
  say "pytest exit status $rc$([ $rc -eq 124 ] && echo ' (timed out)')"
  tail -n 40 "$OUT/pytest.log"
fi

# -- the GPU preset of the benchmark ----------------------------------------------------------------------------
say "btfast bench --preset gpu (at most ${BENCH_TIMEOUT}s) ..."
# shellcheck disable=SC2086  # BENCH_ARGS is a list of options
# (stdout is a file: progress comes as one line per cell, no bar)
timeout -k 15 "$BENCH_TIMEOUT" "$PY" -m btfast.cli bench --preset gpu --budget "${BENCH_BUDGET:-260}" --out "$OUT/results" \
  ${BENCH_ARGS:-} \
  > "$OUT/bench.log" 2>&1
rc=$?
say "bench exit status $rc$([ $rc -eq 124 ] && echo ' (timed out)')"
tail -n 60 "$OUT/bench.log"
for md in "$OUT"/results/*.md; do [ -f "$md" ] && sed -n '1,/^## All figures/p' "$md"; done

# -- optional: the kernels' micro-benchmarks (bench/kernels_bench.py), one more JSON ----------------------------
if [ "${KERNEL_BENCH:-0}" = "1" ] && [ -f bench/kernels_bench.py ]; then
  say "kernels_bench.py (at most ${KERNEL_TIMEOUT:-90}s) ..."
  timeout -k 10 "${KERNEL_TIMEOUT:-90}" "$PY" bench/kernels_bench.py --out "$OUT/results/kernels.json" \
    > "$OUT/kernels.log" 2>&1
  say "kernels_bench exit status $?"; tail -n 30 "$OUT/kernels.log"
fi
ls -la "$OUT" "$OUT/results"
say "done"
