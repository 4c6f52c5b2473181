#!/bin/sh
# Stored publish and replay, brokerd side by side with nats-server + JetStream, in one run and
# with one load tool (tools/stream-load) that speaks each broker's own protocol the same way.
# See docs/performance.md, "Streams: stored publish and replay, side by side with JetStream".
#
#   scripts/bench-streams.sh > runs.jsonl     # JSON lines, then the summary tables
#   RUNS=3 DURATION=5 REPLAY_COUNT=1000000 PUBLISHERS=8 scripts/bench-streams.sh
#
# Builds the tool and a release brokerd (CARGO_TARGET_DIR, default /work/main/target), starts
# brokerd on 127.0.0.1:17660 (--http off) and nats-server -js on 127.0.0.1:14260 with data
# directories under one temporary directory (BENCH_DIR, default /var/tmp: it must be a real
# disk, not tmpfs, or fdatasync costs nothing), measures the disk's append + fdatasync latency
# once, then runs every scenario RUNS times against each broker in turn (brokerd with a stream
# under fsync=interval, brokerd under fsync=always, JetStream with file storage), so all three
# see the same moments of the machine. Each run creates a fresh stream and deletes it at the end,
# then `sync` flushes what the run left dirty so the next run starts clean. Every run is bounded
# (the tool's duration, drain and replay limits, and `timeout` around it); both brokers are
# killed and the temporary directory removed on exit. Loopback only. Needs nats-server on PATH
# (Debian: apt-get install nats-server; measured with 2.9.10) and coreutils' timeout.
#
# Before each run it waits (at most QUIET_WAIT seconds, default 20) for a second in which the
# machine is less than a quarter of a core busy, so that a build or test suite of another session
# on the same cores disturbs fewer runs; each run's JSON still shows the whole machine's CPU
# (machine_cpu_pct) beside the tool's and the broker's, so a disturbed run can be seen.
#
# Prints one JSON line per run on stdout, then the tables of medians and ranges; progress on
# stderr. Takes about 6 minutes with the defaults on a quiet 2-core machine.
set -eu
cd "$(dirname "$0")/.."
RUNS=${RUNS:-3}
DURATION=${DURATION:-5}
REPLAY_COUNT=${REPLAY_COUNT:-1000000}
PUBLISHERS=${PUBLISHERS:-8}
QUIET_WAIT=${QUIET_WAIT:-20}
BD_PORT=${BD_PORT:-17660}
NATS_PORT=${NATS_PORT:-14260}
CARGO_TARGET_DIR=${CARGO_TARGET_DIR:-/work/main/target}
export CARGO_TARGET_DIR
TOOL_DIR=$CARGO_TARGET_DIR/tools

command -v nats-server >/dev/null || { echo "nats-server is not on PATH (apt-get install nats-server)" >&2; exit 1; }

echo "building stream-load and brokerd (release)" >&2
CARGO_TARGET_DIR=$TOOL_DIR cargo build --release --quiet --manifest-path tools/stream-load/Cargo.toml
cargo build --release --quiet -p brokerd-server
TOOL=$TOOL_DIR/release/stream-load
BROKERD=$CARGO_TARGET_DIR/release/brokerd

WORK=$(mktemp -d "${BENCH_DIR:-/var/tmp}/bench-streams.XXXXXX")
# A copy: another build into the same target directory during the run cannot swap the binary.
cp "$BROKERD" "$WORK/brokerd-bin"
BROKERD=$WORK/brokerd-bin
BD=
NS=
cleanup() {
    for pid in $BD $NS; do kill "$pid" 2>/dev/null || true; done
    for pid in $BD $NS; do wait "$pid" 2>/dev/null || true; done
    rm -rf "$WORK"
}
trap cleanup EXIT
trap 'exit 130' INT TERM

"$BROKERD" --listen "127.0.0.1:$BD_PORT" --http off --data-dir "$WORK/brokerd" --log-level warn \
    2>"$WORK/brokerd.log" &
BD=$!
nats-server -a 127.0.0.1 -p "$NATS_PORT" -js -sd "$WORK/nats" 2>"$WORK/nats.log" &
NS=$!
timeout 20 "$TOOL" ready --target brokerd --addr "127.0.0.1:$BD_PORT" >/dev/null
timeout 20 "$TOOL" ready --target nats --addr "127.0.0.1:$NATS_PORT" >/dev/null

