#!/bin/sh
# Runs the scenarios of docs/performance.md against a fresh release brokerd on loopback,
# each RUNS times (default 3), and prints one JSON object per run on stdout.
#
#   cargo build --release -p brokerd-server -p brokerctl
#   scripts/bench.sh > runs.jsonl            # or: RUNS=5 DURATION=10s PORT=17654 scripts/bench.sh
#
# The broker is started here and stopped (SIGTERM) at the end; its pid is passed to the tool so
# each run also reports the broker's CPU share. Loopback only; every run is bounded by DURATION
# plus the tool's own drain limit.
set -eu
cd "$(dirname "$0")/.."
RUNS=${RUNS:-3}
DURATION=${DURATION:-5s}
PORT=${PORT:-17654}
BIN=target/release
ADDR=127.0.0.1:$PORT

"$BIN/brokerd" --listen "$ADDR" --log-level warn &
BROKER=$!
trap 'kill "$BROKER" 2>/dev/null; wait "$BROKER" 2>/dev/null || true' EXIT INT TERM
i=0
until "$BIN/brokerctl" --server "$ADDR" pub bench.ready x >/dev/null 2>&1; do
    i=$((i + 1)); [ "$i" -lt 50 ] || { echo "brokerd did not start" >&2; exit 1; }
    sleep 0.1
done

run() {
    "$BIN/brokerctl" --server "$ADDR" bench "$@" --duration "$DURATION" --json \
        --broker-pid "$BROKER" 2>/dev/null
}
r=1
while [ "$r" -le "$RUNS" ]; do
    run pub --size 16
    run pubsub --size 16
    run pubsub --size 1024
    run fanout --subs 10 --size 16
    run topics --topics 10000 --size 16
    run latency --rate 10000 --size 16
    r=$((r + 1))
done
