#!/usr/bin/env bash
# One command for a GPU machine (an H100): the GPU-only tests, optionally a tile-tuning sweep,
# then the throughput benchmark; everything written under OUTDIR and the benchmark summary
# printed last.
#
#   benchmarks/gpu_check.sh OUTDIR [throughput.py arguments]
#   TUNE=1 TESTS=0 benchmarks/gpu_check.sh OUTDIR      # tune the tiles, then benchmark
#
# Sized to finish within TOTAL_LIMIT_S seconds (default 450, i.e. one call of under 8 minutes
# with the install): the tests get at most TEST_LIMIT_S (default 200; pytest is interrupted
# after that and still reports what ran; TESTS=0 skips them), the tuning sweep at most
# TUNE_LIMIT_S (default 240, only with TUNE=1), and the benchmark what is left minus 45 s for
# its summary: it starts no case that would not end in time, runs the targets' cases first
# (host level, the target op shapes, the eager model steps, the other op shapes, the compiled
# image step, ...) and is interrupted 40 s after its limit, keeping what it measured.
# Without extra arguments the benchmark runs --quick in bf16 (every level, compiled model
# modes included); extra arguments replace those defaults (--out is always OUTDIR), e.g. for
# the full suite, given more time:
#   TOTAL_LIMIT_S=1800 benchmarks/gpu_check.sh OUT --dtype bf16,fp16
# The benchmark runs with DIFFATTN_AUTOTUNE=${BENCH_AUTOTUNE:-0}: tiles from the committed
# table kernels/tuned_configs.json where it has the GPU's architecture and the call class,
# else the first candidate (timing every candidate on first use would spend the budget
# compiling; BENCH_AUTOTUNE=1 allows it). With TUNE=1, tools/tune.py first sweeps the
# candidates and merges the winners into that table, which the benchmark then reads; the
# table and the sweep's CSV are copied to OUTDIR to be committed.
#
# Files in OUTDIR (at most 8): gpu_tests.log, bench.log (environment, install, tuning and
# benchmark log), throughput.csv, summary.md, speed_vs_seqlen.png and memory_vs_seqlen.png
# (the plots need matplotlib), and with TUNE=1 tune.csv and tuned_configs.json. Needs no
# network and installs nothing from an index: the package is installed editable with
# --no-deps; where pip cannot do that, it is imported through a symlinked package tree
# under /tmp.
# Exit status: 0 when the tests, the sweep and the benchmark all succeeded.
set -uo pipefail
export PYTHONUNBUFFERED=1
unset TRITON_INTERPRET

