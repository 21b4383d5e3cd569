#!/usr/bin/env bash
# Issue 16's kill campaign at full size: three brokers (child processes of the test binary,
# release build), a topic with 6 partitions and RF 3, the SDK producing $RECORDS numbered
# records with idempotence on while the leader of a partition is SIGKILLed every 2 s and
# restarted ($KILLS times); then the checks of
# `sigkilling_partition_leaders_under_idempotent_produce_loses_no_acknowledged_record`
# (tests/tests/cluster.rs), whose summary line this prints with the test's verdict.
#
#   scripts/cluster-campaign.sh        # env: KILLS=5 RECORDS=100000
set -euo pipefail
cd "$(dirname "$0")/.."
KILLS="${KILLS:-5}"; RECORDS="${RECORDS:-100000}"
echo "machine: $(nproc) vCPU, $(uname -r), load $(cut -d' ' -f1-3 /proc/loadavg)"
echo "campaign: $KILLS kills, $RECORDS records (CLUSTER_CAMPAIGN_KILLS, CLUSTER_CAMPAIGN_RECORDS)"
out="$(mktemp)"
trap 'rm -f "$out"' EXIT
status=0
CLUSTER_CAMPAIGN_KILLS=$KILLS CLUSTER_CAMPAIGN_RECORDS=$RECORDS cargo test -q --release \
    -p streambus-tests --test cluster -- --exact \
    sigkilling_partition_leaders_under_idempotent_produce_loses_no_acknowledged_record \
    --nocapture >"$out" 2>&1 || status=$?
grep -E '^campaign:|panicked|test result' "$out" || true
if ((status != 0)); then
    echo "FAILED (exit $status); the test's output:"
    grep -vE '^\s*$' "$out" | tail -40
fi
exit "$status"
