#!/usr/bin/env bash
# The one command for a GPU machine: build the CUDA extension, list the backends, run the whole
# test suite on the GPU, run the benchmarks, collect everything.
#
#   bash bench/gpu_check.sh                 # all steps: env build backends tests-sm90 tests bench
#   bash bench/gpu_check.sh tests bench     # a subset (e.g. the build is already in place)
#
# A remote command gets 10 minutes, and the build + tests take ~5 of them, so a GPU session
# runs several calls (a fresh machine each time, hence the build in each):
#   bash bench/gpu_check.sh env build backends tests-sm90 tests
#   BENCH_JOBS_SELECT=memory-bound,mtp-verify,attention-sm90,attention bash bench/gpu_check.sh build bench
#   BENCH_JOBS_SELECT=logprobs,e2e,decode bash bench/gpu_check.sh build bench
#   BENCH_JOBS_SELECT=decode-compiled bash bench/gpu_check.sh build bench   (HF compiled decode: minutes)
# and, with device time left, the tile sweep of the Triton attention kernels (bench/tune.py):
#   bash bench/gpu_check.sh tune      (Triton only: no build needed)
# and Nsight Compute's report of the kernels of PROFILES (below), to see what holds them back:
#   bash bench/gpu_check.sh build profile
# and where an end-to-end step's GPU time goes, per kernel and kind (bench/breakdown.py:
# train-step and grpo-step of Palmyra-mini, thinkfuse against HF / TRL), in logs/breakdown.log:
#   bash bench/gpu_check.sh build breakdown
# A machine is given back 30 s after a call, so each call starts bare and builds (~60 s). The
# build step saves the extension to $OUT (thinkfuse-ext.tar.xz, or .tgz without xz, and .stamp); copy both into
# .ext-cache/ and carry it (carry [".whl", ".ext-cache"]): the next call's build step then
# reuses it when the sources, torch, nvcc, arch and compiler are the same, and builds otherwise.
# The bench step runs BENCH_JOBS (below; BENCH_JOBS_SELECT, a comma-separated list of job names,
# keeps some of them) one after the other, each under its own time limit so one slow op cannot
# starve the others, then merges them into one results directory.
#
# Works without network access: it uses the torch/triton already installed (no build
# isolation, no dependency resolution). Every step runs even when an earlier one failed; the
# summary at the end lists each step's status and the exit status is non-zero if any failed.
#
# Output: bench/results/<YYYY-MM-DD>_<device-slug>/ (results.json, results.md, PNGs, logs/;
# with _<HHMMSS> appended when the tree already holds a directory of that name: a committed run
# of the same day, an earlier call's unpacked results), tarred to "$OUT/<that name>.tgz" after
# every step when OUT is set (so a run killed from
# outside keeps what finished). The whole script stays inside GPU_CHECK_BUDGET seconds (default 570, under the
# 10 minutes a remote command gets): each step's time limit is cut to what is left, and the
# benchmark, stopped by SIGTERM, still writes the rows it measured.
#
# THINKFUSE_GIT_COMMIT=<sha> names the code in the results' metadata: the machine's copy of the
# tree may carry a missing or stale .git (a 2026-11-22 run recorded the wrong commit).
#
# Environment knobs: PYTHON, OUT, THINKFUSE_GIT_COMMIT, GPU_CHECK_BUDGET, BUILD_TIMEOUT, TESTS_TIMEOUT, BENCH_TIMEOUT, TUNE_TIMEOUT, PROFILE_TIMEOUT, BREAKDOWN_TIMEOUT, BENCH_JOBS_SELECT,
# MAX_JOBS (parallel nvcc jobs), TORCH_CUDA_ARCH_LIST (default: this GPU's arch only, which
# halves the build time compared with setup.py's 8.0;9.0a).

set -u -o pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."

