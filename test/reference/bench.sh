#!/usr/bin/env bash
# Runs the `shoal bench` scenarios against the official socketcluster-server
# (this folder's server.js) and writes one JSON line per scenario to OUT.
# This is the reference half of the comparison: run the same scenarios
# against `shoal run` with --admin and put the two side by side.
#
#   test/reference/bench.sh BIN OUT.jsonl
#
# BIN is a built shoal binary (make build → bin/shoal). Sizes come from the
# environment, so a quick check and the measured run use the same script:
#
#   CONNS=10000 SUBS=1000 CHANNELS2=100 SUBS2=190 PUBS2=10 DURATION=5s test/reference/bench.sh bin/shoal ref.jsonl
#
# The defaults are small (seconds, a few hundred connections). One Node
# process can hold at most ~19,900 connections here (20,000 open files per
# process), so the 100-channel fan-out is scaled to CHANNELS2 × SUBS2 below
# that; the issue's 100 × 2,000 needs a multi-process reference.
set -euo pipefail

bin=${1:?usage: bench.sh BIN OUT.jsonl}
out=${2:?usage: bench.sh BIN OUT.jsonl}
here=$(cd "$(dirname "$0")" && pwd)
port=${PORT:-8100}
conns=${CONNS:-500}
subs=${SUBS:-200}
channels2=${CHANNELS2:-10}
subs2=${SUBS2:-20}
pubs2=${PUBS2:-10}
duration=${DURATION:-3s}
agents=${AGENTS:-2}

if [ ! -d "$here/node_modules/socketcluster-server" ]; then
  (cd "$here" && npm ci --no-audit --no-fund --loglevel=error)
fi

log=$(mktemp)
node "$here/server.js" --port "$port" >"$log" 2>&1 &
server=$!
trap 'kill "$server" 2>/dev/null || true; wait "$server" 2>/dev/null || true; rm -f "$log"' EXIT
for _ in $(seq 100); do
  grep -q '^listening' "$log" && break
  kill -0 "$server" 2>/dev/null || { cat "$log" >&2; exit 1; }
  sleep 0.1
done
grep -q '^listening' "$log" || { echo "reference server did not start" >&2; exit 1; }

url="ws://127.0.0.1:$port/socketcluster/"
common=(--url "$url" --pid "$server" --json --quiet)
: >"$out"
run() { echo "+ shoal bench $*" >&2; "$bin" bench "$@" "${common[@]}" >>"$out"; }

run conns --conns "$conns" --hold 2s
run fanout --channels 1 --subs "$subs" --publishers 1 --payload 100 --duration "$duration" --agents "$agents"
run fanout --channels "$channels2" --subs "$subs2" --publishers "$pubs2" --payload 100 --duration "$duration" --agents "$agents"
run rtt --conns 10 --duration "$duration"
run churn --conns 16 --duration "$duration"
echo "wrote $(wc -l <"$out") results to $out" >&2
