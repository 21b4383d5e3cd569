#!/usr/bin/env bash
# Same-run A/B of the SDK's sync produce p50 (`examples/bench sync`: one record awaited at a time)
# for two builds of the SDK against the same broker: a fresh `--fsync never` broker per round
# (data on /dev/shm when there is one), the two bench binaries alternating which goes first.
#
#   scripts/bench-sdk-ab.sh <base bench> <new bench> [server]   # env: ROUNDS=6 SECS=3
#
# Build each side with `cargo build --release -p streambus-client --example bench` and copy
# target/release/examples/bench away; the server defaults to target/release/streambus-server.
set -euo pipefail
cd "$(dirname "$0")/.."
BASE="$1"; NEW="$2"; SERVER="${3:-target/release/streambus-server}"
ROUNDS="${ROUNDS:-6}"; SECS="${SECS:-3}"; port=19377
base=/dev/shm; [[ -d $base && -w $base ]] || base="${TMPDIR:-/tmp}"
PID=0; dir=""
trap 'if ((PID > 0)); then kill "$PID" 2>/dev/null || true; fi; if [[ -n $dir ]]; then rm -rf "$dir"; fi' EXIT
echo "machine: $(nproc) vCPU, load $(cut -d' ' -f1-3 /proc/loadavg)"
for ((i = 1; i <= ROUNDS; i++)); do
    dir="$(mktemp -d -p "$base")"
    "$SERVER" --listen "127.0.0.1:$port" --data-dir "$dir" --fsync never --metrics-listen off >/dev/null 2>&1 &
    PID=$!
    # Up when it accepts a connection.
    for _ in $(seq 50); do (exec 3<>"/dev/tcp/127.0.0.1/$port") 2>/dev/null && break; sleep 0.1; done
    if ((i % 2)); then order="base new"; else order="new base"; fi
    declare -A p50=()
    for side in $order; do
        bin=$BASE; [[ $side == new ]] && bin=$NEW
        p50[$side]=$("$bin" "127.0.0.1:$port" sync "$SECS" | sed -nE 's/.* p50 ([0-9.]+)µs.*/\1/p')
    done
    awk -v r="$i" -v o="$order" -v b="${p50[base]}" -v n="${p50[new]}" -v l="$(cut -d' ' -f1 /proc/loadavg)" \
        'BEGIN { printf "round %d (%s): SDK sync p50 base %.2f µs, new %.2f µs, new/base %.3f (load %s)\n", r, o, b, n, n / b, l }'
    kill "$PID"; wait "$PID" 2>/dev/null || true; PID=0
    rm -rf "$dir"; dir=""
done
