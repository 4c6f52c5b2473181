#!/bin/sh
# Issue 15's scenarios in one run against one release broker: a plain TCP relay inside brokerctl
# against pub->sub at 1 KiB (alternating, RUNS rounds), 100 publishers and 100 subscribers
# unpaced on distinct topics and on one shared topic (RUNS each), and 10,000 publishers at
# 10 msgs/s each with 10,000 subscribers, 100,000 msgs/s in all (BIG_RUNS). One JSON object per
# run on stdout, with "run" added; docs/performance.md records the figures.
#
#   cargo build --release -p brokerd-server -p brokerctl
#   scripts/bench-many.sh > many.jsonl      # or RUNS=1 BIG_RUNS=3 RAW_RUNS=0 MANY_DURATION=10s ...
#
# Builds nothing: it runs brokerd and brokerctl from BIN (default target/release, or
# $CARGO_TARGET_DIR/release). The broker listens on loopback with limits.max_connections and
# limits.max_connections_per_address raised to 25,000 (the defaults, 10,000 and 1,000, are below
# 20,000 connections from one address); max_handshakes stays 1,000, above brokerctl's 200
# connections opened at once. The descriptor limit is raised to 65,536 for both processes where
# the hard limit allows. Every run is bounded by its duration and brokerctl's own bounds.
set -eu
cd "$(dirname "$0")/.."
RUNS=${RUNS:-3}
BIG_RUNS=${BIG_RUNS:-1}
DURATION=${DURATION:-5s}
MANY_DURATION=${MANY_DURATION:-10s}
THREADS=${THREADS:-2}
BIN=${BIN:-${CARGO_TARGET_DIR:-target}/release}
ADDR=127.0.0.1:17690
CONF=$(mktemp)
PID=""
trap '[ -z "$PID" ] || kill "$PID" 2>/dev/null; rm -f "$CONF"' EXIT INT TERM
ulimit -n 65536 2>/dev/null || ulimit -n "$(ulimit -Hn)"
cat > "$CONF" <<EOF
[limits]
max_connections = 25000
max_connections_per_address = 25000
EOF

# A fresh broker for each group of runs, so that its resident memory is that group's own (it
# keeps what an earlier group made it allocate).
start_broker() {
    "$BIN/brokerd" --config "$CONF" --listen "$ADDR" --http off --log-level warn & PID=$!
    i=0
    until "$BIN/brokerctl" --server "$ADDR" pub bench.ready x >/dev/null 2>&1; do
        i=$((i + 1)); [ "$i" -lt 50 ] || { echo "brokerd did not start" >&2; exit 1; }
        sleep 0.1
    done
}
stop_broker() {
    kill "$PID"; wait "$PID" || true; PID=""
}

# bench SCENARIO ARGS...: one run against the broker, its CPU and memory included.
bench() {
    "$BIN/brokerctl" --server "$ADDR" bench "$@" --broker-pid "$PID" --json
}
# tag N: adds "run":N to the JSON object on stdin.
tag() {
    sed "s/^{/{\"run\":$1,/"
}

start_broker
run=1
while [ "$run" -le "$RUNS" ]; do
    bench relay --size 1024 --duration "$DURATION" | tag "$run"
    bench pubsub --size 1024 --duration "$DURATION" | tag "$run"
    run=$((run + 1))
done
stop_broker
for shared in "" --shared-topic; do
    start_broker
    run=1
    while [ "$run" -le "$RUNS" ]; do
        # shellcheck disable=SC2086
        bench many --pubs 100 --subs 100 $shared --threads "$THREADS" --size 16 \
            --duration "$DURATION" | tag "$run"
        run=$((run + 1))
    done
    stop_broker
done
# 10,000 subscribers as well need 20,000 descriptors and a few more in each process; under a
# lower hard limit the subscribers are cut to fit, with a note on stderr (every publisher
# still publishes, so 100,000 msgs/s are offered; the cut topics have nobody listening).
BIG_PUBS=10000
BIG_SUBS=${BIG_SUBS:-10000}
FDS=$(ulimit -n)
if [ "$FDS" != unlimited ] && [ $((BIG_PUBS + BIG_SUBS + 100)) -gt "$FDS" ]; then
    BIG_SUBS=$((FDS - BIG_PUBS - 100))
    echo "bench-many.sh: descriptor limit $FDS: $BIG_SUBS subscribers instead of 10000" >&2
fi
start_broker
run=1
while [ "$run" -le "$BIG_RUNS" ]; do
    bench many --pubs "$BIG_PUBS" --subs "$BIG_SUBS" --rate 10 --threads "$THREADS" --size 16 \
        --duration "$MANY_DURATION" | tag "$run"
    run=$((run + 1))
done
stop_broker

# The same 10,000-publisher scenario over lean connections that speak each broker's protocol
# directly (`--raw`), against brokerd and, when nats-server is on PATH, against nats-server,
# alternating, so that the brokers' CPU per message is compared with the same tool in one run
# (docs/performance.md, "Where the CPU goes at 10,000 connections"). RAW_RUNS=0 skips it.
RAW_RUNS=${RAW_RUNS:-2}
# 20,000 connections leave 20,000 ports in TIME_WAIT for 60 s, and the default ephemeral range
# holds about 28,000: wait (at most 90 s) until few are left before each big run.
settle() {
    i=0
    while [ "$(ss -tan state time-wait 2>/dev/null | wc -l)" -gt 2000 ] && [ "$i" -lt 90 ]; do
        sleep 1; i=$((i + 1))
    done
}
NATS_ADDR=127.0.0.1:14290
NPID=""
trap '[ -z "$PID" ] || kill "$PID" 2>/dev/null; [ -z "$NPID" ] || kill "$NPID" 2>/dev/null; rm -f "$CONF"' EXIT INT TERM
if [ "$RAW_RUNS" -gt 0 ]; then
    settle
    start_broker
    if command -v nats-server >/dev/null 2>&1; then
        nats-server -a 127.0.0.1 -p "${NATS_ADDR##*:}" -m 0 >/dev/null 2>&1 & NPID=$!
    else
        echo "bench-many.sh: nats-server not on PATH: the raw runs cover brokerd only" >&2
    fi
    run=1
    while [ "$run" -le "$RAW_RUNS" ]; do
        settle
        bench many --raw brokerd --pubs "$BIG_PUBS" --subs "$BIG_SUBS" --rate 10 \
            --threads "$THREADS" --size 16 --duration "$MANY_DURATION" | tag "$run"
        if [ -n "$NPID" ]; then
            settle
            "$BIN/brokerctl" --server "$NATS_ADDR" bench many --raw nats --pubs "$BIG_PUBS" \
                --subs "$BIG_SUBS" --rate 10 --threads "$THREADS" --size 16 \
                --duration "$MANY_DURATION" --broker-pid "$NPID" --json | tag "$run"
        fi
        run=$((run + 1))
    done
    stop_broker
fi
