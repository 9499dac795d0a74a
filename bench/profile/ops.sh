#!/usr/bin/env bash
# Profiles the pinned round trip (rr) or the new connections (crr) of tether-bench and prints
# where each CPU microsecond of one operation goes, by process and kind of work.
#
#   bench/profile/ops.sh rr|crr quic|tcp [NAME]   (root; perf from Debian's linux-perf, and
#                                                  inferno: cargo install inferno --locked)
#
# Builds nothing: it runs target/release/tether-bench. The microseconds per operation of each
# process come from the bench (/proc, over the whole run); the profile (2 s in the middle of
# it) splits each process's share by kind. Writes /tmp/profile-NAME.{data,folded,svg}.
set -euo pipefail
op=${1:?rr or crr}
transport=${2:?quic or tcp}
name=${3:-$op-$transport}
here=$(cd "$(dirname "$0")" && pwd)
bin="$here/../../target/release"
out=/tmp/profile-$name
case $op in
  rr) metric=rr1cpu; args=(--rr-count 40000 --crr-secs 1) ;;
  crr) metric=crr; args=(--rr-count 2000 --crr-secs 6) ;;
  *) echo "rr or crr" >&2; exit 2 ;;
esac
"$bin/tether-bench" --reps 1 --bulk-secs 1 "${args[@]}" --hold 50 --scale 0 --no-failover \
  --transports "$transport" --out "$out.bench" > "$out.log" 2>&1 &
bench=$!
# The path's run starts right after the direct one: record 2 s in its first half.
for _ in $(seq 1 1800); do grep -q "rep 1 $metric direct" "$out.log" 2>/dev/null && break; sleep 0.1; done
sleep 0.5
perf record -a --call-graph dwarf,16384 -F 999 -o "$out.data" -- sleep 2 >/dev/null 2>&1
wait "$bench"
grep "rep 1 $metric" "$out.log"
per() { python3 -c "import json,sys; r=json.load(open('$out.bench/results.json')); v=[x['median'] for x in r['summary'] if x['metric']=='${metric}_cpu_us_$1' and x['path']!='direct']; print(v[0] if v else 0)"; }
perf script -i "$out.data" 2>/dev/null | inferno-collapse-perf > "$out.folded"
grep -E "^(tether-agent|tokio-rt-worker|tether-server)" "$out.folded" \
  | inferno-flamegraph --minwidth 0.3 --title "$name (agent and server threads)" > "$out.svg"
python3 "$here/kinds.py" "$out.folded" --per-op "$(per bench)" "$(per agent)" "$(per server)"
