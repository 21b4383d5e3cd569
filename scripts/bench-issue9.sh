#!/usr/bin/env bash
# Issue 9 benchmarks (deferred replies), interleaved in rounds so every figure of a round saw the
# same machine:
#   - the raw ping-pong, then the sync Produce round trip (fsync never), then the ping-pong again;
#   - long-poll latency beside the sync Produce round trip (fsync never), with the consumer's
#     fetch already waiting (gap 1ms) and racing the produce (gap 0ms);
#   - `--fsync always`, 64 Produces in flight on one connection, 1 and 100 messages per request,
#     msg/s and fsyncs/s (read from the broker's /metrics);
#   - 50 connections × 64 requests in flight, HealthCheck and one-message Produce, requests/s;
#   - when BEFORE names a checkout of an older commit, its broker gets the same fsync-always and
#     requests runs in the same rounds (built there with its own target directory);
#   - Redis beside them when redis-server is installed: XADD -c 1 -P 64 with appendfsync
#     everysec, and ping_mbulk -c 50 -P 64.
# Every broker runs for the whole script on its own ports and data directory and is killed at
# the end.
#
#   scripts/bench-issue9.sh [tokio smol blocking]   # env: ROUNDS=2 SECS=3 BEFORE=/work/wt-before
#   PIPE_RUNTIMES="tokio" limits the fsync-always runs (all runtimes by default).
set -euo pipefail
cd "$(dirname "$0")/.."
cargo build -q --release -p streambus-server -p streambus-cli
B="$PWD/target/release"
OLD=""
if [[ -n "${BEFORE:-}" ]]; then
    (cd "$BEFORE" && CARGO_TARGET_DIR="$BEFORE/target" cargo build -q --release -p streambus-server)
    OLD="$BEFORE/target/release/streambus-server"
fi
ROUNDS="${ROUNDS:-2}"; SECS="${SECS:-3}"
runtimes=("$@"); [[ ${#runtimes[@]} -gt 0 ]] || runtimes=(tokio smol blocking)
read -r -a pipe_runtimes <<<"${PIPE_RUNTIMES:-${runtimes[*]}}"
work="$(mktemp -d)"
pids=()
cleanup() {
    for p in "${pids[@]}"; do kill "$p" 2>/dev/null || true; done
    for p in "${pids[@]}"; do wait "$p" 2>/dev/null || true; done
    rm -rf "$work"
}
trap cleanup EXIT

declare -A PORT
next_port=19500
wait_port() {
    for _ in $(seq 100); do
        (exec 3<>"/dev/tcp/127.0.0.1/$1") 2>/dev/null && return 0
        sleep 0.05
    done
    echo "nothing listens on port $1; see $work" >&2
    exit 1
}
# start NAME BINARY FSYNC RUNTIME: a broker on PORT[NAME], its metrics on PORT[NAME]+1.
start() {
    local name=$1 bin=$2 fsync=$3 rt=$4 port=$((next_port += 2))
    "$bin" --listen "127.0.0.1:$port" --data-dir "$work/$name" --fsync "$fsync" \
        --metrics-listen "127.0.0.1:$((port + 1))" --runtime "$rt" >"$work/$name.log" 2>&1 &
    pids+=($!)
    PORT[$name]=$port
    wait_port "$port"
}
bench() { # NAME SECONDS MODE ARGS...: `streambus bench MODE` against broker NAME
    local name=$1 secs=$2; shift 2
    "$B/streambus" --broker "127.0.0.1:${PORT[$name]}" bench "$@" --duration "${secs}s"
}
# `streambus bench pipeline` with the broker's fsyncs (from its /metrics).
pipelined() { # NAME SECONDS ARGS...
    local name=$1 secs=$2; shift 2
    bench "$name" "$secs" pipeline --metrics "127.0.0.1:$((PORT[$name] + 1))" "$@"
}
sync_rt() { bench "$1" "$2" pipeline -t bench-sync --batch 1 --in-flight 1 | head -n 2; }
pingpong() { "$B/streambus" bench pingpong --duration "${SECS}s" | head -n 2; }

echo "machine: $(nproc) vCPU, $(uname -r), $(grep -m1 'model name' /proc/cpuinfo | cut -d: -f2 | xargs)"
echo "after: $(git rev-parse --short HEAD)${OLD:+, before: $(git -C "$BEFORE" rev-parse --short HEAD)}"
for rt in "${runtimes[@]}"; do
    start "new-never-$rt" "$B/streambus-server" never "$rt"
    [[ -z "$OLD" ]] || start "old-never-$rt" "$OLD" never "$rt"
done
for rt in "${pipe_runtimes[@]}"; do
    start "new-always-$rt" "$B/streambus-server" always "$rt"
    [[ -z "$OLD" ]] || start "old-always-$rt" "$OLD" always "$rt"
done
REDIS=""
if command -v redis-server >/dev/null && command -v redis-benchmark >/dev/null; then
    REDIS=$((next_port += 2)); mkdir -p "$work/redis"
    redis-server --port "$REDIS" --bind 127.0.0.1 --dir "$work/redis" --appendonly yes \
        --appendfsync everysec --save '' >"$work/redis.log" 2>&1 &
    pids+=($!)
    wait_port "$REDIS"
    echo "redis: $(redis-server --version | cut -d' ' -f3)"
fi

for ((i = 1; i <= ROUNDS; i++)); do
    echo "== round $i"
    pingpong
    for rt in "${runtimes[@]}"; do
        for who in new old; do
            [[ $who == new || -n "$OLD" ]] || continue
            echo -n "-- $rt $who: "
            sync_rt "$who-never-$rt" "$SECS"
        done
    done
    pingpong
    for rt in "${runtimes[@]}"; do
        for gap in 1ms 0ms; do
            echo "-- $rt: longpoll, gap $gap"
            bench "new-never-$rt" "$((SECS + 1))" longpoll -t bench-longpoll --rounds 1 --gap "$gap"
        done
    done
    for rt in "${pipe_runtimes[@]}"; do
        for batch in 1 100; do
            for who in new old; do
                [[ $who == new || -n "$OLD" ]] || continue
                echo -n "-- $rt $who fsync always: "
                pipelined "$who-always-$rt" "$SECS" -t bench-pipe --in-flight 64 --batch "$batch"
            done
        done
    done
    if [[ -n "$REDIS" ]]; then
        echo -n "-- redis appendfsync everysec: "
        redis-benchmark -p "$REDIS" -c 1 -P 64 -n 200000 -q XADD s '*' f v | tr '\r' '\n' | grep -a 'per second' | tail -n 1
    fi
    for rt in "${runtimes[@]}"; do
        for kind in health produce; do
            for who in new old; do
                [[ $who == new || -n "$OLD" ]] || continue
                echo -n "-- $rt $who: "
                bench "$who-never-$rt" "$SECS" requests -t bench-requests --connections 50 --in-flight 64 --request "$kind"
            done
        done
    done
    if [[ -n "$REDIS" ]]; then
        echo -n "-- redis: "
        redis-benchmark -p "$REDIS" -c 50 -P 64 -n 2000000 -q -t ping_mbulk | tr '\r' '\n' | grep -a 'per second' | tail -n 1
    fi
done
