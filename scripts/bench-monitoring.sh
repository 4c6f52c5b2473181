#!/bin/sh
# What monitoring costs: `brokerctl bench` (pubsub 16 B, pubsub 1 KiB, fanout to 10) against a
# release broker with its HTTP endpoints scraped every second (/metrics, /varz and /connz, as a
# Prometheus server and the web console would), against the same broker unscraped, and, when
# OLD_BROKERD names a brokerd binary built before monitoring existed, against that one. The
# brokers take turns, one run each per round, RUNS rounds (default 3), so that a slow spell of the
# machine hits them alike. One JSON object per run on stdout, with "broker" (`scraped`, `quiet`,
# `old`) and "scrapes" (requests answered during the run); docs/performance.md records medians.
#
#   cargo build --release -p brokerd-server -p brokerctl
#   scripts/bench-monitoring.sh > monitoring.jsonl          # or RUNS=5 DURATION=3s ...
#   OLD_BROKERD=/path/to/old/brokerd scripts/bench-monitoring.sh
#
# Loopback only; every run is bounded by DURATION, and the scraper by the run.
set -eu
cd "$(dirname "$0")/.."
RUNS=${RUNS:-3}
DURATION=${DURATION:-5s}
BIN=target/release
PIDS=""
trap 'for p in $PIDS; do kill "$p" 2>/dev/null; done' EXIT INT TERM
command -v curl >/dev/null || { echo "bench-monitoring.sh needs curl" >&2; exit 1; }

"$BIN/brokerd" --listen 127.0.0.1:17670 --http 127.0.0.1:17671 --log-level warn & PIDS="$PIDS $!"
"$BIN/brokerd" --listen 127.0.0.1:17672 --http off --log-level warn & PIDS="$PIDS $!"
BROKERS="scraped quiet"
if [ -n "${OLD_BROKERD:-}" ]; then
    "$OLD_BROKERD" --listen 127.0.0.1:17674 --log-level warn & PIDS="$PIDS $!"
    BROKERS="$BROKERS old"
fi
port() {
    case $1 in scraped) echo 17670 ;; quiet) echo 17672 ;; old) echo 17674 ;; esac
}
for b in $BROKERS; do
    i=0
    until "$BIN/brokerctl" --server "127.0.0.1:$(port "$b")" pub bench.ready x >/dev/null 2>&1; do
        i=$((i + 1)); [ "$i" -lt 50 ] || { echo "brokerd ($b) did not start" >&2; exit 1; }
        sleep 0.1
    done
done

# Scrapes the scraped broker every second until killed; counts answered requests in $1.
scrape() {
    n=0
    while :; do
        for path in /metrics /varz "/connz?sort=rate_out"; do
            curl -sf -o /dev/null "http://127.0.0.1:17671$path" && n=$((n + 1))
        done
        echo "$n" > "$1"
        sleep 1
    done
}

COUNT=$(mktemp)
trap 'for p in $PIDS; do kill "$p" 2>/dev/null; done; rm -f "$COUNT"' EXIT INT TERM
round=1
while [ "$round" -le "$RUNS" ]; do
    for scenario in "pubsub --size 16" "pubsub --size 1024" "fanout --subs 10 --size 16"; do
        for b in $BROKERS; do
            echo 0 > "$COUNT"
            SCRAPER=""
            if [ "$b" = scraped ]; then
                scrape "$COUNT" & SCRAPER=$!
            fi
            # shellcheck disable=SC2086
            out=$("$BIN/brokerctl" --server "127.0.0.1:$(port "$b")" bench $scenario \
                --duration "$DURATION" --json)
            if [ -n "$SCRAPER" ]; then kill "$SCRAPER" 2>/dev/null; wait "$SCRAPER" 2>/dev/null || true; fi
            printf '%s\n' "$out" | sed "s/^{/{\"broker\":\"$b\",\"round\":$round,\"scrapes\":$(cat "$COUNT"),/"
        done
    done
    round=$((round + 1))
done
