#!/usr/bin/env bash
# Broker benchmarks against the real binary, fsync never, 100-byte values, for each runtime.
# Latency runs alternate raw TCP ping-pong and sync Produce (ROUNDS times each) so both see the
# same machine state; the p50s are printed per round. Throughput runs follow, then 10 000 held
# connections and the server's RSS per connection.
#
#   scripts/bench-broker.sh [tokio smol blocking]      # env: ROUNDS=3 SECS=3 CONNS=10000
set -euo pipefail
cd "$(dirname "$0")/.."
cargo build -q --release -p streambus-server -p streambus-tests
B="$PWD/target/release"
ROUNDS="${ROUNDS:-3}"; SECS="${SECS:-3}"; CONNS="${CONNS:-10000}"
runtimes=("$@"); [[ ${#runtimes[@]} -gt 0 ]] || runtimes=(tokio smol blocking)
work="$(mktemp -d)"; trap 'kill "${PID:-0}" 2>/dev/null || true; rm -rf "$work"' EXIT
port=19092
echo "machine: $(nproc) vCPU, $(uname -r), $(grep -m1 'model name' /proc/cpuinfo | cut -d: -f2 | xargs)"
for rt in "${runtimes[@]}"; do
    port=$((port + 1))
    "$B/streambus-server" --listen "127.0.0.1:$port" --data-dir "$work/$rt" --fsync never \
        --metrics-listen off --runtime "$rt" >"$work/$rt.log" 2>&1 &
    PID=$!
    sleep 0.5
    a="--addr 127.0.0.1:$port --duration ${SECS}s"
    echo "== runtime $rt"
    for ((i = 1; i <= ROUNDS; i++)); do
        pp=$("$B/streambus-bench" $a pingpong | sed -E 's/.*p50=([0-9.]+)µs.*/\1/')
        sy=$("$B/streambus-bench" $a sync | sed -E 's/.*p50=([0-9.]+)µs.*/\1/')
        awk -v r="$i" -v p="$pp" -v s="$sy" 'BEGIN { printf "round %d: ping-pong p50 %.1f µs, sync produce p50 %.1f µs, ratio %.2f\n", r, p, s, s / p }'
    done
    "$B/streambus-bench" $a sync
    "$B/streambus-bench" $a pipelined
    "$B/streambus-bench" $a fetch | sed -n 1p
    "$B/streambus-bench" $a connections -n "$CONNS" --server-pid "$PID" | tail -n 1
    kill "$PID"; wait "$PID" || true
done
