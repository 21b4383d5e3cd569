#!/usr/bin/env bash
# Leadership under load: three brokers (`--fsync never`, data on /dev/shm), a topic of 6
# partitions with RF 3, and the SDK's batching producer saturating it (`streambus bench produce`
# through the bootstrap list) for 3 rounds of $SECS s; after each round, every broker's
# `streambus_partition_leader_changes_total` summed over the partitions (6 per broker: each
# partition's first leader). A leader lost under load shows as a count above 6. Add load with
# other processes (CPU hogs) to see it under a busy machine.
#
#   scripts/cluster-load.sh            # env: SECS=10
set -euo pipefail
cd "$(dirname "$0")/.."
cargo build -q --release -p streambus-server -p streambus-cli
B="$PWD/target/release"
base=/dev/shm; [[ -d $base && -w $base ]] || base="${TMPDIR:-/tmp}"
root=$(mktemp -d -p "$base")
PIDS=()
trap 'for p in "${PIDS[@]}"; do kill "$p" 2>/dev/null || true; done; wait 2>/dev/null || true; rm -rf "$root"' EXIT
P=1=127.0.0.1:19311,2=127.0.0.1:19312,3=127.0.0.1:19313
BROKERS=127.0.0.1:19081,127.0.0.1:19082,127.0.0.1:19083
for n in 1 2 3; do
  "$B/streambus-server" --node-id $n --listen 127.0.0.1:1908$n --metrics-listen 127.0.0.1:1918$n \
     --data-dir "$root/data$n" --cluster-listen 127.0.0.1:1931$n --peers $P --fsync never 2>"$root/broker$n.log" &
  PIDS+=($!)
done
for n in 1 2 3; do for _ in $(seq 300); do
  [[ "$("$B/streambus" --broker 127.0.0.1:1908$n cluster status 2>/dev/null | grep -c '^[1-3] ')" = 3 ]] && break; sleep 0.1; done; done
"$B/streambus" --broker $BROKERS topics create rf3 --partitions 6 --replication-factor 3 >/dev/null
"$B/streambus" --broker $BROKERS bench produce -t rf3 -n 20000 >/dev/null
changes() { for n in 1 2 3; do curl -s 127.0.0.1:1918$n/metrics | grep '^streambus_partition_leader_changes_total' | awk '{s+=$2} END {print s}'; done | paste -sd' '; }
echo "leader changes before (per broker, summed over partitions): $(changes); load $(cut -d' ' -f1-3 /proc/loadavg)"
for r in 1 2 3; do
  "$B/streambus" --broker $BROKERS bench produce -t rf3 --duration "${SECS:-10}s" --json 2>&1 | sed -nE 's/.*"messages_per_sec":([0-9.e+]+).*/rf3 produce: \1 msg\/s/p'
  echo "after round $r: $(changes); load $(cut -d' ' -f1-3 /proc/loadavg)"
done
