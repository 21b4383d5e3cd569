#!/usr/bin/env bash
# Fuzzing campaign: runs every cargo-fuzz target for a given time on the corpus in the repo
# (fuzz/corpus/<target>), then minimises each corpus with `cargo fuzz cmin`, and prints each
# target's executions (libFuzzer's stat::number_of_executed_units), the total and a one-line
# verdict. It never commits: review `git status fuzz/corpus` and commit what you want to keep.
#
# Usage: fuzz/campaign.sh [SECONDS_PER_TARGET]       (or FUZZ_SECONDS; default 60)
#   FUZZ_TARGETS="a b"   targets to run (default: every target, `cargo fuzz list`)
#   FUZZ_PARALLEL=N      targets run at the same time (default 1)
#   FUZZ_CMIN=0          skip the minimisation
#   FUZZ_SANITIZER=none  build without AddressSanitizer (5-10 times the executions; our crates
#                        have no unsafe code), in fuzz/target/sanitizer-none (default: address)
#   FUZZ_LOG_DIR=dir     where the logs go (default: a new temporary directory)
# Run it at low priority on a shared machine: `nice -n 19 fuzz/campaign.sh 600`.
#
# Bounded: each run is killed 5 minutes after its time is up. Exits 1 if any target crashed
# (or hung, or ran out of memory), naming the target and its artifact; 2 on a usage or
# build error.
set -uo pipefail
cd "$(dirname "$0")"

seconds="${1:-${FUZZ_SECONDS:-60}}"
if ! [[ "$seconds" =~ ^[1-9][0-9]*$ ]]; then
    echo "usage: $0 [SECONDS_PER_TARGET]" >&2
    exit 2
fi
parallel="${FUZZ_PARALLEL:-1}"
sanitizer="${FUZZ_SANITIZER:-address}"
build_args=(-s "$sanitizer")
if [[ "$sanitizer" != address ]]; then
    # Its own target directory, so the default (ASan) build stays as it is.
    build_args+=(--target-dir "target/sanitizer-$sanitizer")
fi
logs="${FUZZ_LOG_DIR:-$(mktemp -d -t streambus-fuzz-campaign.XXXXXX)}"
mkdir -p "$logs"

if [[ -n "${FUZZ_TARGETS:-}" ]]; then
    read -r -a targets <<<"$FUZZ_TARGETS"
else
    mapfile -t targets < <(cargo +nightly fuzz list)
fi
if [[ ${#targets[@]} -eq 0 ]]; then
    echo "campaign: no fuzz targets" >&2
    exit 2
fi

echo "campaign: ${#targets[@]} targets x ${seconds}s (${parallel} at a time, sanitizer $sanitizer), logs in $logs"
if ! cargo +nightly fuzz build "${build_args[@]}" >"$logs/build.log" 2>&1; then
    tail -n 40 "$logs/build.log"
    echo "campaign: FAILED: build (see $logs/build.log)" >&2
    exit 2
fi

corpus_size() { # files and bytes (their contents, not disk blocks) of a corpus directory
    printf '%s files, %s bytes' "$(find "$1" -type f | wc -l)" "$(find "$1" -type f -printf '%s\n' | awk '{ s += $1 } END { print s + 0 }')"
}

declare -A before grown
run_target() {
    local t="$1"
    # -timeout: one input taking longer is a hang (reported like a crash).
    timeout --kill-after=30 "$((seconds + 300))" \
        cargo +nightly fuzz run "${build_args[@]}" "$t" "corpus/$t" -- \
        -max_total_time="$seconds" -print_final_stats=1 -timeout=30 \
        >"$logs/$t.log" 2>&1
    echo $? >"$logs/$t.rc"
}

for t in "${targets[@]}"; do
    mkdir -p "corpus/$t"
    before[$t]="$(corpus_size "corpus/$t")"
done

running=0
for t in "${targets[@]}"; do
    run_target "$t" &
    running=$((running + 1))
    if [[ $running -ge $parallel ]]; then
        wait -n
        running=$((running - 1))
    fi
done
wait

total=0
failed=()
for t in "${targets[@]}"; do
    grown[$t]="$(corpus_size "corpus/$t")"
    rc="$(cat "$logs/$t.rc" 2>/dev/null || echo 1)"
    units="$(grep -o 'stat::number_of_executed_units: *[0-9]*' "$logs/$t.log" | tail -n 1 | grep -o '[0-9]*$')"
    units="${units:-0}"
    total=$((total + units))
    printf 'campaign: %-18s stat::number_of_executed_units: %s\n' "$t" "$units"
    if [[ "$rc" != 0 ]]; then
        artifact="$(grep -o 'Test unit written to [^ ]*' "$logs/$t.log" | tail -n 1 | sed 's/Test unit written to //')"
        failed+=("$t")
        echo "campaign: $t FAILED (exit $rc), artifact: ${artifact:-none} (log: $logs/$t.log)" >&2
        grep -m 1 -B 2 -A 12 -E 'panicked at|ERROR: libFuzzer|ERROR: AddressSanitizer' "$logs/$t.log" >&2 || tail -n 20 "$logs/$t.log" >&2
    fi
done
echo "campaign: total stat::number_of_executed_units: $total"

if [[ "${FUZZ_CMIN:-1}" != 0 ]]; then
    for t in "${targets[@]}"; do
        # cmin renames every file it keeps to the SHA-1 of its contents and may drop seeds:
        # every named input (the golden_* seeds of fuzz/gen_corpus.py, the regression-* inputs
        # of fixed bugs, ...) is put back under its name.
        keep="$logs/$t.golden"
        mkdir -p "$keep"
        find "corpus/$t" -maxdepth 1 -type f -regextype posix-extended ! -regex '.*/[0-9a-f]{40}' -exec cp {} "$keep/" \;
        if ! timeout --kill-after=30 3600 cargo +nightly fuzz cmin "${build_args[@]}" "$t" "corpus/$t" >"$logs/$t.cmin.log" 2>&1; then
            echo "campaign: cmin of $t failed (log: $logs/$t.cmin.log)" >&2
            failed+=("$t(cmin)")
        fi
        for g in "$keep"/*; do
            [[ -e "$g" ]] || continue
            rm -f "corpus/$t/$(sha1sum "$g" | cut -d' ' -f1)"
            cp "$g" "corpus/$t/"
        done
        echo "campaign: corpus $t: ${before[$t]} at start, ${grown[$t]} after fuzzing, $(corpus_size "corpus/$t") after cmin"
    done
fi

if [[ ${#failed[@]} -gt 0 ]]; then
    echo "campaign: FAILED: ${failed[*]}; $total executions in ${#targets[@]} targets x ${seconds}s"
    exit 1
fi
echo "campaign: OK: $total executions in ${#targets[@]} targets x ${seconds}s, no crash"
