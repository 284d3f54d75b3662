#!/usr/bin/env bash
# The prepared GPU check, one command on a machine with one CUDA GPU, from the repository root:
#
#   PYTHONPATH=. bash benchmarks/gpu_check.sh OUT_DIR
#
# 1. the `gpu`-marked tests but the huge ones   -> OUT_DIR/gpu_tests.log
# 2. compute-sanitizer memcheck of the fused ops at small awkward shapes (benchmarks/sanitize_ops.py)
#                                               -> OUT_DIR/sanitizer.log
# 3. the GPU report (python -m benchmarks.gpu_report) -> OUT_DIR/report.{json,md}, ratios.png,
#                                                  report.log, workers.log
# 4. with the time left, the huge gpu tests (tests/test_large_offsets.py: tensors past 2**31
#    elements, about 50 GB each) -> OUT_DIR/large_offsets.log
# Every stage has a timeout and runs whatever happened before it; a summary comes last. A small
# kernel whose gpu tests fail runs its reference in stages 2-3 (LIQUIDDIFF_KERNELS), said in the summary.
# Budget, seconds (environment overrides): GPU_CHECK_BUDGET=540 for everything, GPU_TESTS_TIMEOUT=180,
# SANITIZER_TIMEOUT=100, REPORT_BUDGET_MAX=330 (the report gets what is left, at most this; stage 4
# what is left after it, if 45 s or more). GPU_CHECK_STAGES=1234 picks the stages to run.
# Exit status: 0 when every stage passed, else 1 (see the summary). Without a GPU it says so and
# exits 2, unless GPU_CHECK_ALLOW_CPU=1 (a dry run of this script: tests skip, no sanitizer,
# sanitize_ops and a --quick report under the Triton interpreter).
set -o pipefail
cd "$(dirname "$0")/.." || exit 2
OUT="${1:-${OUT:-gpu_check_out}}"
mkdir -p "$OUT" || exit 2
OUT="$(cd "$OUT" && pwd)"
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"
export PYTHONUNBUFFERED=1
PY="${PYTHON:-$(command -v python3 || command -v python)}"
START=$(date +%s)
BUDGET=${GPU_CHECK_BUDGET:-540}
T_TESTS=${GPU_TESTS_TIMEOUT:-180}
T_SAN=${SANITIZER_TIMEOUT:-100}
REPORT_MAX=${REPORT_BUDGET_MAX:-330}
STAGES=${GPU_CHECK_STAGES:-1234}

elapsed() { echo $(( $(date +%s) - START )); }
say() { echo "[gpu_check $(elapsed)s] $*"; }
SUMMARY=()
note() { SUMMARY+=("$*"); }
FAILED=0

say "python $PY; out $OUT; budget ${BUDGET}s"
GPU_NAME=$("$PY" -c 'import torch; print("GPU=" + (torch.cuda.get_device_name(0) if torch.cuda.is_available() else "none"))' 2>/dev/null | sed -n 's/^GPU=//p' | tail -n 1)
[ -n "$GPU_NAME" ] || GPU_NAME="none (torch did not import with $PY)"
"$PY" -c 'import torch, triton; print("torch", torch.__version__, "cuda", torch.version.cuda, "triton", triton.__version__)' 2>&1 | tail -n 1
if command -v nvidia-smi >/dev/null 2>&1; then
    nvidia-smi --query-gpu=name,driver_version,memory.total,clocks.sm,clocks.max.sm --format=csv,noheader 2>&1 | head -n 2
fi
HAVE_GPU=1
if [[ "$GPU_NAME" == none* ]]; then
    HAVE_GPU=0
    say "NO CUDA GPU visible to torch ($GPU_NAME): this script is meant for a GPU machine"
    if [ "${GPU_CHECK_ALLOW_CPU:-0}" != "1" ]; then
        echo "gpu_check: no GPU; set GPU_CHECK_ALLOW_CPU=1 for a dry run on the CPU"
        exit 2
    fi
    say "GPU_CHECK_ALLOW_CPU=1: dry run on the CPU"
else
    say "GPU: $GPU_NAME"
fi

