#!/usr/bin/env bash
# Issue 16's cluster benchmarks on one machine, in one run: three `streambus-server --fsync
# never` brokers (data on /dev/shm when there is one) with two topics of 6 partitions, `rf3`
# (`topics create -r 3`) and `rf1` (`-r 1`), placed alike (leaders spread over the three).
#
#   scripts/bench-cluster.sh           # env: ROUNDS=4 SECS=5 KILLS=10
#
# Per round, RF 3 and RF 1 alternating which goes first: the SDK's batching producer
# (`streambus --broker A,B,C bench produce`, 100-byte records, messages/s acknowledged) and its
# produce round trip (`bench roundtrip`, one record awaited at a time, p50); then the RF 3 ÷ RF 1
# ratios. Then the failover time: the ignored test
# `failover_time_from_a_leader_kill_to_the_first_acknowledged_produce` (release build; its own
# three brokers, as child processes) SIGKILLs partition 0's leader $KILLS times (each time
# once the restarted victim's replica caught up) and prints the time from the kill to the
# first produce the new leader acknowledged and to the SDK's send acknowledged, p50 and max.
set -euo pipefail
cd "$(dirname "$0")/.."
cargo build -q --release -p streambus-server -p streambus-cli
B="$PWD/target/release"
ROUNDS="${ROUNDS:-4}"; SECS="${SECS:-5}"; KILLS="${KILLS:-10}"
base=/dev/shm; [[ -d $base && -w $base ]] || base="${TMPDIR:-/tmp}"
root="$(mktemp -d -p "$base")"
PIDS=()
trap 'for p in "${PIDS[@]}"; do kill "$p" 2>/dev/null || true; done; wait 2>/dev/null || true; rm -rf "$root"' EXIT

P=1=127.0.0.1:19301,2=127.0.0.1:19302,3=127.0.0.1:19303
BROKERS=127.0.0.1:19091,127.0.0.1:19092,127.0.0.1:19093
for n in 1 2 3; do
    "$B/streambus-server" --node-id $n --listen 127.0.0.1:1909$n --metrics-listen off \
        --data-dir "$root/data$n" --cluster-listen 127.0.0.1:1930$n --peers $P --fsync never \
        2>"$root/broker$n.log" &
    PIDS+=($!)
done
for n in 1 2 3; do
    for _ in $(seq 300); do
        [[ "$("$B/streambus" --broker 127.0.0.1:1909$n cluster status 2>/dev/null | grep -c '^[1-3] ')" = 3 ]] && break
        sleep 0.1
    done
done
"$B/streambus" --broker $BROKERS topics create rf3 --partitions 6 --replication-factor 3 >/dev/null
"$B/streambus" --broker $BROKERS topics create rf1 --partitions 6 --replication-factor 1 >/dev/null
# Warm-up (untimed): the first produce waits for the partitions' first elections.
for t in rf3 rf1; do
    "$B/streambus" --broker $BROKERS bench produce -t $t -n 20000 >/dev/null
done
"$B/streambus" --broker 127.0.0.1:19091 cluster status

# A failed run (say, records refused NotLeader past their retries while leaders moved) prints
# its error to stderr and yields no figure; the round then says so instead of a ratio.
bench() { "$B/streambus" --broker $BROKERS bench "$@" --json || true; }
rate() { sed -nE 's/.*"messages_per_sec":([0-9.e+]+).*/\1/p' | awk '{ print $1 / 1e6 }'; }
p50() { sed -nE 's/.*"latency_ns":\{"p50":([0-9]+).*/\1/p' | awk '{ print $1 / 1000 }'; }

echo "machine: $(nproc) vCPU, $(uname -r), load $(cut -d' ' -f1-3 /proc/loadavg)"
ratios=(); rt_ratios=()
for ((i = 1; i <= ROUNDS; i++)); do
    if ((i % 2)); then order="rf3 rf1"; else order="rf1 rf3"; fi
    declare -A prod=() rt=()
    for t in $order; do
        prod[$t]=$(bench produce -t $t --duration "${SECS}s" | rate)
        rt[$t]=$(bench roundtrip -t $t --duration "${SECS}s" | p50)
    done
    if [[ -z ${prod[rf3]} || -z ${prod[rf1]} || -z ${rt[rf3]} || -z ${rt[rf1]} ]]; then
        echo "round $i ($order): a run failed (above), no ratio"
        unset prod rt
        continue
    fi
    r=$(awk -v a="${prod[rf3]}" -v b="${prod[rf1]}" 'BEGIN { printf "%.3f", a / b }')
    q=$(awk -v a="${rt[rf3]}" -v b="${rt[rf1]}" 'BEGIN { printf "%.3f", a / b }')
    ratios+=("$r"); rt_ratios+=("$q")
    echo "round $i ($order): batching producer RF 3 ${prod[rf3]} M msg/s, RF 1 ${prod[rf1]} M msg/s, RF 3 / RF 1 = $r; round trip p50 RF 3 ${rt[rf3]} µs, RF 1 ${rt[rf1]} µs, RF 3 / RF 1 = $q"
    unset prod rt
done
median() { printf '%s\n' "$@" | sort -g | awk '{ a[NR] = $1 } END { print (NR % 2) ? a[(NR + 1) / 2] : (a[NR / 2] + a[NR / 2 + 1]) / 2 }'; }
echo "median over ${#ratios[@]} of $ROUNDS rounds: throughput RF 3 / RF 1 = $(median "${ratios[@]}"), round trip p50 RF 3 / RF 1 = $(median "${rt_ratios[@]}")"
echo "load after: $(cut -d' ' -f1-3 /proc/loadavg)"
for p in "${PIDS[@]}"; do kill "$p" 2>/dev/null || true; done
wait 2>/dev/null || true
PIDS=()

CLUSTER_FAILOVER_KILLS=$KILLS cargo test -q --release -p streambus-tests --test cluster -- \
    --ignored --exact failover_time_from_a_leader_kill_to_the_first_acknowledged_produce \
    --nocapture 2>/dev/null | grep -E '^(kill|failover)'
