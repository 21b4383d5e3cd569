#!/usr/bin/env bash
# Broker benchmarks against the real binary, fsync never, 100-byte values, for each runtime, with
# the `streambus bench` load generator. Latency runs alternate the raw TCP ping-pong and the sync
# Produce round trip (ROUNDS times each) so both see the same machine state; the p50s are
# printed per round. Throughput runs follow, then CONNS held connections and the server's RSS
# per connection.
#
#   scripts/bench-broker.sh [tokio smol blocking]      # env: ROUNDS=3 SECS=3 CONNS=10000
set -euo pipefail
cd "$(dirname "$0")/.."
cargo build -q --release -p streambus-server -p streambus-cli
B="$PWD/target/release"
ROUNDS="${ROUNDS:-3}"; SECS="${SECS:-3}"; CONNS="${CONNS:-10000}"
runtimes=("$@"); [[ ${#runtimes[@]} -gt 0 ]] || runtimes=(tokio smol blocking)
work="$(mktemp -d)"; trap 'kill "${PID:-0}" 2>/dev/null || true; rm -rf "$work"' EXIT
port=19092
wait_port() {
    for _ in $(seq 100); do
        (exec 3<>"/dev/tcp/127.0.0.1/$1") 2>/dev/null && return 0
        sleep 0.05
    done
    echo "nothing listens on port $1; see $work" >&2
    exit 1
}
# p50 in µs from a `bench --json` object.
p50() { python3 -c 'import json,sys; print(json.load(sys.stdin)["latency_ns"]["p50"] / 1e3)'; }
echo "machine: $(nproc) vCPU, $(uname -r), $(grep -m1 'model name' /proc/cpuinfo | cut -d: -f2 | xargs)"
for rt in "${runtimes[@]}"; do
    port=$((port + 1))
    "$B/streambus-server" --listen "127.0.0.1:$port" --data-dir "$work/$rt" --fsync never \
        --metrics-listen off --runtime "$rt" >"$work/$rt.log" 2>&1 &
    PID=$!
    wait_port "$port"
    bench() { "$B/streambus" --broker "127.0.0.1:$port" bench "$@"; }
    echo "== runtime $rt"
    for ((i = 1; i <= ROUNDS; i++)); do
        pp=$(bench pingpong -d "${SECS}s" --json | p50)
        sy=$(bench pipeline -t bench-sync --batch 1 --in-flight 1 -d "${SECS}s" --json | p50)
        awk -v r="$i" -v p="$pp" -v s="$sy" 'BEGIN { printf "round %d: ping-pong p50 %.1f µs, sync produce p50 %.1f µs, ratio %.2f\n", r, p, s, s / p }'
    done
    bench pipeline -t bench-sync --batch 1 --in-flight 1 -d "${SECS}s"
    bench pipeline -t bench-pipe -d "${SECS}s"
    bench fetch -t bench-fetch --size 1024 -d "${SECS}s"
    bench connections --connections "$CONNS" --server-pid "$PID" | tail -n 1
    kill "$PID"; wait "$PID" || true
done
