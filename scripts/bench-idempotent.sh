#!/usr/bin/env bash
# Idempotent vs plain produce (protocol §6.2), same broker, same run: ROUNDS rounds, each on a
# fresh broker and data directory (deleted after the round: these runs write GBs), the two
# variants in alternating order.
#
#   scripts/bench-idempotent.sh          # env: ROUNDS=6 SECS=3
#
# Per round (`streambus bench`): the sync round trip (one 1-message Produce in flight, p50; both
# variants encode every request), pipelined Produce of 100 x 100 B with 64 in flight
# (messages/s and the broker's CPU seconds per million messages, from /proc), and the SDK's
# batching producer (`streambus bench produce`, messages/s).
set -euo pipefail
cd "$(dirname "$0")/.."
cargo build -q --release -p streambus-server -p streambus-cli
B="$PWD/target/release"
ROUNDS="${ROUNDS:-6}"; SECS="${SECS:-3}"
port=19192
cpu() { awk '{ print $14 + $15 }' "/proc/$1/stat"; }
for ((r = 1; r <= ROUNDS; r++)); do
    work="$(mktemp -d)"
    "$B/streambus-server" --listen "127.0.0.1:$port" --data-dir "$work/data" \
        --metrics-listen "127.0.0.1:$((port + 1))" >"$work/server.log" 2>&1 &
    PID=$!
    trap 'kill "$PID" 2>/dev/null || true; rm -rf "$work"' EXIT
    for _ in $(seq 100); do "$B/streambus" -b "127.0.0.1:$port" health >/dev/null 2>&1 && break; sleep 0.05; done
    order=(plain idempotent); ((r % 2)) || order=(idempotent plain)
    for v in "${order[@]}"; do
        if [[ $v == idempotent ]]; then idem=true; else idem=false; fi
        a=(-b "127.0.0.1:$port" bench -t "raw-$v" --duration "${SECS}s" --idempotence "$idem" --json)
        sync=$("$B/streambus" "${a[@]}" pipeline --batch 1 --in-flight 1 \
            | sed -E 's/.*"latency_ns":\{"p50":([0-9]+).*/\1/' | awk '{ print $1 / 1000 }')
        c0=$(cpu "$PID")
        n=$("$B/streambus" "${a[@]}" pipeline --batch 100 --in-flight 64 | sed -E 's/.*"messages":([0-9]+).*/\1/')
        c1=$(cpu "$PID")
        sdk_rate=$("$B/streambus" -b "127.0.0.1:$port" bench produce -t "sdk-$v" --duration "${SECS}s" \
            --idempotence "$idem" --json | sed -E 's/.*"messages_per_sec":([0-9.]+).*/\1/')
        awk -v r="$r" -v v="$v" -v s="$sync" -v n="$n" -v c="$((c1 - c0))" -v secs="$SECS" -v k="$sdk_rate" 'BEGIN {
            printf "round %d %-10s sync p50 %5.1f us | pipelined %6.3f M msg/s, broker %.3f CPU s per M msgs | sdk produce %6.3f M msg/s\n",
                r, v, s, n / secs / 1e6, c / 100 / (n / 1e6), k / 1e6 }'
    done
    kill "$PID"; wait "$PID" 2>/dev/null || true
    rm -rf "$work"
done