PYTHON=${PYTHON:-python}
BUDGET=${GPU_CHECK_BUDGET:-570}
BUILD_TIMEOUT=${BUILD_TIMEOUT:-300}
TESTS_TIMEOUT=${TESTS_TIMEOUT:-330}  # 16 workers: 235 s on 2026-11-22; over 250 s (99% done) on 2026-11-23
SM90_TESTS_TIMEOUT=${SM90_TESTS_TIMEOUT:-180}
TUNE_TIMEOUT=${TUNE_TIMEOUT:-420}
BENCH_TIMEOUT=${BENCH_TIMEOUT:-480}
PROFILE_TIMEOUT=${PROFILE_TIMEOUT:-240}
BREAKDOWN_TIMEOUT=${BREAKDOWN_TIMEOUT:-240}
# Tests in parallel processes when pytest-xdist is there (Triton's JIT compiles are CPU-bound).
export TEST_WORKERS=${TEST_WORKERS:-$(nproc)}
# name:seconds:bench arguments. Shapes cut to one model where the full preset list takes longer
# than a call (attention: 226 cases per head shape).
# The Hopper attention kernel waits on mbarriers, so a bug in it can hang rather than fail: its
# rows run in their own job (and its tests in their own step, tests-sm90) so that a hang costs
# only them.
BENCH_JOBS=(
    "memory-bound:120:--op rms_norm --op swiglu --op rope"
    "mtp-verify:60:--op mtp_verify"
    "attention-sm90:60:--op attention --model mimo-7b --impl thinkfuse-cuda-sm90"
    "attention:110:--op attention --model mimo-7b --skip-impl thinkfuse-cuda-sm90"
    # 53 of its 65 rows in 70 s on the 2026-11-23 H100, the 32k fwd+bwd fused-linear rows lost.
    "logprobs:110:--op logprobs --model palmyra-mini"
    # Palmyra-mini: 2-layer train steps, GRPO loss steps and the full-depth 32k-token GRPO step.
    "e2e:130:--op e2e --model palmyra-mini"
    # MiMo-7B at full depth: plain vs MTP speculative decoding (the e2e rows of mode fwd).
    "decode:180:--op e2e --model mimo-7b --mode fwd --skip-impl hf-static-compile --skip-impl thinkfuse-static-compile"
    # HF's compiled static-cache generate (minutes of torch.compile): the strong decode baseline,
    # unpatched and patched.
    "decode-compiled:420:--op e2e --model mimo-7b --mode fwd --impl hf-static-compile --impl thinkfuse-static-compile"
)
JOB_NAMES=" ${BENCH_JOBS[*]%%:*} "
if [ -n "${BENCH_JOBS_SELECT:-}" ]; then
    # The names, split at commas and blanks ("e2e, logprobs" too), without glob expansion; each
    # must be a job's: a misspelt one would leave its job out without a word.
    read -r -a SELECT_NAMES <<<"${BENCH_JOBS_SELECT//,/ }"
    for name in "${SELECT_NAMES[@]}"; do
        case "$JOB_NAMES" in *" $name "*) ;; *)
            echo "BENCH_JOBS_SELECT=$BENCH_JOBS_SELECT: no bench job '$name' (jobs:$JOB_NAMES)" >&2; exit 2 ;;
        esac
    done
    SELECTED=()
    for job in "${BENCH_JOBS[@]}"; do
        case " ${SELECT_NAMES[*]} " in *" ${job%%:*} "*) SELECTED+=("$job") ;; esac
    done
    [ "${#SELECTED[@]}" -gt 0 ] || { echo "BENCH_JOBS_SELECT=$BENCH_JOBS_SELECT names no job of:$JOB_NAMES" >&2; exit 2; }
    BENCH_JOBS=("${SELECTED[@]}")
fi
export PYTHONUNBUFFERED=1