# ---------------------------------------------------------------- test tools
# Test tools the image may lack, carried as wheels (benchmarks/device_wheels.sh; carry ".whl"):
# each one it cannot import, into a folder on PYTHONPATH (which comes before site-packages: a
# wheel of a package the image has would shadow it, so those are left out).
if compgen -G ".whl/*.whl" >/dev/null; then
    WANT=()
    for pair in pytest:pytest pluggy:pluggy iniconfig:iniconfig packaging:packaging pygments:pygments \
                xdist:pytest_xdist execnet:execnet; do
        "$PY" -c "import ${pair%%:*}" 2>/dev/null || WANT+=(.whl/"${pair##*:}"-*.whl)
    done
    if [ ${#WANT[@]} -gt 0 ]; then
        SITE="${TMPDIR:-/tmp}/liquiddiff_site"
        if "$PY" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target "$SITE" "${WANT[@]}"; then
            export PYTHONPATH="$PYTHONPATH:$SITE"
            say "installed from .whl into $SITE: ${WANT[*]}"
        else
            say "pip could not install ${WANT[*]}: the tests run with what the image has"
        fi
    fi
fi

# ---------------------------------------------------------------- 1. gpu-marked tests
stage_1() {
    # About 300 distinct Triton compiles, one core each, in the dozen files with gpu tests: a pytest
    # process per two cores, at most eight, where pytest-xdist is there (a file per process keeps its
    # kernels' compiles together; the GPU machines have 16 cores). --benchmark-disable is the
    # ini's only need of pytest-benchmark, which the tests do not use: addopts is set here instead.
    # The huge tests wait for stage 4: run here, their compiles and 50 GB tensors would share this
    # stage's timeout (a timeout loses the failure list) and the GPU's memory with the other files.
    HUGE=tests/test_large_offsets.py
    PYTEST_ARGS=(-m gpu -q -p no:cacheprovider -o "addopts=" -rfEs --tb=short --ignore="$HUGE")
    if [ "$HAVE_GPU" = 1 ] && "$PY" -c 'import xdist' 2>/dev/null; then
        WORKERS=$(( $(nproc 2>/dev/null || echo 8) / 2 )); [ "$WORKERS" -gt 8 ] && WORKERS=8; [ "$WORKERS" -lt 1 ] && WORKERS=1
        PYTEST_ARGS+=(-n "${GPU_TESTS_WORKERS:-$WORKERS}" --dist loadfile)
    fi
    say "stage 1/4: pytest ${PYTEST_ARGS[*]} tests (timeout ${T_TESTS}s)"
    timeout -k 10 "$T_TESTS" "$PY" -m pytest "${PYTEST_ARGS[@]}" tests 2>&1 | tee "$OUT/gpu_tests.log"
    RC=${PIPESTATUS[0]}
    LINE=$(grep -E "[0-9]+ (passed|failed|error|errors|skipped|deselected)|no tests ran" "$OUT/gpu_tests.log" | tail -n 1)
    case $RC in
        0) note "gpu tests: PASS ($LINE)";;
        5) note "gpu tests: NONE COLLECTED ($LINE)"; FAILED=1;;
        124|137) note "gpu tests: TIMEOUT after ${T_TESTS}s ($LINE)"; FAILED=1;;
        *) note "gpu tests: FAIL rc=$RC ($LINE)"; FAILED=1
           while IFS= read -r l; do note "    $l"; done < <(grep -E "^(FAILED|ERROR) " "$OUT/gpu_tests.log" | head -n 15);;
    esac
    if [ "$HAVE_GPU" = 1 ] && [ "$RC" = 0 ] && ! grep -qE "[0-9]+ passed" "$OUT/gpu_tests.log"; then
        note "gpu tests: WARNING: nothing passed (all skipped?)"; FAILED=1
    fi

    # A small kernel whose gpu tests failed runs its PyTorch reference in the later stages, so that
    # the memcheck and the report still cover the rest of the fused path (the summary says which);
    # so does the SiLU -> 1x1 conv, whose forward kernel the default train and sampling steps run.
    OFF=()
    for pair in merged_depthwise:merged_depthwise_weight context_shift:context_shift modulated_silu:modulated_silu \
                pointwise_conv:pointwise_conv; do
        if grep -qE "^(FAILED|ERROR) tests/test_kernel_${pair%%:*}\.py" "$OUT/gpu_tests.log"; then OFF+=("${pair##*:}=torch"); fi
    done
    if [ ${#OFF[@]} -gt 0 ]; then
        export LIQUIDDIFF_KERNELS="${LIQUIDDIFF_KERNELS:-auto},$(IFS=,; echo "${OFF[*]}")"
        note "gpu tests failed for ${OFF[*]%%=*}: stages 2-3 run with LIQUIDDIFF_KERNELS=$LIQUIDDIFF_KERNELS"
        say "stages 2-3 with LIQUIDDIFF_KERNELS=$LIQUIDDIFF_KERNELS"
    fi
}

# ---------------------------------------------------------------- 2. compute-sanitizer memcheck
stage_2() {
    SAN=""
    for c in compute-sanitizer "${CUDA_HOME:-/usr/local/cuda}/bin/compute-sanitizer" /usr/local/cuda/compute-sanitizer/compute-sanitizer; do
        if command -v "$c" >/dev/null 2>&1; then SAN=$(command -v "$c"); break; fi
    done
    SAN_MAX=$(( T_SAN - 45 )); [ "$SAN_MAX" -lt 20 ] && SAN_MAX=20
    run_sanitizer() {  # $@: extra compute-sanitizer options
        PYTORCH_NO_CUDA_MEMORY_CACHING=1 timeout -k 10 "$T_SAN" "$SAN" --tool memcheck --error-exitcode 9 "$@" \
            "$PY" -m benchmarks.sanitize_ops --max-seconds "$SAN_MAX" > "$OUT/sanitizer.log" 2>&1
    }
    if [ "$HAVE_GPU" = 1 ] && [ -n "$SAN" ]; then
        say "stage 2/4: $SAN --tool memcheck python -m benchmarks.sanitize_ops (timeout ${T_SAN}s)"
        run_sanitizer --report-api-errors no --print-limit 50
        RC=$?
        if ! grep -q "ERROR SUMMARY" "$OUT/sanitizer.log" && grep -qiE "unrecogni[sz]ed|unknown option|invalid option" "$OUT/sanitizer.log"; then
            say "compute-sanitizer refused an option; again with the minimal options"
            run_sanitizer
            RC=$?
        fi
        SUMLINE=$(grep -m 1 "ERROR SUMMARY" "$OUT/sanitizer.log" | sed 's/^=* *//')
        CASES=$(grep -E "^sanitize_ops: [0-9]+/[0-9]+ cases" "$OUT/sanitizer.log" | tail -n 1)
        grep -E "^(MISMATCH|ERROR) |Invalid __global__|Out of bounds|out of bounds|Address .* is out of bounds|ERROR SUMMARY|^sanitize_ops:" "$OUT/sanitizer.log" | head -n 40
        # The H200 kind's gVisor machines refuse the sanitizer ("Device not supported", then error 999).
        grep -q "Device not supported" "$OUT/sanitizer.log" && RC=unsupported
        case $RC in
            unsupported) note "sanitizer: NOT SUPPORTED on this machine (compute-sanitizer: Device not supported); see sanitizer.log"; FAILED=1;;
            0) PART=""; [[ "$CASES" == *INCOMPLETE* ]] && PART=", PARTIAL: not every case ran"
               note "sanitizer: PASS${PART} (${SUMLINE:-no ERROR SUMMARY line}; ${CASES:-no case summary})";;
            9) note "sanitizer: MEMCHECK ERRORS (${SUMLINE}; ${CASES}); see sanitizer.log"; FAILED=1
               while IFS= read -r l; do note "    $l"; done < <(grep -E "Invalid __global__|out of bounds" "$OUT/sanitizer.log" | sort | uniq -c | sort -rn | head -n 8);;
            124|137) note "sanitizer: TIMEOUT after ${T_SAN}s (${SUMLINE:-no summary}; ${CASES:-cases unfinished})"; FAILED=1;;
            1) note "sanitizer: MISMATCH or error in sanitize_ops (${SUMLINE}; ${CASES})"; FAILED=1;;
            2) note "sanitizer: fused ops do not run Triton here (${CASES:-see sanitizer.log})"; FAILED=1;;
            *) note "sanitizer: rc=$RC (${SUMLINE:-no summary}; ${CASES:-no case summary}): see sanitizer.log"; FAILED=1
               while IFS= read -r l; do note "    $l"; done < <(tail -n 5 "$OUT/sanitizer.log");;
        esac
    elif [ "$HAVE_GPU" = 1 ]; then
        note "sanitizer: NOT RUN: compute-sanitizer not found (PATH, \$CUDA_HOME/bin, /usr/local/cuda)"; FAILED=1
    else
        say "stage 2/4: no GPU: sanitize_ops without compute-sanitizer (interpreter; checks the script only)"
        timeout -k 10 "$T_SAN" "$PY" -m benchmarks.sanitize_ops --max-seconds "$SAN_MAX" > "$OUT/sanitizer.log" 2>&1
        RC=$?
        note "sanitizer: NOT RUN (no GPU); sanitize_ops alone rc=$RC: $(grep -E '^sanitize_ops: [0-9]+/' "$OUT/sanitizer.log" | tail -n 1)"
    fi
}

