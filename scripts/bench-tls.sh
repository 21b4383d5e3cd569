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
cargo build -q --release -p streambus-server -p streambus-tests
B="$PWD/target/release"
ROUNDS="${ROUNDS:-3}"; SECS="${SECS:-3}"
runtimes=("$@"); [[ ${#runtimes[@]} -gt 0 ]] || runtimes=(tokio smol blocking)
work="$(mktemp -d)"
pids=()
trap 'for p in "${pids[@]}"; do kill "$p" 2>/dev/null || true; done; rm -rf "$work"' EXIT
scripts/tls-certs.sh "$work/tls" >/dev/null
tls=(--tls-cert "$work/tls/server.pem" --tls-key "$work/tls/server-key.pem")
p50() { sed -E 's/.*p50=([0-9.]+)µs.*/\1/'; }
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
    sleep 0.5
    P="--addr 127.0.0.1:$plain --duration ${SECS}s"
    T="--addr 127.0.0.1:$secure --duration ${SECS}s --tls-ca $work/tls/ca.pem"
    echo "== runtime $rt"
    for ((i = 1; i <= ROUNDS; i++)); do
        a=$("$B/streambus-bench" $P sync | p50)
        b=$("$B/streambus-bench" $T sync | p50)
        awk -v r="$i" -v a="$a" -v b="$b" 'BEGIN { printf "round %d: sync produce p50 plaintext %.1f µs, TLS %.1f µs, ratio %.2f\n", r, a, b, b / a }'
    done
    for ((i = 1; i <= ROUNDS; i++)); do
        a=$("$B/streambus-bench" $P fetch | sed -n 's/^fetch: \([0-9.]*\) GB.*/\1/p')
        b=$("$B/streambus-bench" $T fetch | sed -n 's/^fetch: \([0-9.]*\) GB.*/\1/p')
        awk -v r="$i" -v a="$a" -v b="$b" 'BEGIN { printf "round %d: fetch 1 MiB plaintext (sendfile) %.2f GB/s, TLS %.2f GB/s, ratio %.2f\n", r, a, b, b / a }'
    done
    "$B/streambus-bench" $P handshakes --threads 2 --server-pid "$pp" | sed -n 1p
    "$B/streambus-bench" $T handshakes --threads 2 --server-pid "$tp" | sed -n 1p
    kill "$pp" "$tp"; wait "$pp" "$tp" || true
done