if [ "$#" -gt 0 ]; then STEPS=("$@"); else STEPS=(env build backends tests-sm90 tests bench); fi
# Names checked before anything runs: a wrong one found after the build would cost the call.
KNOWN_STEPS=" env build backends tests-sm90 tests bench tune profile breakdown "
for step in "${STEPS[@]}"; do
    case "$KNOWN_STEPS" in *" $step "*) continue ;; esac
    case "$JOB_NAMES" in
        *" $step "*) echo "'$step' is a bench job, not a step: BENCH_JOBS_SELECT=$step bash bench/gpu_check.sh ... bench" >&2 ;;
        *) echo "unknown step '$step' (steps:$KNOWN_STEPS; bench jobs, chosen with BENCH_JOBS_SELECT:$JOB_NAMES)" >&2 ;;
    esac
    exit 2
done
if [ -n "${BENCH_JOBS_SELECT:-}" ] && [[ " ${STEPS[*]} " != *" bench "* ]]; then
    echo "BENCH_JOBS_SELECT=$BENCH_JOBS_SELECT chooses bench jobs, but the steps (${STEPS[*]}) have no 'bench' step to run them" >&2
    exit 2
fi

# Wheels carried to the machine (`make gpu-wheels`, then the run with carry [".whl"]): baselines
# such as Liger-Kernel that the machine's image lacks. Installed beside, not into, its Python.
if compgen -G ".whl/*.whl" >/dev/null; then
    "$PYTHON" -m pip install -q --no-index --no-deps --no-compile --target /tmp/thinkfuse-wheels .whl/*.whl \
        && export PYTHONPATH="/tmp/thinkfuse-wheels${PYTHONPATH:+:$PYTHONPATH}"
fi

RESULTS_DIR=$("$PYTHON" -c 'from bench.harness import default_out_dir; print(default_out_dir())' 2>/dev/null) \
    || RESULTS_DIR="$PWD/bench/results/$(date -u +%F)_unknown-device"
# The machine's copy of the tree may already hold a directory of that name: a committed run of
# the same day and device, or an earlier call's results unpacked into the checkout. Its files
# would go into this run's tarball, and its results.json pass for this run's (the bench step's
# merge after a timeout looks for one): this run writes beside it instead.
if [ -n "$(ls -A "$RESULTS_DIR" 2>/dev/null)" ]; then
    taken=$RESULTS_DIR
    RESULTS_DIR="${taken}_$(date -u +%H%M%S)"
    n=1
    while [ -e "$RESULTS_DIR" ]; do RESULTS_DIR="${taken}_$(date -u +%H%M%S)-$n"; n=$((n + 1)); done
    echo "$taken already holds files (from the tree this machine got): this run writes to $RESULTS_DIR"
fi
LOG_DIR="$RESULTS_DIR/logs"
mkdir -p "$LOG_DIR"
SUMMARY=()
FAILED=0

copy_out() {
    # One tarball of results and logs to $OUT (when set), so they survive the machine: the device
    # tool returns at most 8 files, two folders deep.
    [ -n "${OUT:-}" ] || return 0
    mkdir -p "$OUT"
    tar czf "$OUT/$(basename "$RESULTS_DIR").tgz" -C "$(dirname "$RESULTS_DIR")" "$(basename "$RESULTS_DIR")"
}

time_left() {
    # Seconds left in the budget, keeping 60 s for the SIGKILL grace, the summary and the copy.
    echo $((BUDGET - SECONDS - 60))
}

run_step() {
    # run_step NAME LIMIT_SECONDS FUNCTION [show]: run the (exported) function in a child bash
    # under `timeout`, log to logs/NAME.log, record the status, keep going. "show" prints the
    # whole log; otherwise only a failed step's tail is printed.
    local name=$1 limit=$2 func=$3 show=${4:-} rc start left
    left=$(time_left)
    if [ "$left" -lt 10 ]; then
        SUMMARY+=("$name: SKIPPED (time budget of ${BUDGET}s spent)")
        FAILED=1
        return
    fi
    [ "$limit" -gt "$left" ] && limit=$left
    echo "=== $name (limit ${limit}s)"
    start=$SECONDS
    # When the step must end (epoch seconds): a step that runs commands under a `timeout` of
    # their own (bench) cuts their limits to it, since such a command, in a process group of
    # its own, never gets the SIGTERM that ends the step.
    export STEP_DEADLINE=$(($(date +%s) + limit))
    # -k 30: after SIGTERM, 30 s for the benchmark to write the rows it has before SIGKILL.
    timeout -k 30 "$limit" bash -c "$func" >"$LOG_DIR/$name.log" 2>&1
    rc=$?
    local took=$((SECONDS - start))
    if [ "$rc" -eq 0 ]; then
        SUMMARY+=("$name: ok (${took}s)")
    elif [ "$rc" -eq 124 ] || [ "$rc" -eq 137 ]; then
        SUMMARY+=("$name: TIMEOUT after ${took}s (limit ${limit}s; log logs/$name.log)")
        FAILED=1
    else
        SUMMARY+=("$name: FAILED rc=$rc (${took}s; log logs/$name.log)")
        FAILED=1
    fi
    if [ -n "$show" ]; then
        cat "$LOG_DIR/$name.log"
    elif [ "$rc" -ne 0 ]; then
        tail -n 30 "$LOG_DIR/$name.log"
        echo
    fi
    copy_out
}

step_env() {
    nvidia-smi || echo "nvidia-smi failed"
    echo "THINKFUSE_GIT_COMMIT=${THINKFUSE_GIT_COMMIT:-<unset>}"
    git rev-parse HEAD 2>/dev/null && git status --short 2>/dev/null
    "$PYTHON" - <<'EOF'
import platform, torch
print("python", platform.python_version(), "torch", torch.__version__, "cuda", torch.version.cuda)
print("device", torch.cuda.get_device_name(0) if torch.cuda.is_available() else None)
try:
    import triton
    print("triton", triton.__version__)
except ImportError as exc:
    print("triton missing:", exc)
EOF
}

cuda_arch() {
    "$PYTHON" -c 'import torch; M, m = torch.cuda.get_device_capability(); print(f"{M}.{m}" + ("a" if (M, m) == (9, 0) else ""))'
}

pick_compiler() {
    # Keep CC/CXX as given unless the default C++ compiler links libstdc++ statically (some images
    # wrap g++ with -static-libstdc++; setup.py refuses it, see scripts/cxx_runtime.py) and the
    # system's g++ does not.
    "$PYTHON" scripts/cxx_runtime.py
    if [ $? -eq 1 ] && [ -x /usr/bin/gcc ] && "$PYTHON" scripts/cxx_runtime.py /usr/bin/g++; then
        echo "building with /usr/bin/gcc and /usr/bin/g++"
        export CC=/usr/bin/gcc CXX=/usr/bin/g++
    fi
}

build_stamp() {
    # What the extension binary depends on: every source under csrc/ and setup.py (contents, so
    # uncommitted edits count), torch, nvcc, the arch list and the C++ compiler.
    {
        find csrc setup.py -type f -print0 | sort -z | xargs -0 sha256sum
        "$PYTHON" -c 'import torch; print(torch.__version__, torch.version.cuda)'
        # the nvcc torch's build uses (CUDA_HOME), not whichever is first on PATH
        "$("$PYTHON" -c 'from torch.utils.cpp_extension import CUDA_HOME; print(CUDA_HOME or "")' \
            2>/dev/null)/bin/nvcc" --version 2>/dev/null | tail -n 1
        echo "arch=$1 cc=${CC:-default} cxx=${CXX:-default}"
    } | sha256sum | cut -d' ' -f1
}

restore_carried_build() {
    # Installs the carried build (EXT_CACHE) when it was made from the same inputs; else fails.
    local stamp=$1
    local archive
    archive=$(ls "$EXT_CACHE"/thinkfuse-ext.tar.xz "$EXT_CACHE"/thinkfuse-ext.tgz 2>/dev/null | head -n 1)
    [ -n "$archive" ] && [ -f "$EXT_CACHE/thinkfuse-ext.stamp" ] || return 1
    if [ "$(cat "$EXT_CACHE/thinkfuse-ext.stamp")" != "$stamp" ]; then
        echo "the carried build in $EXT_CACHE/ was made from other sources or tools: building"
        return 1
    fi
    rm -f python/thinkfuse/_C*.so  # an older build of another name must not be what imports
    if tar xf "$archive" -C python/thinkfuse \
        && THINKFUSE_BUILD_CUDA=0 "$PYTHON" -m pip install --no-build-isolation --no-deps -q -e . \
        && "$PYTHON" -c 'import thinkfuse._C'; then
        echo "reused the carried build of the same inputs (stamp $stamp)"
        return 0
    fi
    echo "the carried build does not install or load: building"
    rm -f python/thinkfuse/_C*.so
    return 1
}

save_build() {
    # The built extension to $OUT, for the next call to carry (files over 16 MiB do not come back).
    local stamp=$1 so
    [ -n "${OUT:-}" ] || return 0
    so=$(cd python/thinkfuse && ls _C*.so 2>/dev/null | head -n 1)
    [ -n "$so" ] || { echo "no python/thinkfuse/_C*.so to save for the next call"; return 0; }
    mkdir -p "$OUT"
    # A copy without debug sections (the symbols the loader and torch need stay), xz-compressed
    # where xz exists: gzip of the full module was over the 16 MiB on 2026-11-23.
    local tmp archive size
    tmp=$(mktemp -d)
    cp "python/thinkfuse/$so" "$tmp/$so" || return 0
    strip --strip-debug "$tmp/$so" 2>/dev/null || true
    if command -v xz >/dev/null; then
        archive="$OUT/thinkfuse-ext.tar.xz"
        tar cf - -C "$tmp" "$so" | xz -9 -T0 >"$archive" || { rm -rf "$tmp"; return 0; }
    else
        archive="$OUT/thinkfuse-ext.tgz"
        tar czf "$archive" -C "$tmp" "$so" || { rm -rf "$tmp"; return 0; }
    fi
    rm -rf "$tmp"
    size=$(stat -c %s "$archive")
    if [ "$size" -gt $((16 * 1024 * 1024)) ]; then
        echo "the build is $((size / 1024 / 1024)) MiB compressed, over 16 MiB: not saved for the next call"
        rm -f "$archive"
        return 0
    fi
    echo "$stamp" >"$OUT/thinkfuse-ext.stamp"
    echo "saved the build ($((size / 1024)) KiB) to $archive and \$OUT/thinkfuse-ext.stamp: copy both into $EXT_CACHE/ and carry it"
}

step_build() {
    local arch=${TORCH_CUDA_ARCH_LIST:-$(cuda_arch)} stamp
    pick_compiler
    stamp=$(build_stamp "$arch")
    restore_carried_build "$stamp" && return 0
    echo "TORCH_CUDA_ARCH_LIST=$arch MAX_JOBS=${MAX_JOBS:-$(nproc)} CC=${CC:-<unset>} CXX=${CXX:-<unset>}"
    THINKFUSE_BUILD_CUDA=1 TORCH_CUDA_ARCH_LIST=$arch MAX_JOBS=${MAX_JOBS:-$(nproc)} \
        "$PYTHON" -m pip install --no-build-isolation --no-deps -v -e . || return 1
    save_build "$stamp"
}

step_backends() {
    "$PYTHON" -c 'import thinkfuse; print(thinkfuse.available_backends())' || return 1
    "$PYTHON" - <<'EOF'
from thinkfuse.backend import BACKENDS, why_unavailable
for name in BACKENDS:
    print(f"  {name}: {why_unavailable(name) or 'available'}")
EOF
}

step_tests() {
    # No TRITON_INTERPRET: the triton backend runs compiled on the GPU; gpu-marked tests run.
    # No -x: a first GPU run should list every failure (junit XML for a machine-readable list).
    # TEST_WORKERS=N spreads the tests over N processes with pytest-xdist (Triton's JIT
    # compilation is CPU-bound, so this shortens the step a lot on a 16-core machine).
    local parallel=()
    if [ -n "${TEST_WORKERS:-}" ] && "$PYTHON" -c 'import xdist' 2>/dev/null; then
        parallel=(-n "$TEST_WORKERS")
    fi
    local ignored=() file
    for file in $SM90_TESTS; do ignored+=(--ignore="$file"); done
    # Failures are also appended to logs/failures.txt as they happen (tests/conftest.py), so a
    # step killed by its time limit still says what failed.
    exec env -u TRITON_INTERPRET THINKFUSE_FAILURE_LOG="$RESULTS_DIR/logs/failures.txt" \
        "$PYTHON" -m pytest tests -q -rs --maxfail=100 --durations=25 \
        "${ignored[@]}" "${parallel[@]}" --junitxml="$RESULTS_DIR/logs/pytest.xml"
}

step_tests_sm90() {
    # The Hopper kernels' tests alone, first failure stops them: a barrier bug hangs a kernel,
    # and the step's own time limit then ends only this step.
    # shellcheck disable=SC2086  # SM90_TESTS is a word list on purpose
    exec env -u TRITON_INTERPRET THINKFUSE_FAILURE_LOG="$RESULTS_DIR/logs/failures-sm90.txt" \
        "$PYTHON" -m pytest $SM90_TESTS -q -rs -x --durations=10 \
        --junitxml="$RESULTS_DIR/logs/pytest-sm90.xml"
}

step_bench() {
    # Each job in its own directory under its own limit (SIGTERM lets the harness write the rows
    # it has); then one merged results directory. exec-free: the jobs run one by one. The step
    # fails when a job did (the merge only sees the jobs that got as far as measuring).
    local job name limit args left rc failed=0
    while IFS= read -r job; do
        IFS=: read -r name limit args <<<"$job"
        # Cut to what is left of the step, keeping 30 s for the job's SIGKILL grace (20 s) and
        # the merge: a job still running when the step's limit ends it would run on unsignalled.
        left=$((${STEP_DEADLINE:-$(($(date +%s) + limit + 30))} - $(date +%s) - 30))
        [ "$limit" -gt "$left" ] && limit=$left
        if [ "$limit" -lt 10 ]; then
            echo "--- bench job $name: SKIPPED (the bench step's time is spent)"
            failed=1
            continue
        fi
        echo "--- bench job $name (limit ${limit}s): $args"
        # shellcheck disable=SC2086  # args is a word list on purpose
        timeout -s TERM -k 20 "$limit" "$PYTHON" -m bench --no-plots --out "$RESULTS_DIR/jobs/$name" $args
        rc=$?
        echo "--- bench job $name: rc=$rc"
        [ "$rc" -eq 0 ] || failed=1
    done <<<"$BENCH_JOBS_SERIALISED"
    merge_bench_jobs || return 1
    return "$failed"
}

step_profile() {
    # Nsight Compute on one launch of each PROFILES kernel (bench/profile_kernels.py): its text
    # report (speed of light, occupancy, memory, warp stall reasons) in logs/profile-NAME.txt.
    # --clock-control none: the clocks stay as the benchmarks see them.
    local ncu entry name workload kernel rc=0
    ncu=$(command -v ncu || ls /opt/nvidia/nsight-compute/*/ncu /usr/local/cuda/bin/ncu 2>/dev/null | head -n 1)
    [ -n "$ncu" ] || { echo "ncu (Nsight Compute) not found"; return 1; }
    while IFS= read -r entry; do
        IFS=: read -r name workload kernel <<<"$entry"
        echo "--- profile $name: kernel /$kernel/ of workload $workload"
        if env -u TRITON_INTERPRET "$ncu" --clock-control none --set full -k "regex:$kernel" \
            --launch-skip 1 --launch-count 1 -f -o "$LOG_DIR/profile-$name" \
            "$PYTHON" -m bench.profile_kernels "$workload"; then
            "$ncu" --import "$LOG_DIR/profile-$name.ncu-rep" --page details --print-details all \
                >"$LOG_DIR/profile-$name.txt" || rc=1
        else
            rc=1
        fi
        rm -f "$LOG_DIR/profile-$name.ncu-rep"  # MBs; the text report is what travels
    done <<<"$PROFILES_SERIALISED"
    return "$rc"
}

