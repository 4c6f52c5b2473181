#!/bin/sh
# The large stream runs of docs/performance.md ("Streams at 10 GiB"): fill one stream with
# SIZE_GIB GiB of MSG-byte messages, replay all of it from the page cache and again from disk
# (caches dropped, when run as root) while sampling the broker's resident memory, then kill -9
# the broker and time its restart (recovery) on that stream.
#
#   cargo build --release -p brokerd-server -p brokerctl
#   scripts/streams-large.sh                 # or: SIZE_GIB=1 MSG=128 PORT=17670 scripts/streams-large.sh
#
# Loopback only; the data directory is removed at the end (KEEP=1 keeps it). Every wait is
# bounded. Prints one JSON object per phase on stdout, and a summary on stderr.
set -eu
cd "$(dirname "$0")/.."
SIZE_GIB=${SIZE_GIB:-10}
MSG=${MSG:-1024}
PORT=${PORT:-17670}
BIN=${BIN:-target/release}
ADDR=127.0.0.1:$PORT
DATA=${DATA:-$(mktemp -d /tmp/brokerd-large.XXXXXX)}
CONF=$DATA/brokerd.toml
LOG=$DATA/brokerd.log
# Records are the payload plus 31 bytes of header and the topic (bench.stream.0, 14 bytes).
COUNT=$(( SIZE_GIB * 1024 * 1024 * 1024 / (MSG + 45) ))

cat > "$CONF" <<EOF
listen = "$ADDR"
http = "off"
log_level = "info"
data_dir = "$DATA/streams"

[[streams]]
name = "LARGE"
filters = ["bench.stream.>"]
fsync = "interval"
EOF

BROKER=
start() {
    : > "$LOG"
    "$BIN/brokerd" --config "$CONF" 2>"$LOG" &
    BROKER=$!
    i=0
    until grep -q "brokerd listening" "$LOG"; do
        i=$((i + 1)); [ "$i" -lt 6000 ] || { echo "brokerd did not start" >&2; exit 1; }
        kill -0 "$BROKER" 2>/dev/null || { cat "$LOG" >&2; exit 1; }
        sleep 0.01
    done
}
cleanup() {
    [ -n "$BROKER" ] && kill "$BROKER" 2>/dev/null && wait "$BROKER" 2>/dev/null || true
    [ "${KEEP:-0}" = 1 ] || rm -rf "$DATA"
}
trap cleanup EXIT INT TERM

rss_kib() { awk '/^VmRSS:/ { print $2 }' "/proc/$1/status" 2>/dev/null || echo 0; }

# Samples the broker's VmRSS every 200 ms into $1 (the largest seen) until $2 exists.
sample_rss() {
    max=0
    n=0
    while [ ! -e "$2" ] && [ "$n" -lt 36000 ]; do
        r=$(rss_kib "$BROKER")
        [ "$r" -gt "$max" ] && max=$r
        echo "$max" > "$1"
        n=$((n + 1))
        sleep 0.2
    done
}

replay() {
    phase=$1
    rm -f "$DATA/done" "$DATA/rss"
    sample_rss "$DATA/rss" "$DATA/done" &
    sampler=$!
    before=$(rss_kib "$BROKER")
    "$BIN/brokerctl" --server "$ADDR" bench stream-replay --stream LARGE --no-publish \
        --size "$MSG" --json --broker-pid "$BROKER" > "$DATA/replay.json"
    touch "$DATA/done"
    wait "$sampler"
    printf '{"phase":"%s","rss_before_kib":%s,"rss_max_kib":%s,"run":%s}\n' \
        "$phase" "$before" "$(cat "$DATA/rss")" "$(cat "$DATA/replay.json")"
}

start
echo "filling LARGE with $COUNT x $MSG B (about $SIZE_GIB GiB) in $DATA" >&2
t0=$(date +%s.%N)
# stream-replay publishes the messages (a window of 1,000 unanswered) and then replays them.
"$BIN/brokerctl" --server "$ADDR" bench stream-replay --stream LARGE --keep --count "$COUNT" \
    --size "$MSG" --json --broker-pid "$BROKER" > "$DATA/fill.json"
t1=$(date +%s.%N)
printf '{"phase":"fill","seconds":%s,"bytes_on_disk":%s,"run":%s}\n' \
    "$(echo "$t1 - $t0" | bc)" "$(du -sb "$DATA/streams/LARGE" | cut -f1)" "$(cat "$DATA/fill.json")"

replay replay-page-cache
if [ "$(id -u)" = 0 ]; then
    sync
    echo 3 > /proc/sys/vm/drop_caches
    replay replay-cold
fi

# kill -9, then time the restart up to "brokerd listening" (every stream recovered by then).
kill -KILL "$BROKER"
wait "$BROKER" 2>/dev/null || true
BROKER=
[ "$(id -u)" = 0 ] && { sync; echo 3 > /proc/sys/vm/drop_caches; }
t0=$(date +%s.%N)
start
t1=$(date +%s.%N)
printf '{"phase":"restart-after-kill-9","seconds_to_listening":%s,"recovery":"%s"}\n' \
    "$(echo "$t1 - $t0" | bc)" "$(grep -o 'stream open.*' "$LOG" | head -1 | tr -d '"')"