fs=$(stat -f -c %T "$WORK")
echo "data under $WORK ($fs); $("$BROKERD" --version) at $(git rev-parse --short HEAD)$(git diff --quiet HEAD -- crates || echo '+changes'); nats-server $(nats-server --version | sed 's/.*: *//'); nproc $(nproc)" >&2
[ "$fs" = tmpfs ] && echo "warning: $WORK is on tmpfs: fdatasync costs nothing there" >&2

RESULTS=$WORK/runs.jsonl
emit() {
    echo "$1" >>"$RESULTS"
    echo "$1"
}

probe() {
    if line=$(timeout 120 "$TOOL" fsync-probe --dir "$WORK" --count 1000 --size 4096 --label "$1"); then
        emit "$line"
    fi
}
probe "before the runs"

# The machine's busy share over one second, in percent of one core, all cores together (idle,
# iowait and steal left out).
busy_pct() {
    a=$(head -1 /proc/stat)
    sleep 1
    b=$(head -1 /proc/stat)
    echo "$a $b" | awk -v n="$(nproc)" '{
        t1 = 0; for (i = 2; i <= 9; i++) t1 += $i
        t2 = 0; for (i = 13; i <= 20; i++) t2 += $i
        dt = t2 - t1; free = ($16 + $17 + $20) - ($5 + $6 + $9)
        if (dt <= 0) print 0; else printf "%d\n", (dt - free) * 100 * n / dt }'
}

quiet() {
    waited=0
    while [ "$waited" -lt "$QUIET_WAIT" ]; do
        busy=$(busy_pct)
        [ "$busy" -lt 25 ] && return 0
        waited=$((waited + 1))
    done
    echo "the machine is still busy ($busy% of a core) after ${QUIET_WAIT}s; running anyway" >&2
}

# One run: scenario label, broker (bd-interval, bd-always, nats), then the tool's arguments.
# A run that fails is reported on stderr and the script goes on.
run() {
    label=$1; broker=$2; shift 2
    case $broker in
    bd-interval) set -- "$@" --target brokerd --addr "127.0.0.1:$BD_PORT" --fsync interval --broker-pid "$BD" ;;
    bd-always) set -- "$@" --target brokerd --addr "127.0.0.1:$BD_PORT" --fsync always --broker-pid "$BD" ;;
    nats) set -- "$@" --target nats --addr "127.0.0.1:$NATS_PORT" --broker-pid "$NS" ;;
    esac
    quiet
    if line=$(timeout 300 "$TOOL" "$@" --label "$label"); then
        emit "$line"
    else
        echo "run failed: $label $broker: $*" >&2
    fi
    # What the run wrote and did not delete goes to disk now, not during the next run.
    timeout 120 sync || true
    kill -0 "$BD" 2>/dev/null || { echo "brokerd died; its log:" >&2; cat "$WORK/brokerd.log" >&2; exit 1; }
    kill -0 "$NS" 2>/dev/null || { echo "nats-server died; its log:" >&2; cat "$WORK/nats.log" >&2; exit 1; }
}

scenario() {
    label=$1; shift
    r=1
    while [ "$r" -le "$RUNS" ]; do
        for broker in bd-interval bd-always nats; do
            echo "$label, run $r of $RUNS, $broker" >&2
            run "$label" "$broker" "$@"
        done
        r=$((r + 1))
    done
}

scenario "pub 128 B, window 1000" pub --size 128 --window 1000 --duration "$DURATION"
scenario "pub 1 KiB, window 1000" pub --size 1024 --window 1000 --duration "$DURATION"
scenario "pub 128 B, one at a time" pub --size 128 --window 1 --duration "$DURATION"
scenario "pub 128 B, $PUBLISHERS publishers x window 100" pub --size 128 --window 100 \
    --publishers "$PUBLISHERS" --duration "$DURATION"
scenario "replay $REPLAY_COUNT x 128 B" replay --size 128 --window 1000 --count "$REPLAY_COUNT"
probe "after the runs"

echo
"$TOOL" summarize <"$RESULTS"