step_breakdown() {
    # GPU time per kernel and kind of kernel of the e2e train and GRPO steps (torch.profiler):
    # the report in logs/breakdown.log, the figures in logs/breakdown/breakdown.json.
    exec env -u TRITON_INTERPRET "$PYTHON" -m bench.breakdown --out "$LOG_DIR/breakdown"
}

step_tune() {
    # The Triton launch-config sweep (bench/tune.py): tune.{json,md} beside the results.
    exec env -u TRITON_INTERPRET "$PYTHON" -m bench.tune --out "$RESULTS_DIR"
}

merge_bench_jobs() {
    # One results directory from the jobs that got as far as measuring the device.
    local dirs=() dir
    for dir in "$RESULTS_DIR"/jobs/*/; do
        if [ -f "$dir/results.json" ] || [ -f "$dir/metadata.partial.json" ]; then dirs+=("${dir%/}"); fi
    done
    [ "${#dirs[@]}" -gt 0 ] || { echo "no bench job measured anything"; return 1; }
    "$PYTHON" -m bench --finalize "${dirs[@]}" --out "$RESULTS_DIR"
}

# name:workload:kernel-name regex of the profile step (bench/profile_kernels.py's workloads).
PROFILES=(
    "hopper-bwd:attention-sm90:dkdv_kernel"
    "hopper-fwd:attention-sm90:forward_kernel"
    "triton-bwd-dkdv:attention-triton:_attn_bwd_dkdv_kernel"
)
# The steps run in child shells (`timeout` cannot run a function directly).
# The Hopper kernels' test files (space-separated; no spaces in the paths).
SM90_TESTS="tests/test_flash_attention_sm90.py tests/test_flash_attention_bwd_sm90.py"
# A build from an earlier call (see the header), carried in this git-ignored directory.
EXT_CACHE=.ext-cache
export PYTHON RESULTS_DIR SM90_TESTS EXT_CACHE
export BENCH_JOBS_SERIALISED PROFILES_SERIALISED LOG_DIR
BENCH_JOBS_SERIALISED=$(printf '%s\n' "${BENCH_JOBS[@]}")
PROFILES_SERIALISED=$(printf '%s\n' "${PROFILES[@]}")
export -f step_env cuda_arch pick_compiler build_stamp restore_carried_build save_build step_build step_backends step_tests step_tests_sm90 step_bench step_tune step_profile step_breakdown merge_bench_jobs

for step in "${STEPS[@]}"; do
    case "$step" in
        env) run_step env 60 step_env ;;
        build) run_step build "$BUILD_TIMEOUT" step_build ;;
        backends) run_step backends 60 step_backends show ;;
        tests) run_step tests "$TESTS_TIMEOUT" step_tests ;;
        tests-sm90) run_step tests-sm90 "$SM90_TESTS_TIMEOUT" step_tests_sm90 ;;
        tune) run_step tune "$TUNE_TIMEOUT" step_tune show ;;
        profile) run_step profile "$PROFILE_TIMEOUT" step_profile ;;
        breakdown) run_step breakdown "$BREAKDOWN_TIMEOUT" step_breakdown show ;;
        bench)
            run_step bench "$BENCH_TIMEOUT" step_bench
            # The step stopped before merging (its own limit): merge what the jobs wrote.
            if [ ! -f "$RESULTS_DIR/results.json" ] && [ -d "$RESULTS_DIR/jobs" ]; then
                merge_bench_jobs >"$LOG_DIR/merge.log" 2>&1
                copy_out
            fi ;;
        *) SUMMARY+=("$step: UNKNOWN STEP (expected env build backends tests-sm90 tests bench tune profile breakdown)"); FAILED=1 ;;
    esac
done

{
    echo "gpu_check summary ($(date -u +%FT%TZ), ${SECONDS}s, results in $RESULTS_DIR)"
    printf '  %s\n' "${SUMMARY[@]}"
} | tee "$LOG_DIR/summary.txt"
copy_out
exit "$FAILED"
