#!/usr/bin/env bash
# Every check of the CUDA backend that needs a GPU, in one go, with logs under OUT:
#   1. the GPU-vs-CPU tests (tests/gpu_vs_cpu.rs, LATENTLOOP_REQUIRE_GPU=1), the NVRTC
#      compile check and the library's unit tests;
#   2. compute-sanitizer memcheck, racecheck, synccheck and initcheck on short runs
#      (LATENTLOOP_GPU_BINS=30) of the small and standard comparisons and the batch test;
#   3. the gpu_step bench (latency beside the CPU, batch throughput, where the time goes);
#   4. end to end: `latentloop run` on the simulated rig with backend = "cuda".
#
#   scripts/gpu-check.sh [OUT]                  (default target/gpu-check; builds with cargo)
#   scripts/gpu-check.sh --package DIR          (builds the binaries and copies them to DIR)
#   BIN=DIR scripts/gpu-check.sh OUT            (a GPU machine without Rust: runs DIR's binaries)
#   STEPS="tests bench run" scripts/gpu-check.sh (some of: tests sanitizer bench run)
#
# NVRTC: libnvrtc.so.12 (scripts/install-nvrtc.sh) or a CUDA toolkit's libnvrtc. cudarc
# looks for libnvrtc.so and libnvrtc.so.12; a CUDA 13 toolkit names its library
# libnvrtc.so.13, so this script links it as libnvrtc.so in a temporary folder.
set -uo pipefail
cd "$(dirname "$0")/.."

exe() { # exe CARGO-ARGS...: the executable cargo built for the one test target named
    cargo "$@" -q --no-run --message-format=json 2>/dev/null |
        grep -o '"executable":"[^"]*"' | cut -d'"' -f4 | tail -1
}
if [ "${1:-}" = "--package" ]; then
    dir="${2:?usage: scripts/gpu-check.sh --package DIR}"
    set -e
    cargo build --release -q
    mkdir -p "$dir"
    cp target/release/latentloop "$dir/"
    cp "$(exe test --release --lib)" "$dir/unit"
    for t in gpu_vs_cpu gpu_nvrtc; do cp "$(exe test --release --test $t)" "$dir/$t"; done
    cp "$(exe bench --bench gpu_step)" "$dir/gpu_step"
    strip "$dir"/*
    ls -la "$dir"
    exit 0
fi

out="${1:-target/gpu-check}"
mkdir -p "$out"
out="$(cd "$out" && pwd)"
if [ -z "${BIN:-}" ]; then
    BIN=target/gpu-check-bin
    "$0" --package "$BIN" >/dev/null || exit 1
fi
BIN="$(cd "$BIN" && pwd)"

# The driver and an NVRTC that cudarc finds.
nvidia-smi --query-gpu=name,driver_version,clocks.sm,clocks.max.sm --format=csv | tee "$out/gpu.txt"
if ! ldconfig -p | grep -q 'libnvrtc\.so\(\.12\)\? ' && ! [[ "${LD_LIBRARY_PATH:-}" == *nvrtc* ]]; then
    lib="$(find /usr/local/cuda*/ /usr/lib /opt -name 'libnvrtc.so.1[23]*' 2>/dev/null | grep -v builtins | sort | tail -1)"
    if [ -n "$lib" ]; then
        mkdir -p /tmp/latentloop-nvrtc
        ln -sf "$lib" /tmp/latentloop-nvrtc/libnvrtc.so
        # Its own folder too: NVRTC loads its builtins library from there.
        export LD_LIBRARY_PATH="/tmp/latentloop-nvrtc:$(dirname "$lib")${LD_LIBRARY_PATH:+:$LD_LIBRARY_PATH}"
        echo "NVRTC: $lib (linked as /tmp/latentloop-nvrtc/libnvrtc.so)" | tee -a "$out/gpu.txt"
    fi
fi
export LATENTLOOP_REQUIRE_GPU=1 LATENTLOOP_REQUIRE_NVRTC=1
status=0
step() { # step NAME TIMEOUT CMD...: runs CMD, logs to OUT/NAME.log, records failures
    local name="$1" limit="$2"
    shift 2
    local t0=$SECONDS
    timeout "$limit" "$@" >"$out/$name.log" 2>&1
    local rc=$?
    echo "== $name: exit $rc in $((SECONDS - t0)) s" >>"$out/summary.txt"
    [ $rc -eq 0 ] || status=1
}

want() { [[ " ${STEPS:-tests sanitizer bench run} " == *" $1 "* ]]; }

if want tests; then
    step unit 30 "$BIN/unit" gpu::
    step nvrtc 60 "$BIN/gpu_nvrtc" --nocapture
    step gpu_vs_cpu 240 "$BIN/gpu_vs_cpu" --nocapture
    grep -E 'agree|GPU:|FAILED|panicked|failures' "$out/gpu_vs_cpu.log" | head -80 >>"$out/summary.txt"
fi

san() { # san TOOL TIMEOUT TESTS...
    local tool="$1" limit="$2"
    shift 2
    LATENTLOOP_GPU_BINS=30 step "sanitizer-$tool" "$limit" compute-sanitizer --tool "$tool" --error-exitcode 9 \
        --print-limit 20 "$BIN/gpu_vs_cpu" --test-threads 1 "$@"
    tail -3 "$out/sanitizer-$tool.log" >>"$out/summary.txt"
}
if want sanitizer; then
    if command -v compute-sanitizer >/dev/null; then
        san memcheck 150 gpu_matches_cpu_small_and_standard batch_equals_single_decoders
        LATENTLOOP_GPU_SIZES=small san racecheck 200 gpu_matches_cpu_small_and_standard
        san synccheck 80 gpu_matches_cpu_small_and_standard
        san initcheck 80 batch_equals_single_decoders
    else
        echo "== compute-sanitizer not found" >>"$out/summary.txt"
        status=1
    fi
fi

if want bench; then
    # The SM clock while it runs (read, never set).
    nvidia-smi --query-gpu=clocks.sm,power.draw --format=csv,noheader -lms 1000 >"$out/clocks.csv" 2>&1 &
    smi=$!
    LATENTLOOP_BENCH_OUT="$out/gpu_step.md" step bench 180 "$BIN/gpu_step" --bench --warm-up-time 1 --measurement-time 3
    kill $smi 2>/dev/null
    sort "$out/clocks.csv" | uniq -c | sort -rn | head -5 >>"$out/summary.txt"
fi

if want run; then
    # End to end: the simulated rig decoded by the GPU backend (the shipped NODE model).
    sed '/^\[model\]/a backend = "cuda"' rig-configs/sim-lorenz.toml >rig-configs/gpu-check.toml
    sed -i "s|^dir = .*|dir = \"$out/run-reports\"|" rig-configs/gpu-check.toml
    step run 40 "$BIN/latentloop" run rig-configs/gpu-check.toml --seconds 10 --quiet
    rm -f rig-configs/gpu-check.toml
fi

echo "== overall: $([ $status -eq 0 ] && echo ok || echo FAILED)" >>"$out/summary.txt"
cat "$out/summary.txt"
[ -f "$out/gpu_step.md" ] && cat "$out/gpu_step.md"
exit $status
