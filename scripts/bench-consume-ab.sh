#!/usr/bin/env bash
# Same-run A/B of the SDK consumer (`examples/bench consume`: 1 MiB long-poll fetches of 1 KiB
# records) for any number of SDK builds, each against raw `streambus bench fetch --size 1024` of
# the same round: a fresh `--fsync never` broker per run (data on /dev/shm when there is one).
#
#   scripts/bench-consume-ab.sh <bench> [<bench> ...]   # env: ROUNDS=5 SECS=3
#
# Build each side with `cargo build --release -p streambus-client --example bench` and copy
# target/release/examples/bench away; the broker and raw generator are this tree's release build.
set -euo pipefail
cd "$(dirname "$0")/.."
cargo build -q --release -p streambus-server -p streambus-cli
B="$PWD/target/release"
ROUNDS="${ROUNDS:-5}"; SECS="${SECS:-3}"; port=19378
base=/dev/shm; [[ -d $base && -w $base ]] || base="${TMPDIR:-/tmp}"
PID=0; dir=""
trap 'if ((PID > 0)); then kill "$PID" 2>/dev/null || true; fi; if [[ -n $dir ]]; then rm -rf "$dir"; fi' EXIT
fresh() {
    dir="$(mktemp -d -p "$base")"
    "$B/streambus-server" --listen "127.0.0.1:$port" --data-dir "$dir" --fsync never \
        --metrics-listen off >/dev/null 2>&1 &
    PID=$!
    for _ in $(seq 50); do "$B/streambus" -b "127.0.0.1:$port" health >/dev/null 2>&1 && break; sleep 0.1; done
    "$@" || true
    kill "$PID"; wait "$PID" 2>/dev/null || true
    PID=0; rm -rf "$dir"; dir=""
}
ratio() { awk -v a="$1" -v b="$2" 'BEGIN { if (b > 0) printf "%.2f", a / b; else print "?" }'; }
echo "machine: $(nproc) vCPU, load $(cut -d' ' -f1-3 /proc/loadavg)"
for ((i = 1; i <= ROUNDS; i++)); do
    raw=$(fresh "$B/streambus" -b "127.0.0.1:$port" bench --duration "${SECS}s" --json fetch --size 1024 |
        sed -nE 's/.*"messages_per_sec":([0-9.e+]+).*/\1/p' | awk '{ print $1 / 1e6 }')
    line="round $i (load $(cut -d' ' -f1 /proc/loadavg)): raw fetch $raw M rec/s"
    for bin in "$@"; do
        v=$(fresh "$bin" "127.0.0.1:$port" consume "$SECS" |
            sed -nE 's/.*\(([0-9]+) records in ([0-9.]+)s\).*/\1 \2/p' | awk '{ print $1 / $2 / 1e6 }')
        line="$line; $bin $v M rec/s ($(ratio "$v" "$raw")x)"
    done
    echo "$line"
done