# ---------------------------------------------------------------- 3. the report
stage_3() {
    LEFT=$(( BUDGET - $(elapsed) - 15 ))
    RB=$REPORT_MAX; [ "$LEFT" -lt "$RB" ] && RB=$LEFT
    [ "$RB" -lt 90 ] && RB=90
    QUICK=""; [ "$HAVE_GPU" = 1 ] || QUICK="--quick"
    say "stage 3/4: python -m benchmarks.gpu_report --out $OUT --budget $RB $QUICK"
    timeout -k 20 $(( RB + 30 )) "$PY" -m benchmarks.gpu_report --out "$OUT" --budget "$RB" $QUICK 2>&1 | tee "$OUT/report.log"
    RC=${PIPESTATUS[0]}
    STATUS=$("$PY" - "$OUT/report.json" <<'EOF' 2>&1
import json, sys
try:
    r = json.load(open(sys.argv[1]))
except Exception as exc:
    print(f"no report.json ({exc})"); sys.exit()
ops = r.get("ops", [])
par = sorted({str(o.get("parity")) for o in ops}) or ["-"]
e2e = r.get("e2e", {})
done = [f"{k}:{x['name']}" for k in ("train", "sample") for x in e2e.get(k, []) if x.get("status", "").startswith("ok")]
other = [f"{k}:{x['name']}={x.get('status')}" for k in ("train", "sample") for x in e2e.get(k, []) if not x.get("status", "").startswith("ok")]
print(f"parity {'/'.join(par)}; {len(done)} model timings ok" + (f"; not ok: {', '.join(other)}" if other else "")
      + f"; {len(r.get('notes', []))} notes; {r['meta'].get('elapsed_s', 0):.0f}s")
EOF
    )
    case $RC in
        0) note "report: OK ($STATUS)";;
        1) note "report: PARITY FAIL, non-finite model output or a loss off the reference's ($STATUS)"; FAILED=1;;
        124|137) note "report: TIMEOUT after $(( RB + 30 ))s ($STATUS)"; FAILED=1;;
        *) note "report: rc=$RC ($STATUS)"; FAILED=1;;
    esac
}

