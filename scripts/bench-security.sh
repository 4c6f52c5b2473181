#!/bin/sh
# What authentication, permissions and TLS cost: three release brokers on loopback, side by side,
# and `brokerctl bench pubsub` (16 B and 1 KiB) against each in turn, RUNS rounds (default 5),
# printing one JSON object per run on stdout with a "broker" field: `open` (no authentication),
# `users` (a user with ten publish and ten subscribe allow rules, the bench's topic matching the
# last) and `tls` (TLS, no authentication). docs/performance.md records the medians.
#
#   cargo build --release -p brokerd-server -p brokerctl
#   scripts/bench-security.sh > security.jsonl        # or RUNS=3 DURATION=3s ...
#
# Certificates and the password hash are made here, in a temporary directory (openssl), and
# removed at the end. Loopback only; every run is bounded by DURATION.
set -eu
cd "$(dirname "$0")/.."
RUNS=${RUNS:-5}
DURATION=${DURATION:-5s}
BIN=target/release
DIR=$(mktemp -d)
PIDS=""
trap 'for p in $PIDS; do kill "$p" 2>/dev/null; done; rm -rf "$DIR"' EXIT INT TERM

openssl req -x509 -newkey ec -pkeyopt ec_paramgen_curve:prime256v1 -nodes -days 1 \
    -subj "/CN=bench CA" -keyout "$DIR/ca.key" -out "$DIR/ca.pem" 2>/dev/null
openssl req -newkey ec -pkeyopt ec_paramgen_curve:prime256v1 -nodes -subj "/CN=localhost" \
    -keyout "$DIR/server.key" -out "$DIR/server.csr" 2>/dev/null
printf 'subjectAltName=DNS:localhost,IP:127.0.0.1\n' > "$DIR/ext.cnf"
openssl x509 -req -in "$DIR/server.csr" -CA "$DIR/ca.pem" -CAkey "$DIR/ca.key" \
    -CAcreateserial -days 1 -extfile "$DIR/ext.cnf" -out "$DIR/server.pem" 2>/dev/null

HASH=$(echo bench-password | "$BIN/brokerd" hash-password)
RULES='["a.>", "b.>", "c.>", "d.>", "e.>", "f.>", "g.>", "h.>", "i.>", "bench.>"]'
cat > "$DIR/users.toml" <<EOF
listen = "127.0.0.1:17661"
http = "off"
log_level = "warn"
[[auth.users]]
name = "bench"
password_hash = "$HASH"
publish = { allow = $RULES }
subscribe = { allow = $RULES }
EOF

"$BIN/brokerd" --listen 127.0.0.1:17660 --http off --log-level warn & PIDS="$PIDS $!"
"$BIN/brokerd" --config "$DIR/users.toml" & PIDS="$PIDS $!"
"$BIN/brokerd" --listen 127.0.0.1:17662 --http off --log-level warn \
    --tls-cert "$DIR/server.pem" --tls-key "$DIR/server.key" & PIDS="$PIDS $!"

ctl() {
    case $1 in
        open) shift; "$BIN/brokerctl" --server 127.0.0.1:17660 "$@" ;;
        users) shift; BROKERD_USER=bench BROKERD_PASSWORD=bench-password \
            "$BIN/brokerctl" --server 127.0.0.1:17661 "$@" ;;
        tls) shift; "$BIN/brokerctl" --server 127.0.0.1:17662 --tls-ca "$DIR/ca.pem" "$@" ;;
    esac
}
for b in open users tls; do
    i=0
    until ctl "$b" pub bench.ready x >/dev/null 2>&1; do
        i=$((i + 1)); [ "$i" -lt 50 ] || { echo "brokerd ($b) did not start" >&2; exit 1; }
        sleep 0.1
    done
done

r=1
while [ "$r" -le "$RUNS" ]; do
    for size in 16 1024; do
        for b in open users tls; do
            ctl "$b" bench pubsub --size "$size" --duration "$DURATION" --json 2>/dev/null |
                sed "s/^{/{\"broker\":\"$b\",/"
        done
    done
    r=$((r + 1))
done
