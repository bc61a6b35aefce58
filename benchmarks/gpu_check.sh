#!/usr/bin/env bash
# One command for a GPU machine (an H100): the GPU-only tests, then the throughput benchmark,
# everything written under OUTDIR and the benchmark summary printed last.
#
#   benchmarks/gpu_check.sh OUTDIR [throughput.py arguments]
#
# Sized to finish in under 8 minutes: the tests get TEST_LIMIT_S seconds (default 240; pytest
# is interrupted after that and still reports what ran), the benchmark starts no new case
# after BENCH_LIMIT_S seconds (default 180; the issue's target measurements run first) and is
# interrupted at BENCH_LIMIT_S + 50. Without extra arguments the benchmark runs its --quick
# suite in bf16 then fp16 with the model level at batch 256; extra arguments replace those
# defaults (--out is always OUTDIR), e.g. for the full suite on a longer lease:
#   BENCH_LIMIT_S=1500 benchmarks/gpu_check.sh OUT --dtype bf16,fp16 --time-limit-s 1500
#
# Files in OUTDIR (at most 6): gpu_tests.log, bench.log (environment, install, benchmark
# log), throughput.csv, summary.md, speed_vs_seqlen.png and memory_vs_seqlen.png (the plots
# need matplotlib). Needs no network and installs nothing from an index: the package is
# installed editable with --no-deps; where pip cannot do that, it is imported through a
# symlinked package tree under /tmp.
# Exit status: 0 when the tests and the benchmark both succeeded.
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
TEST_LIMIT_S=${TEST_LIMIT_S:-240}
BENCH_LIMIT_S=${BENCH_LIMIT_S:-180}
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

note "== tests/test_gpu.py (limit ${TEST_LIMIT_S} s) -> $OUT/gpu_tests.log"
start=$SECONDS
# One tile configuration per kernel variant in the tests (no autotuning): compile time is
# what limits this stage; the benchmark below autotunes.
DIFFATTN_AUTOTUNE=0 timeout -s INT -k 20 "$TEST_LIMIT_S" python -m pytest "$ROOT/tests/test_gpu.py" -q -rA \
    -p no:cacheprovider --rootdir "$ROOT" --durations=10 > "$OUT/gpu_tests.log" 2>&1
test_rc=$?
note "tests: exit status $test_rc after $((SECONDS - start)) s; $(tail -n 1 "$OUT/gpu_tests.log")"

if [ $# -gt 0 ]; then
    bench_args=("$@")
else
    bench_args=(--quick --dtype bf16,fp16 --model-batch 256 --time-limit-s "$BENCH_LIMIT_S")
fi
note "== benchmarks/throughput.py ${bench_args[*]} --out $OUT"
start=$SECONDS
timeout -s INT -k 20 "$((BENCH_LIMIT_S + 50))" python "$ROOT/benchmarks/throughput.py" \
    "${bench_args[@]}" --out "$OUT" >> "$LOG" 2>&1
bench_rc=$?
note "benchmark: exit status $bench_rc after $((SECONDS - start)) s"

echo
grep -E "^(FAILED|ERROR)" "$OUT/gpu_tests.log" | head -n 20
echo "gpu tests: $(tail -n 1 "$OUT/gpu_tests.log")"
echo
if [ -f "$OUT/summary.md" ]; then
    cat "$OUT/summary.md"
else
    echo "no summary.md: the benchmark did not finish; the end of $LOG:"
    tail -n 40 "$LOG"
fi
[ "$test_rc" -eq 0 ] && [ "$bench_rc" -eq 0 ]