# ---------------------------------------------------------------- 4. the huge gpu tests
stage_4() {
    LEFT=$(( BUDGET - $(elapsed) - 10 ))
    if [ "$HAVE_GPU" = 1 ] && [ "$LEFT" -ge 45 ]; then
        # -v: a result line per test as it ends, so that a timeout still tells which passed.
        say "stage 4/4: pytest -m gpu -v $HUGE (timeout ${LEFT}s)"
        timeout -k 10 "$LEFT" "$PY" -m pytest -m gpu -v -p no:cacheprovider -o "addopts=" -rfE --tb=short "$HUGE" \
            > "$OUT/large_offsets.log" 2>&1
        RC=$?
        COUNTS="$(grep -c " PASSED" "$OUT/large_offsets.log") passed, $(grep -c " FAILED" "$OUT/large_offsets.log") failed, $(grep -c " SKIPPED" "$OUT/large_offsets.log") skipped"
        case $RC in
            0) note "huge gpu tests: PASS ($COUNTS)";;
            124|137) note "huge gpu tests: TIMEOUT after ${LEFT}s ($COUNTS so far)"; FAILED=1;;
            *) note "huge gpu tests: FAIL rc=$RC ($COUNTS)"; FAILED=1
               while IFS= read -r l; do note "    $l"; done < <(grep -E "^(FAILED|ERROR) " "$OUT/large_offsets.log" | head -n 8);;
        esac
    elif [ "$HAVE_GPU" = 1 ]; then
        note "huge gpu tests: NOT RUN (${LEFT}s left of the budget; $HUGE)"
    else
        say "stage 4/4: no GPU: the huge gpu tests skip"
    fi
}

# GPU_CHECK_STAGES picks stages (default 1234): a session can split them over two calls, e.g. the
# report alone with a larger budget (GPU_CHECK_STAGES=3 REPORT_BUDGET_MAX=420 GPU_CHECK_BUDGET=450).
for s in 1 2 3 4; do
    if [[ "$STAGES" == *$s* ]]; then "stage_$s"; else note "stage $s: not run (GPU_CHECK_STAGES=$STAGES)"; fi
done

echo
echo "==================== gpu_check summary ($(elapsed)s, GPU: $GPU_NAME) ===================="
for l in "${SUMMARY[@]}"; do echo "$l"; done
echo "files: $(cd "$OUT" && ls | tr '\n' ' ')"
[ "$HAVE_GPU" = 1 ] || exit 2
exit $FAILED
