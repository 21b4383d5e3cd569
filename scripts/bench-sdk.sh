#!/usr/bin/env bash
# The client SDK against the raw load generator in the same run (issue 10's ratios): each mode
# gets a fresh `streambus-server --fsync never` (data on /dev/shm when there is one, removed
# after: the pipelined modes write gigabytes), and the modes alternate round by round so both
# sides see the same machine state.
#
#   scripts/bench-sdk.sh               # env: ROUNDS=3 SECS=3 BENCH_RT=current (SDK on one thread)
#                                      #      IDEMPOTENCE=true (both sides; false: both plain)
#                                      #      BENCH_MAX_IN_FLIGHT=5 (the SDK producer's batches in flight per partition)
#
# Per round: raw TCP ping-pong p50, raw sync Produce p50 and the SDK's sync produce p50
# (`Producer::send`, one record awaited at a time); then raw `pipeline --batch 100` and the
# SDK's batching producer on one connection (`enqueue` per record, `enqueue_many` of 1 000
# records a call with a `Delivery` each, and the same into one `Deliveries` a call), in
# messages/s acknowledged; then HealthChecks from
# 50 connections × 64 in flight raw against 3 200 tasks calling `Client::health` on one client
# of 50 × 64; raw `fetch --size 1024` (1 MiB Fetches over 64 MiB of 1 KiB records) against the
# SDK's consumer (1 MiB fetches) in records/s; and the ratios.
set -euo pipefail
cd "$(dirname "$0")/.."
cargo build -q --release -p streambus-server -p streambus-cli
cargo build -q --release -p streambus-client --example bench
B="$PWD/target/release"
ROUNDS="${ROUNDS:-3}"; SECS="${SECS:-3}"
# The SDK's producer and the raw produce modes alike: idempotent (the SDK's default), or not.
IDEMPOTENCE="${IDEMPOTENCE:-true}"
export BENCH_IDEMPOTENCE="$IDEMPOTENCE"
base=/dev/shm; [[ -d $base && -w $base ]] || base="${TMPDIR:-/tmp}"
port=19192
PID=0; dir=""
# `fresh` runs in command substitutions (subshells): each stops its broker and removes its data
# itself; this only covers an interrupt of the shell's own state.
trap 'if ((PID > 0)); then kill "$PID" 2>/dev/null || true; fi; if [[ -n $dir ]]; then rm -rf "$dir"; fi' EXIT

# Runs "$@" against a fresh broker on $port; the broker is stopped and its data removed after.
fresh() {
    dir="$(mktemp -d -p "$base")"
    "$B/streambus-server" --listen "127.0.0.1:$port" --data-dir "$dir" --fsync never \
        --metrics-listen off >"$dir.log" 2>&1 &
    PID=$!
    for _ in $(seq 50); do
        "$B/streambus" -b "127.0.0.1:$port" health >/dev/null 2>&1 && break
        sleep 0.1
    done
    "$@" || true
    kill "$PID"; wait "$PID" 2>/dev/null || true
    rm -rf "$dir" "$dir.log"; dir=""
}
raw() { fresh "$B/streambus" -b "127.0.0.1:$port" bench --duration "${SECS}s" --json "$@"; }
# The p50 latency in µs and the messages/s of a `streambus bench --json` line.
p50() { sed -nE 's/.*"latency_ns":\{"p50":([0-9]+).*/\1/p' | awk '{ print $1 / 1000 }'; }
rate() { sed -nE 's/.*"messages_per_sec":([0-9.e+]+).*/\1/p' | awk '{ print $1 / 1e6 }'; }
sdk() { fresh "$B/examples/bench" "127.0.0.1:$port" "$1" "$SECS"; }

echo "machine: $(nproc) vCPU, $(uname -r), load $(cut -d' ' -f1-3 /proc/loadavg); idempotence $IDEMPOTENCE on both sides"
for ((i = 1; i <= ROUNDS; i++)); do
    pp=$(raw pingpong | p50)
    sy=$(raw pipeline --batch 1 --in-flight 1 --idempotence "$IDEMPOTENCE" | p50)
    sdk_sy=$(sdk sync | sed -nE 's/.* p50 ([0-9.]+)µs.*/\1/p')
    pipe=$(raw pipeline --batch 100 --idempotence "$IDEMPOTENCE" | rate)
    sdk_pipe=$(sdk produce | sed -nE 's/.*= ([0-9.]+) M msg\/s.*/\1/p')
    sdk_many=$(sdk produce-many | sed -nE 's/.*= ([0-9.]+) M msg\/s.*/\1/p')
    sdk_all=$(sdk produce-all | sed -nE 's/.*= ([0-9.]+) M msg\/s.*/\1/p')
    fetch=$(raw fetch --size 1024 | rate)
    sdk_fetch=$(sdk consume | sed -nE 's/.*\(([0-9]+) records in ([0-9.]+)s\).*/\1 \2/p' | awk '{ print $1 / $2 / 1e6 }')
    req=$(raw requests --connections 50 --in-flight 64 | rate)
    sdk_req=$(sdk health | sed -nE 's/.*= ([0-9.]+) M req\/s.*/\1/p')
    awk -v r="$i" -v pp="$pp" -v sy="$sy" -v s="$sdk_sy" -v p="$pipe" -v sp="$sdk_pipe" -v sm="$sdk_many" -v sa="$sdk_all" -v q="$req" -v sq="$sdk_req" -v f="$fetch" -v sf="$sdk_fetch" 'BEGIN {
        printf "round %d: ping-pong %.1f µs, raw sync %.1f µs, SDK sync %.1f µs (%.2f× ping-pong, %.2f× raw sync); raw pipelined %.2f M msg/s, SDK batching %.2f M msg/s (%.2f×), enqueue_many %.2f M msg/s (%.2f×), into Deliveries %.2f M msg/s (%.2f×); fetch 1 MiB of 1 KiB records raw %.2f M msg/s, SDK consumer %.2f M msg/s (%.2f×); HealthCheck 50 × 64 raw %.2f M req/s, SDK (3 200 tasks, one Client) %.2f M req/s (%.2f×)\n",
            r, pp, sy, s, s / pp, s / sy, p, sp, sp / p, sm, sm / p, sa, sa / p, f, sf, sf / f, q, sq, sq / q }'
done
