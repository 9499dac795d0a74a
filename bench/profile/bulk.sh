#!/usr/bin/env bash
# Profiles the 1-stream bulk run of tether-bench and prints where each CPU second per GB goes.
#
#   bench/profile/bulk.sh quic|tcp [NAME]     (root; perf from Debian's linux-perf, and
#                                              inferno: cargo install inferno --locked)
#
# Builds nothing: it runs target/release/tether-bench. Writes /tmp/profile-NAME.{data,folded}
# and docs-ready flame graph /tmp/profile-NAME.svg (agent and server threads only).
set -euo pipefail
transport=${1:?quic or tcp}
name=${2:-$transport}
here=$(cd "$(dirname "$0")" && pwd)
bin="$here/../../target/release"
out=/tmp/profile-$name
"$bin/tether-bench" --reps 1 --bulk-secs 5 --rr-count 2000 --crr-secs 1 --hold 50 --scale 0 \
  --no-failover --transports "$transport" --out "$out.bench" > "$out.log" 2>&1 &
bench=$!
# The bulk run over tether starts right after the direct one: record 2 s in its middle.
for _ in $(seq 1 900); do grep -q "bulk1 direct" "$out.log" 2>/dev/null && break; sleep 0.1; done
sleep 0.8
perf record -a --call-graph dwarf,32768 -F 499 -o "$out.data" -- sleep 2 >/dev/null 2>&1
wait "$bench"
rate=$(sed -n 's/.*bulk1 tether[^:]*: \([0-9.]*\) Gbit.*/\1/p' "$out.log")
echo "bulk, 1 stream: $rate Gbit/s"
perf script -i "$out.data" 2>/dev/null | inferno-collapse-perf > "$out.folded"
grep -E "^(tether-agent|tokio-rt-worker|tether-server)" "$out.folded" \
  | inferno-flamegraph --minwidth 0.3 --title "$name bulk (agent and server threads)" > "$out.svg"
python3 "$here/kinds.py" "$out.folded" "$rate" 2