if [ $# -lt 1 ]; then
    echo "usage: $0 OUTDIR [throughput.py arguments]" >&2
    exit 2
fi
mkdir -p "$1" || exit 2
OUT=$(cd "$1" && pwd)
shift
ROOT=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
TOTAL_LIMIT_S=${TOTAL_LIMIT_S:-450}
TEST_LIMIT_S=${TEST_LIMIT_S:-200}
TUNE_LIMIT_S=${TUNE_LIMIT_S:-240}
TESTS=${TESTS:-1}
TUNE=${TUNE:-0}
BENCH_AUTOTUNE=${BENCH_AUTOTUNE:-0}
STARTED=$SECONDS
LOG="$OUT/bench.log"
: > "$LOG"

note() { echo "$*" | tee -a "$LOG"; }

# Python runs from an empty folder: from the repository root, the source tree's own diffattn/
# would be found first and shadow the installed package (whose kernels and models live in
# kernels/ and models/).
RUN_DIR=$(mktemp -d /tmp/diffattn_run.XXXXXX)
cd "$RUN_DIR" || exit 2

note "== gpu_check $(date -u +%Y-%m-%dT%H:%M:%SZ) for $ROOT"
{
    nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv 2>&1 \
        || echo "nvidia-smi not available"
    python -c "import sys, torch; print('python', sys.version.split()[0], '| torch', \
torch.__version__, '| cuda', torch.version.cuda, '| device', \
torch.cuda.get_device_name() if torch.cuda.is_available() else 'none')"
    python -c "import triton; print('triton', triton.__version__)"
    python -c "import timm; print('timm', timm.__version__)" 2>&1 | tail -n 1
} >> "$LOG" 2>&1

# kernels/ and models/ install as diffattn.kernels / diffattn.models (package_dir), so the
# source tree alone does not import: install it, or build the same layout from symlinks.
imports_from_root() {
    python - "$ROOT" >> "$LOG" 2>&1 <<'PY'
import os, sys
import diffattn, diffattn.kernels, diffattn.models
root = os.path.realpath(sys.argv[1])
ok = True
for module, folder in ((diffattn, "diffattn"), (diffattn.kernels, "kernels"),
                       (diffattn.models, "models")):
    where = os.path.dirname(os.path.realpath(module.__file__))
    print(module.__name__, "imported from", where)
    ok = ok and where == os.path.join(root, folder)
sys.exit(0 if ok else 1)
PY
}
note "== installing diffattn (pip install --no-deps --no-build-isolation -e $ROOT)"
python -m pip install --no-deps --no-build-isolation -e "$ROOT" -q >> "$LOG" 2>&1
if ! imports_from_root; then
    SHIM=$(mktemp -d /tmp/diffattn_path.XXXXXX)
    mkdir -p "$SHIM/diffattn"
    ln -s "$ROOT"/diffattn/*.py "$SHIM/diffattn/"
    ln -s "$ROOT/kernels" "$SHIM/diffattn/kernels"
    ln -s "$ROOT/models" "$SHIM/diffattn/models"
    export PYTHONPATH="$SHIM${PYTHONPATH:+:$PYTHONPATH}"
    note "pip could not install the package from $ROOT; importing it through $SHIM instead"
    if ! imports_from_root; then
        note "ERROR: diffattn cannot be imported from $ROOT (see $LOG)"
        exit 1
    fi
fi

test_rc=0
if [ "$TESTS" != "0" ]; then
    note "== tests/ops/test_gpu.py tests/ops/test_kvcache_gpu.py (limit ${TEST_LIMIT_S} s) -> $OUT/gpu_tests.log"
    start=$SECONDS
    # One tile configuration per kernel variant in the tests (no autotuning): compile time is
    # what limits this stage.
    DIFFATTN_AUTOTUNE=0 timeout -s INT -k 20 "$TEST_LIMIT_S" python -m pytest \
        "$ROOT/tests/ops/test_gpu.py" "$ROOT/tests/ops/test_kvcache_gpu.py" \
        -q -rA -p no:cacheprovider --rootdir "$ROOT" \
        --durations=10 > "$OUT/gpu_tests.log" 2>&1
    test_rc=$?
    note "tests: exit status $test_rc after $((SECONDS - start)) s; $(tail -n 1 "$OUT/gpu_tests.log")"
else
    note "== tests skipped (TESTS=0)"
fi

tune_rc=0
if [ "$TUNE" != "0" ]; then
    note "== tools/tune.py --time-limit-s $TUNE_LIMIT_S -> $ROOT/kernels/tuned_configs.json"
    start=$SECONDS
    timeout -s INT -k 20 "$((TUNE_LIMIT_S + 60))" python "$ROOT/tools/tune.py" \
        --time-limit-s "$TUNE_LIMIT_S" --csv "$OUT/tune.csv" >> "$LOG" 2>&1
    tune_rc=$?
    cp "$ROOT/kernels/tuned_configs.json" "$OUT/tuned_configs.json"
    note "tuning: exit status $tune_rc after $((SECONDS - start)) s; table copied to $OUT"
fi

BENCH_LIMIT_S=$((TOTAL_LIMIT_S - (SECONDS - STARTED) - 45))
if [ "$BENCH_LIMIT_S" -lt 60 ]; then
    BENCH_LIMIT_S=60
fi
if [ $# -gt 0 ]; then
    bench_args=("$@")
else
    bench_args=(--quick --dtype bf16 --time-limit-s "$BENCH_LIMIT_S")
fi
note "== benchmarks/throughput.py ${bench_args[*]} --out $OUT (DIFFATTN_AUTOTUNE=$BENCH_AUTOTUNE, interrupted after $((BENCH_LIMIT_S + 40)) s)"
start=$SECONDS
DIFFATTN_AUTOTUNE=$BENCH_AUTOTUNE timeout -s INT -k 20 "$((BENCH_LIMIT_S + 40))" \
    python "$ROOT/benchmarks/throughput.py" "${bench_args[@]}" --out "$OUT" >> "$LOG" 2>&1
bench_rc=$?
note "benchmark: exit status $bench_rc after $((SECONDS - start)) s; whole check $((SECONDS - STARTED)) s"

echo
if [ "$TESTS" != "0" ]; then
    grep -E "^(FAILED|ERROR)" "$OUT/gpu_tests.log" | head -n 20
    echo "gpu tests: $(tail -n 1 "$OUT/gpu_tests.log")"
    echo
fi
if [ -f "$OUT/summary.md" ]; then
    cat "$OUT/summary.md"
else
    echo "no summary.md: the benchmark did not finish; the end of $LOG:"
    tail -n 40 "$LOG"
fi
[ "$test_rc" -eq 0 ] && [ "$tune_rc" -eq 0 ] && [ "$bench_rc" -eq 0 ]
