#!/usr/bin/env bash
# Coverage-guided fuzzing of every parser of outside bytes (fuzz/fuzz_targets, entry points
# in src/fuzzing.rs), with cargo-fuzz and libFuzzer on the stable toolchain (no sanitizer:
# `-s none`; debug assertions on, so overflows panic). Each target runs SECONDS from its
# seeds (fuzz/seeds, made by fuzz/make_seeds.py) and checked-in corpus; the corpus is then
# rewritten as a smallest set covering every edge reached (fuzz/corpus), and every crash is copied to fuzz/regressions/<target>/, which
# tests/fuzz_corpus.rs replays in CI. Prints a table: executions, exec/s, coverage, crashes.
#
#   scripts/fuzz.sh [SECONDS] [TARGET[:SECONDS]...]   (default 60 s, every target; JOBS=2 runs two at once)
#   cargo install cargo-fuzz                 (once)
set -euo pipefail
cd "$(dirname "$0")/.."
secs="${1:-60}"
shift || true
targets=("$@")
if [ ${#targets[@]} -eq 0 ]; then
    mapfile -t targets < <(sed -n 's/^name = "\(.*\)"$/\1/p' fuzz/Cargo.toml | grep -v latentloop-fuzz)
fi
command -v cargo-fuzz >/dev/null || { echo "cargo-fuzz is not installed: cargo install cargo-fuzz" >&2; exit 2; }
cargo fuzz build -s none
work=target/fuzz-work
mkdir -p "$work"
run_one() {
    local t=${1%%:*} secs=$secs
    if [ "$1" != "$t" ]; then secs=${1#*:}; fi
    rm -rf "fuzz/artifacts/$t" "$work/$t.min"
    mkdir -p "$work/$t" "$work/$t.min" "fuzz/artifacts/$t" "fuzz/corpus/$t"
    # New inputs go to the work folder (first, kept between runs); the checked-in corpus
    # and the seeds (fuzz/make_seeds.py) are read.
    cargo fuzz run -s none "$t" "$work/$t" "fuzz/corpus/$t" "fuzz/seeds/$t" -- -max_total_time="$secs" \
        -print_final_stats=1 -rss_limit_mb=2048 -timeout=10 -artifact_prefix="fuzz/artifacts/$t/" > "$work/$t.log" 2>&1 || true
    # The checked-in corpus: a smallest set of inputs covering every edge reached (edges,
    # not hit counts, so it stays small).
    cargo fuzz run -s none "$t" "$work/$t.min" "fuzz/corpus/$t" "$work/$t" -- -set_cover_merge=1 -use_counters=0 \
        > "$work/$t.merge.log" 2>&1 && rm -rf "fuzz/corpus/$t" && mv "$work/$t.min" "fuzz/corpus/$t"
    shopt -s nullglob
    local crashes=(fuzz/artifacts/"$t"/*)
    if [ ${#crashes[@]} -gt 0 ]; then
        mkdir -p "fuzz/regressions/$t"
        cp "${crashes[@]}" "fuzz/regressions/$t/"
    fi
}
jobs_max="${JOBS:-1}"
for t in "${targets[@]}"; do
    run_one "$t" &
    while [ "$(jobs -rp | wc -l)" -ge "$jobs_max" ]; do wait -n; done
done
wait
printf '| target | executions | exec/s | coverage (edges) | features | corpus files (bytes) | crashes |\n|---|---|---|---|---|---|---|\n'
for t in "${targets[@]}"; do
    t=${t%%:*}
    log="$work/$t.log"
    execs=$(sed -n 's/^stat::number_of_executed_units: *//p' "$log" | tail -1)
    rate=$(sed -n 's/^stat::average_exec_per_sec: *//p' "$log" | tail -1)
    cov=$(grep -o 'cov: [0-9]*' "$log" | tail -1 | cut -d' ' -f2)
    ft=$(grep -o 'ft: [0-9]*' "$log" | tail -1 | cut -d' ' -f2)
    files=$(find "fuzz/corpus/$t" -type f | wc -l)
    bytes=$(du -sb "fuzz/corpus/$t" | cut -f1)
    crashes=$(find "fuzz/artifacts/$t" -type f 2>/dev/null | wc -l)
    printf '| %s | %s | %s | %s | %s | %s (%s) | %s |\n' "$t" "${execs:-?}" "${rate:-?}" "${cov:-?}" "${ft:-?}" "$files" "$bytes" "$crashes"
done
