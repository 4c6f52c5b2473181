#!/bin/bash
# Measures brokerd's resident memory (VmRSS from /proc/PID/status) in three states, each against
# a fresh broker on loopback:
#   baseline   no client connected
#   idle       CONNS idle connections (default 10,000), each holding SUBS subscriptions (default 10)
#   one-conn   one connection holding BIG subscriptions (default 1,000,000)
# and prints per-connection and per-subscription figures against the baseline.
#
#   cargo build --release -p brokerd-server -p brokerctl
#   scripts/memory.sh                   # or: CONNS=1000 BIG=100000 PORT=17655 scripts/memory.sh
#
# The load is `brokerctl bench hold` (hidden): it speaks HELLO/SUB directly, writes a ready
# file once every SUB is confirmed, answers keep-alive PINGs, and exits after HOLD. 10,000
# connections need more open files than the usual default in both processes, so this raises
# the limit (as root, or up to the hard limit) for itself and the processes it starts.
# Filters are distinct per subscription (`mem.c<conn>.s<i>`): the trie grows with each one.
set -euo pipefail
cd "$(dirname "$0")/.."
CONNS=${CONNS:-10000}
SUBS=${SUBS:-10}
BIG=${BIG:-1000000}
HOLD=${HOLD:-60s}
PORT=${PORT:-17655}
BIN=target/release
ADDR=127.0.0.1:$PORT
WORK=$(mktemp -d)
BROKER=
HOLDER=
cleanup() {
    [ -n "$HOLDER" ] && kill "$HOLDER" 2>/dev/null
    [ -n "$BROKER" ] && kill "$BROKER" 2>/dev/null
    wait 2>/dev/null || true
    rm -rf "$WORK"
}
trap cleanup EXIT INT TERM

ulimit -n 65536 2>/dev/null || ulimit -n "$(ulimit -Hn)"
# The broker's limits must admit the load; everything else stays at its default.
cat > "$WORK/brokerd.toml" <<TOML
[limits]
max_connections = $((CONNS + 100))
max_connections_per_address = $((CONNS + 100))
max_subs_per_connection = $((BIG + SUBS + 100))
TOML

rss_kib() { awk '/^VmRSS:/ { print $2 }' "/proc/$1/status"; }

start_broker() {
    "$BIN/brokerd" --config "$WORK/brokerd.toml" --listen "$ADDR" --log-level warn &
    BROKER=$!
    local i=0
    until "$BIN/brokerctl" --server "$ADDR" pub mem.ready x >/dev/null 2>&1; do
        i=$((i + 1)); [ "$i" -lt 50 ] || { echo "brokerd did not start" >&2; exit 1; }
        sleep 0.1
    done
    sleep 1
}

stop_broker() { kill "$BROKER"; wait "$BROKER" 2>/dev/null || true; BROKER=; }

# hold CONNS SUBS: runs the holder until it is ready, prints the broker's RSS, stops the holder.
hold() {
    rm -f "$WORK/ready"
    "$BIN/brokerctl" --server "$ADDR" bench hold --conns "$1" --subs-per-conn "$2" \
        --hold "$HOLD" --ready-file "$WORK/ready" &
    HOLDER=$!
    local i=0
    until [ -e "$WORK/ready" ]; do
        kill -0 "$HOLDER" 2>/dev/null || { echo "the holder exited early" >&2; exit 1; }
        i=$((i + 1)); [ "$i" -lt 1200 ] || { echo "the holder was not ready in 120 s" >&2; exit 1; }
        sleep 0.1
    done
    sleep 2 # let the broker settle after the last OK
    rss_kib "$BROKER"
    kill "$HOLDER"; wait "$HOLDER" 2>/dev/null || true; HOLDER=
}

start_broker
base=$(rss_kib "$BROKER")
idle=$(hold "$CONNS" "$SUBS")
stop_broker
start_broker
base2=$(rss_kib "$BROKER")
big=$(hold 1 "$BIG")
stop_broker

awk -v b="$base" -v i="$idle" -v c="$CONNS" -v s="$SUBS" -v b2="$base2" -v g="$BIG" -v r="$big" 'BEGIN {
    printf "baseline RSS                    %8d KiB\n", b
    printf "%d conns x %d subs RSS      %8d KiB  (+%d KiB)\n", c, s, i, i - b
    printf "  per idle connection (incl. its %d subs)  %.2f KiB\n", s, (i - b) / c
    printf "baseline RSS (second broker)    %8d KiB\n", b2
    printf "1 conn x %d subs RSS      %8d KiB  (+%d KiB)\n", g, r, r - b2
    printf "  per subscription              %.1f bytes\n", (r - b2) * 1024 / g
    printf "  per idle connection, its subscriptions at that rate removed: %.2f KiB\n", ((i - b) - c * s * (r - b2) / g) / c
}'
