#!/usr/bin/env bash
# TLS against plaintext, in the same run, on each runtime: a plaintext and a TLS broker
# (--fsync never) run side by side and the load generator alternates between them.
#   - sync Produce p50 (1 × 100 B, one in flight), ROUNDS rounds each  (target: TLS ≤ 1.2×)
#   - Fetch of 1 MiB per request on one connection, GB/s (plaintext goes out with sendfile;
#     TLS copies through a buffer)                                      (target: TLS ≥ 0.5×)
#   - fresh connections + one HealthCheck each: full TLS handshakes (no resumption) per
#     second of the broker's CPU time, i.e. on one core, beside plaintext connections
#
#   scripts/bench-tls.sh [tokio smol blocking]      # env: ROUNDS=3 SECS=3
set -euo pipefail
cd "$(dirname "$0")/.."
cargo build -q --release -p streambus-server -p streambus-cli
B="$PWD/target/release"
ROUNDS="${ROUNDS:-3}"; SECS="${SECS:-3}"
runtimes=("$@"); [[ ${#runtimes[@]} -gt 0 ]] || runtimes=(tokio smol blocking)
work="$(mktemp -d)"
pids=()
trap 'for p in "${pids[@]}"; do kill "$p" 2>/dev/null || true; done; rm -rf "$work"' EXIT
scripts/tls-certs.sh "$work/tls" >/dev/null
tls=(--tls-cert "$work/tls/server.pem" --tls-key "$work/tls/server-key.pem")
# From a `streambus bench --json` line: the p50 latency in µs, and MB/s as GB/s.
p50() { sed -E 's/.*"latency_ns":\{"p50":([0-9]+).*/\1/' | awk '{ print $1 / 1000 }'; }
gbs() { sed -E 's/.*"mb_per_sec":([0-9.e+]+).*/\1/' | awk '{ print $1 / 1000 }'; }
# Waits until the broker that "$@" (streambus's connection options) reaches is healthy.
ready() {
    for _ in $(seq 100); do "$B/streambus" "$@" health >/dev/null 2>&1 && return; sleep 0.05; done
    echo "bench-tls: the broker at $* did not start" >&2; exit 1
}
echo "machine: $(nproc) vCPU, $(uname -r), load average $(cut -d' ' -f1-3 /proc/loadavg)"
port=19300
for rt in "${runtimes[@]}"; do
    plain=$((port += 1)); secure=$((port += 1))
    "$B/streambus-server" --listen "127.0.0.1:$plain" --data-dir "$work/$rt-plain" \
        --fsync never --metrics-listen off --runtime "$rt" >"$work/$rt-plain.log" 2>&1 &
    pp=$!; pids+=("$pp")
    "$B/streambus-server" --listen "127.0.0.1:$secure" --data-dir "$work/$rt-tls" \
        --fsync never --metrics-listen off --runtime "$rt" "${tls[@]}" >"$work/$rt-tls.log" 2>&1 &
    tp=$!; pids+=("$tp")
    ready -b "127.0.0.1:$plain"
    ready -b "localhost:$secure" --tls-ca "$work/tls/ca.pem"
    P=(-b "127.0.0.1:$plain" bench --duration "${SECS}s" --json)
    T=(-b "localhost:$secure" --tls-ca "$work/tls/ca.pem" bench --duration "${SECS}s" --json)
    echo "== runtime $rt"
    for ((i = 1; i <= ROUNDS; i++)); do
        a=$("$B/streambus" "${P[@]}" pipeline --batch 1 --in-flight 1 | p50)
        b=$("$B/streambus" "${T[@]}" pipeline --batch 1 --in-flight 1 | p50)
        awk -v r="$i" -v a="$a" -v b="$b" 'BEGIN { printf "round %d: sync produce p50 plaintext %.1f µs, TLS %.1f µs, ratio %.2f\n", r, a, b, b / a }'
    done
    for ((i = 1; i <= ROUNDS; i++)); do
        a=$("$B/streambus" "${P[@]}" --size 1024 fetch | gbs)
        b=$("$B/streambus" "${T[@]}" --size 1024 fetch | gbs)
        awk -v r="$i" -v a="$a" -v b="$b" 'BEGIN { printf "round %d: fetch 1 MiB plaintext (sendfile) %.2f GB/s, TLS %.2f GB/s, ratio %.2f\n", r, a, b, b / a }'
    done
    for side in plain tls; do
        if [[ $side == plain ]]; then args=("${P[@]}"); pid=$pp; else args=("${T[@]}"); pid=$tp; fi
        "$B/streambus" "${args[@]}" handshakes --connections 2 --server-pid "$pid" \
            | sed -E 's/.*"messages_per_sec":([0-9.e+]+).*"connections_per_cpu_sec":([0-9.e+]+).*/\1 \2/' \
            | awk -v s="$side" '{ printf "%s: %.0f connections/s from 2 threads, %.0f per second of the broker'"'"'s CPU\n", s, $1, $2 }'
    done
    kill "$pp" "$tp"; wait "$pp" "$tp" || true
done
