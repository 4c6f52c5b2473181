#!/usr/bin/env bash
# Compares two brokerd builds on the fleet test of issue 9: runs
# `a_fleet_dropping_and_reconnecting_at_once_keeps_routing` (crates/brokerd-server/tests/crowds.rs)
# against each binary in turn, RUNS pairs (default 6), with BROKERD_FLEET connections (default
# 10,000), and prints each run's figures and, per binary, the median of the canary's largest gap
# while the fleet closes, of the time until its routes are gone, and of the broker's CPU for it.
#
#   cp target/release/brokerd /tmp/brokerd-before       # before the change
#   cargo build --release -p brokerd-server              # after it
#   scripts/fleet-ab.sh /tmp/brokerd-before target/release/brokerd
#
# On a 2-vCPU machine one binary's gap ranged 37-147 ms over twelve runs: compare medians over
# several pairs, never single runs. Loopback only; every run is one bounded test. Needs
# BROKERD_FLEET + 512 file descriptors per process (docs/operations.md).
#
# PIN=1 gives the broker CPU 0 and the test (fleet, closing threads, canary) CPU 1, so that the
# figures are the broker's own and not its share of the cores the closing side also wants
# (`taskset`; on loopback the closer's `close` runs the broker socket's receive path for each FIN,
# on the closer's core).
set -euo pipefail
cd "$(dirname "$0")/.."
(( $# == 2 )) || { echo "usage: $0 BEFORE_BINARY AFTER_BINARY" >&2; exit 2; }
before=$(realpath "$1")
after=$(realpath "$2")
RUNS=${RUNS:-6}
export BROKERD_FLEET=${BROKERD_FLEET:-10000}
ulimit -n "$(ulimit -Hn)"

cargo build --release --locked -p brokerd-server --tests
out=$(mktemp)
results=$(mktemp)
wrappers=$(mktemp -d)
trap 'rm -rf "$out" "$results" "$wrappers"' EXIT
pin=()
if [[ ${PIN:-0} == 1 ]]; then
    # The harness starts BROKERD_BIN itself: a wrapper that execs the binary on CPU 0 keeps the
    # process id, so the test's CPU and RSS figures are still the broker's.
    for which in before after; do
        printf '#!/bin/sh\nexec taskset -c 0 %q "$@"\n' "${!which}" > "$wrappers/$which"
        chmod +x "$wrappers/$which"
    done
    before=$wrappers/before
    after=$wrappers/after
    pin=(taskset -c 1)
fi
for ((i = 1; i <= RUNS; i++)); do
    for which in before after; do
        bin=$before
        [[ $which == after ]] && bin=$after
        BROKERD_BIN=$bin "${pin[@]}" cargo test --release --locked -q -p brokerd-server --test crowds -- \
            --exact a_fleet_dropping_and_reconnecting_at_once_keeps_routing --nocapture \
            > "$out" 2>&1 || { tail -30 "$out"; exit 1; }
        line=$(grep -o 'crowds-binary: fleet.*' "$out")
        # Durations are printed as Rust's Debug for Duration: "85.3ms", or "1.2s" past a second.
        gap=$(sed -E "s/.*canary's largest gap ([0-9.]+(ms|s))\); reconnected.*/\1/" <<< "$line")
        gone=$(sed -E 's/.*routes gone in ([0-9.]+(ms|s)) using.*/\1/' <<< "$line")
        cpu=$(sed -E "s/.*using ([0-9.]+(ms|s)) of the broker's CPU.*/\1/" <<< "$line")
        echo "$which run $i: gap $gap, routes gone in $gone, broker CPU $cpu"
        echo "$which $gap $gone $cpu" >> "$results"
    done
done
python3 - "$results" <<'PY'
import statistics, sys
def ms(d):
    return float(d[:-2]) if d.endswith("ms") else float(d[:-1]) * 1000
rows = [l.split() for l in open(sys.argv[1])]
for which in ("before", "after"):
    r = [x for x in rows if x[0] == which]
    med = [statistics.median(ms(x[i]) for x in r) for i in (1, 2, 3)]
    print(f"{which}: median gap {med[0]:.1f} ms, routes gone {med[1]:.1f} ms, "
          f"broker CPU {med[2]:.0f} ms ({len(r)} runs)")
PY
