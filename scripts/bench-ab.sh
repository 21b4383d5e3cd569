#!/usr/bin/env bash
# A/B of two broker binaries in single-broker mode (tokio, fsync never), in alternating rounds
# on the same machine, with this tree's `streambus bench` as the load generator: the sync
# Produce p50 and the pipelined Produce rate of each, per round. Compare the ratios, not the
# absolute figures.
#
#   scripts/bench-ab.sh BASE_SERVER NEW_SERVER      # env: ROUNDS=4 SECS=3 ORDER="base new"
# e.g. a base build: git archive <commit> | tar -x -C /tmp/base &&
#      (cd /tmp/base && cargo build --release -p streambus-server)
set -euo pipefail
cd "$(dirname "$0")/.."
[[ $# -eq 2 ]] || { echo "usage: $0 BASE_SERVER NEW_SERVER" >&2; exit 2; }
cargo build -q --release -p streambus-cli
CLI="$PWD/target/release/streambus"
ROUNDS="${ROUNDS:-4}"; SECS="${SECS:-3}"
work="$(mktemp -d)"
"$1" --listen 127.0.0.1:19181 --data-dir "$work/base" --fsync never --metrics-listen off 2>"$work/base.log" &
PB=$!
"$2" --listen 127.0.0.1:19182 --data-dir "$work/new" --fsync never --metrics-listen off 2>"$work/new.log" &
PN=$!
trap 'kill $PB $PN 2>/dev/null || true; rm -rf "$work"' EXIT
for port in 19181 19182; do
    for _ in $(seq 100); do (exec 3<>"/dev/tcp/127.0.0.1/$port") 2>/dev/null && break; sleep 0.05; done
done
get() { python3 -c 'import json,sys; d=json.load(sys.stdin); print(round(d["latency_ns"]["p50"]/1e3, 1) if sys.argv[1]=="p50" else round(d["messages_per_sec"]/1e6, 2))' "$1"; }
echo "load average: $(cut -d' ' -f1-3 /proc/loadavg)"
for ((i = 1; i <= ROUNDS; i++)); do
    for v in ${ORDER:-base new}; do
        port=19181; [[ $v == new ]] && port=19182
        sy=$("$CLI" --broker "127.0.0.1:$port" bench pipeline -t sync --batch 1 --in-flight 1 -d "${SECS}s" --json | get p50)
        tp=$("$CLI" --broker "127.0.0.1:$port" bench pipeline -t pipe -d "${SECS}s" --json | get rate)
        echo "round $i $v: sync produce p50 $sy µs, pipelined $tp M msg/s"
    done
done
echo "load average: $(cut -d' ' -f1-3 /proc/loadavg)"
