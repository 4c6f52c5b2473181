#!/usr/bin/env bash
# Builds the repository's Dockerfile with no container registry, then checks the image and
# compose.yaml against a real Docker Engine.
#
# Where the base images come from. The Dockerfile takes its base images as build arguments
# (RUST_IMAGE, RUNTIME_IMAGE). Nothing can be pulled here, so this script makes both locally and
# passes them in, leaving the Dockerfile exactly as a user with a registry builds it:
#   - RUNTIME_IMAGE: Debian bookworm from debootstrap (variant minbase), with documentation,
#     locales and apt's lists removed as debian:bookworm-slim does, then `docker import`ed.
#   - RUST_IMAGE: a second bookworm minbase rootfs with gcc, libc6-dev and ca-certificates (the C
#     parts of ring and mimalloc need a C compiler), plus this host's own Rust toolchain (cargo,
#     rustc and its libraries from `rustc --print sysroot`) in /usr/local, plus every crate of
#     Cargo.lock from `cargo vendor --locked` in /usr/local/cargo/vendor, which
#     $CARGO_HOME/config.toml puts in place of crates.io with the network off. The Dockerfile's
#     `cargo build --release --locked` then runs unchanged, offline. The tag carries the rustc
#     version and a hash of Cargo.lock, so a new toolchain or lock file makes a new image.
# Each base image is made only when its tag is missing, so reruns start at `docker build`; an
# empty engine (as in CI) gets both made first. Downloaded .deb files are kept in
# target/docker/debs. Set BROKERD_DOCKER_REBUILD_BASES=1 to remake the base images.
#
# BuildKit needs the buildx plugin, which this engine's Debian packages lack, so the legacy
# builder is used (DOCKER_BUILDKIT=0); the Dockerfile uses nothing BuildKit-only.
#
# Checks, each failing with a message naming what went wrong:
#   1. the image holds both binaries, refuses to start without authentication, and on its
#      defaults with only a token serves the host's brokerctl through a port on 127.0.0.1;
#   2. its HEALTHCHECK (`brokerd --health`) reports healthy;
#   3. a configuration mounted at /etc/brokerd/brokerd.toml is the one in force;
#   4. `docker stop` ends it with exit code 0, within the grace period, after "shutdown complete";
#   5. it runs as a user other than root;
#   6. compose.yaml comes up healthy, serves brokerctl, and stops and goes down cleanly;
#   7. a stream added in one container is replayed by the next on the same data volume.
# Containers, volumes and networks it made are removed on exit; the base images and the brokerd image
# (brokerd-local/brokerd:test) are kept for the next run.
#
# Needs: root (debootstrap, only when a base image is missing), docker, docker compose or
# docker-compose, cargo. Environment: DEBIAN_MIRROR, BROKERCTL (a brokerctl binary to use).
set -euo pipefail
cd "$(dirname "$0")/.."

export DOCKER_BUILDKIT=0
MIRROR=${DEBIAN_MIRROR:-http://deb.debian.org/debian}
SUITE=bookworm
TARGET_DIR=${CARGO_TARGET_DIR:-$PWD/target}
WORK=$TARGET_DIR/docker
RUNTIME_BASE=brokerd-local/debian:bookworm-slim
IMAGE=brokerd-local/brokerd:test
# Longer than brokerd's default timeouts.shutdown_grace (10s).
STOP_GRACE=15
PREFIX=brokerd-test-$$
PROJECT=brokerdtest$$

TMP=$(mktemp -d)
CONTAINERS=()
VOLUMES=()
COMPOSE_UP=
ROOTFS_DIRS=()
START=$(date +%s)

log() { printf 'docker-test: %s\n' "$*"; }

fail() {
    printf '\ndocker-test: FAIL: %s\n' "$*" >&2
    local c
    for c in "${CONTAINERS[@]}"; do
        if docker inspect "$c" >/dev/null 2>&1; then
            printf -- '--- last log lines of %s:\n' "$c" >&2
            docker logs --tail 20 "$c" 2>&1 | sed 's/^/    /' >&2 || true
        fi
    done
    exit 1
}

# Removes a debootstrap target, first unmounting anything debootstrap left mounted inside it
# (/proc, /sys) if it was interrupted, so that rm never walks into a host filesystem.
remove_rootfs() {
    local dir=$1 m
    [ -d "$dir" ] || return 0
    for m in $(awk -v d="$dir/" 'index($2, d) == 1 { print $2 }' /proc/mounts | sort -r); do
        umount -l "$m" || true
    done
    rm -rf --one-file-system "$dir"
}

cleanup() {
    local rc=$? c d v
    set +e
    if [ -n "$COMPOSE_UP" ]; then
        compose down --volumes --remove-orphans --timeout "$STOP_GRACE" >/dev/null 2>&1
    fi
    for c in "${CONTAINERS[@]}"; do
        docker rm -f "$c" >/dev/null 2>&1
    done
    for v in "${VOLUMES[@]}"; do
        docker volume rm -f "$v" >/dev/null 2>&1
    done
    for d in "${ROOTFS_DIRS[@]}"; do
        remove_rootfs "$d"
    done
    jobs -p | xargs -r kill 2>/dev/null
    rm -rf "$TMP"
    log "finished in $(($(date +%s) - START)) s (exit $rc)"
}
trap cleanup EXIT
trap 'exit 130' INT TERM
# A command that fails outside any check's own message still says where.
trap 'printf "docker-test: FAIL: line %s: %s\n" "$LINENO" "$BASH_COMMAND" >&2' ERR

image_exists() { docker image inspect "$1" >/dev/null 2>&1; }

# Runs "$@" until it succeeds, at most $2 seconds, every half second.
# Usage: wait_until DESCRIPTION SECONDS COMMAND...
wait_until() {
    local what=$1 limit=$2 deadline
    shift 2
    deadline=$(($(date +%s) + limit))
    while :; do
        if "$@"; then return 0; fi
        if [ "$(date +%s)" -ge "$deadline" ]; then
            fail "$what: not within ${limit} s"
        fi
        sleep 0.5
    done
}

# ---------------------------------------------------------------------------------------------
# Base images.

# debootstrap SUITE into a new directory under $WORK, with extra packages $2 (comma-separated),
# then removes what debian:bookworm-slim leaves out.
make_rootfs() {
    local dir=$1 include=$2
    [ "$(id -u)" -eq 0 ] || fail "debootstrap needs root to make the base images; run as root"
    command -v debootstrap >/dev/null || fail "debootstrap is not installed (apt-get install -y debootstrap)"
    remove_rootfs "$dir"
    mkdir -p "$WORK/debs"
    ROOTFS_DIRS+=("$dir")
    log "debootstrap $SUITE (minbase${include:+, with $include}) into $dir"
    if ! debootstrap --variant=minbase ${include:+--include="$include"} \
        --cache-dir="$WORK/debs" "$SUITE" "$dir" "$MIRROR" >"$dir.log" 2>&1; then
        tail -20 "$dir.log" >&2
        fail "debootstrap failed (full log: $dir.log)"
    fi
    rm -rf "$dir"/var/lib/apt/lists/* "$dir"/var/cache/apt/*.bin "$dir"/var/cache/apt/archives/*.deb \
        "$dir"/usr/share/doc/* "$dir"/usr/share/man/* "$dir"/usr/share/info/* "$dir"/usr/share/locale/*
}

# Imports a rootfs directory as image $2; the remaining arguments are `--change` instructions.
import_rootfs() {
    local dir=$1 tag=$2
    shift 2
    local changes=() c
    for c in "$@"; do changes+=(--change "$c"); done
    # The engine provides /dev, /proc and /sys at run time.
    tar -C "$dir" --numeric-owner --exclude='./dev/*' --exclude='./proc/*' --exclude='./sys/*' -cf - . |
        docker import "${changes[@]}" - "$tag" >/dev/null || fail "docker import of $tag failed"
    remove_rootfs "$dir"
}

ensure_runtime_base() {
    if image_exists "$RUNTIME_BASE"; then
        log "runtime base $RUNTIME_BASE: present"
        return
    fi
    local dir=$WORK/rootfs-runtime
    make_rootfs "$dir" ""
    import_rootfs "$dir" "$RUNTIME_BASE" \
        'ENV PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin' 'CMD ["bash"]'
    log "runtime base $RUNTIME_BASE: made"
}

ensure_rust_base() {
    local sysroot version lockhash cargo_bin dir
    sysroot=$(rustc --print sysroot)
    version=$(rustc --version | awk '{ print $2 }')
    lockhash=$(sha256sum Cargo.lock | cut -c1-12)
    RUST_BASE=brokerd-local/rust:$version-$lockhash
    if image_exists "$RUST_BASE"; then
        log "build base $RUST_BASE: present"
        return
    fi
    dir=$WORK/rootfs-rust
    make_rootfs "$dir" gcc,libc6-dev,ca-certificates
    # rustup's `cargo` is a proxy; the toolchain's own binary is in the sysroot.
    cargo_bin=$sysroot/bin/cargo
    [ -x "$cargo_bin" ] || cargo_bin=$(command -v cargo)
    log "copying the Rust toolchain from $sysroot ($version)"
    cp "$cargo_bin" "$sysroot/bin/rustc" "$dir/usr/local/bin/"
    # lib/ holds rustc's libraries, the standard library and the bundled linker (rust-lld).
    cp -a "$sysroot/lib/." "$dir/usr/local/lib/"
    log "vendoring the crates of Cargo.lock"
    mkdir -p "$dir/usr/local/cargo"
    cargo vendor --locked --quiet "$dir/usr/local/cargo/vendor" >/dev/null ||
        fail "cargo vendor --locked failed"
    cat >"$dir/usr/local/cargo/config.toml" <<'EOF'
# Every crate comes from the vendored copy; nothing is fetched.
[source.crates-io]
replace-with = "vendored-sources"

[source.vendored-sources]
directory = "/usr/local/cargo/vendor"

[net]
offline = true
EOF
    import_rootfs "$dir" "$RUST_BASE" \
        'ENV CARGO_HOME=/usr/local/cargo' \
        'ENV PATH=/usr/local/cargo/bin:/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin' \
        'CMD ["bash"]'
    log "build base $RUST_BASE: made"
}

# ---------------------------------------------------------------------------------------------
# Helpers for the checks.

# Compose v2 as a docker plugin where installed, otherwise the standalone docker-compose.
if docker compose version >/dev/null 2>&1; then
    COMPOSE=(docker compose)
elif command -v docker-compose >/dev/null; then
    COMPOSE=(docker-compose)
else
    COMPOSE=()
fi
compose() { "${COMPOSE[@]}" -p "$PROJECT" -f compose.yaml "$@"; }

# The HOST:PORT on 127.0.0.1 that container $1's port 7654 is published on.
published_addr() {
    docker port "$1" 7654/tcp | grep -m1 '^127\.0\.0\.1:' || fail "$1: port 7654 not published on 127.0.0.1"
}

health_status() { docker inspect --format '{{if .State.Health}}{{.State.Health.Status}}{{end}}' "$1"; }

# Waits for container $1 to report healthy; fails at once on unhealthy or an exited container.
wait_healthy() {
    local c=$1 limit=$2 deadline status
    deadline=$(($(date +%s) + limit))
    while :; do
        status=$(health_status "$c")
        case $status in
            healthy) return 0 ;;
            unhealthy)
                docker inspect --format '{{json .State.Health.Log}}' "$c" >&2
                fail "$c: the health check reports unhealthy"
                ;;
        esac
        [ "$(docker inspect --format '{{.State.Running}}' "$c")" = true ] ||
            fail "$c: exited before it was healthy"
        if [ "$(date +%s)" -ge "$deadline" ]; then
            docker inspect --format '{{json .State.Health}}' "$c" >&2
            fail "$c: not healthy within ${limit} s (status: ${status:-no health check})"
        fi
        sleep 1
    done
}

brokerctl() { timeout 20 "$BROKERCTL" --name docker-test "$@"; }

# A subscriber on the host receives what a publisher on the host sends through $1.
check_pubsub() {
    local addr=$1 topic=docker-test.$2 out=$TMP/sub-$2 payload="hello from the host" sub_pid i
    brokerctl --server "$addr" sub "$topic" --count 1 >"$out" 2>"$out.err" &
    sub_pid=$!
    # The subscription is in place once a publish reports a subscriber: publishing until then
    # needs no fixed sleep, and the subscriber receives exactly the first message delivered.
    for i in $(seq 1 40); do
        if brokerctl --server "$addr" pub "$topic" "$payload" --ack 2>"$TMP/pub.err" &&
            grep -q 'delivered to 1 subscriber$' "$TMP/pub.err"; then
            break
        fi
        [ "$i" -lt 40 ] || fail "$addr: no publish reached the subscriber: $(cat "$TMP/pub.err" "$out.err")"
        sleep 0.25
    done
    wait "$sub_pid" || fail "$addr: brokerctl sub failed: $(cat "$out.err")"
    grep -q "$payload" "$out" || fail "$addr: the subscriber printed $(cat "$out"), not the message"
}

# ---------------------------------------------------------------------------------------------

docker info >/dev/null 2>&1 || fail "the Docker Engine does not answer (docker info)"
[ "${#COMPOSE[@]}" -gt 0 ] || fail "neither 'docker compose' nor docker-compose is installed"
mkdir -p "$WORK"
if [ "${BROKERD_DOCKER_REBUILD_BASES:-0}" = 1 ]; then
    docker rmi "$RUNTIME_BASE" >/dev/null 2>&1 || true
    docker rmi "brokerd-local/rust:$(rustc --version | awk '{ print $2 }')-$(sha256sum Cargo.lock | cut -c1-12)" \
        >/dev/null 2>&1 || true
fi

t=$(date +%s)
ensure_runtime_base
ensure_rust_base
log "base images ready in $(($(date +%s) - t)) s"

t=$(date +%s)
log "docker build (RUST_IMAGE=$RUST_BASE, RUNTIME_IMAGE=$RUNTIME_BASE)"
if ! docker build --build-arg RUST_IMAGE="$RUST_BASE" --build-arg RUNTIME_IMAGE="$RUNTIME_BASE" \
    -t "$IMAGE" . >"$WORK/build.log" 2>&1; then
    tail -30 "$WORK/build.log" >&2
    fail "docker build failed (full log: $WORK/build.log)"
fi
log "image $IMAGE built in $(($(date +%s) - t)) s"

if [ -n "${BROKERCTL:-}" ]; then
    :
elif [ -x "$TARGET_DIR/debug/brokerctl" ]; then
    # The test suite has just built it from these sources; a release build may be older.
    BROKERCTL=$TARGET_DIR/debug/brokerctl
elif [ -x "$TARGET_DIR/release/brokerctl" ]; then
    BROKERCTL=$TARGET_DIR/release/brokerctl
else
    log "building brokerctl for the host"
    cargo build --locked --quiet -p brokerctl || fail "cargo build -p brokerctl failed"
    BROKERCTL=$TARGET_DIR/debug/brokerctl
fi
log "host client: $BROKERCTL"

TOKEN=docker-test-$(od -An -N12 -tx1 /dev/urandom | tr -d ' \n')
export BROKERD_AUTH_TOKEN=$TOKEN BROKERD_TOKEN=$TOKEN

# 1. Both binaries, the protected default, and the defaults with only a token.
log "1. binaries, protected default, publish and subscribe from the host"
docker run --rm --entrypoint /usr/local/bin/brokerctl "$IMAGE" --version >/dev/null ||
    fail "the image has no working /usr/local/bin/brokerctl"
docker run --rm "$IMAGE" --version >/dev/null || fail "the image's brokerd --version failed"
rc=0
refusal=$(timeout 30 docker run --rm "$IMAGE" 2>&1) || rc=$?
[ "$rc" -ne 0 ] && [ "$rc" -ne 124 ] ||
    fail "with no token the container should refuse to start; exit code $rc"
grep -q BROKERD_AUTH_TOKEN <<<"$refusal" ||
    fail "with no token the refusal should name BROKERD_AUTH_TOKEN; it said: $refusal"

c=$PREFIX-defaults
CONTAINERS+=("$c")
docker run -d --name "$c" -e BROKERD_AUTH_TOKEN -p 127.0.0.1:0:7654 "$IMAGE" >/dev/null ||
    fail "docker run on the defaults failed"
addr=$(published_addr "$c")
wait_until "$c: accepting clients on $addr" 30 \
    brokerctl --server "$addr" pub docker-test.ready x 2>/dev/null
check_pubsub "$addr" defaults
brokerctl --server "$addr" pub docker-test.big "$(head -c 2000 /dev/zero | tr '\0' x)" 2>"$TMP/err" ||
    fail "on the defaults a 2000-byte publish failed: $(cat "$TMP/err")"
log "   ok: brokerctl on the host published and subscribed through $addr"

# 2. The image's HEALTHCHECK. The first probe runs one interval (10 s) after the start.
log "2. health check"
wait_healthy "$c" 45
log "   ok: healthy"

# 5. Not root: the configured user and the uid the process really has.
log "5. non-root"
user=$(docker inspect --format '{{.Config.User}}' "$c")
[ -n "$user" ] && [ "$user" != root ] && [ "$user" != 0 ] || fail "$c: Config.User is '$user'"
uid=$(docker top "$c" -eo pid,uid,comm | awk '$3 == "brokerd" { print $2; exit }') ||
    fail "$c: docker top failed"
[ -n "$uid" ] || fail "$c: docker top shows no brokerd process"
[ "$uid" != 0 ] && [ "$uid" != root ] || fail "$c: brokerd runs as uid $uid"
log "   ok: user $user, uid $uid"

# 4. docker stop: SIGTERM, a drain, exit code 0 within the grace period.
log "4. docker stop"
brokerctl --server "$addr" sub 'docker-test.>' --no-reconnect >/dev/null 2>&1 &
stop_sub=$!
wait_until "$c: a subscriber connected before the stop" 20 \
    sh -c "'$BROKERCTL' --server '$addr' pub docker-test.stop x --ack 2>&1 | grep -q 'delivered to 1 subscriber\$'"
t0=$(date +%s%N)
docker stop --time "$STOP_GRACE" "$c" >/dev/null || fail "docker stop $c failed"
elapsed_ms=$((($(date +%s%N) - t0) / 1000000))
code=$(docker inspect --format '{{.State.ExitCode}}' "$c")
[ "$code" = 0 ] || fail "$c: exit code $code after docker stop"
[ "$elapsed_ms" -lt $((STOP_GRACE * 1000)) ] ||
    fail "$c: docker stop took ${elapsed_ms} ms, not under the ${STOP_GRACE} s grace period"
last=$(docker logs "$c" 2>&1 | tail -n 1)
grep -q 'shutdown complete' <<<"$last" || fail "$c: the log ends with '$last', not 'shutdown complete'"
wait_until "the subscriber's connection closed by the stop" 10 sh -c "! kill -0 $stop_sub 2>/dev/null"
log "   ok: exit code 0 after ${elapsed_ms} ms, log ends with 'shutdown complete'"

# 3. A mounted configuration is the one in force.
log "3. mounted configuration"
conf=$TMP/brokerd.toml
printf '# Differs from the defaults in one visible way.\n[limits]\nmax_payload = 1000\n' >"$conf"
chmod 644 "$conf"
docker run --rm -e BROKERD_AUTH_TOKEN -v "$conf:/etc/brokerd/brokerd.toml:ro" "$IMAGE" --print-config |
    grep -q '^max_payload = 1000$' || fail "--print-config does not show the mounted max_payload = 1000"
c=$PREFIX-config
CONTAINERS+=("$c")
docker run -d --name "$c" -e BROKERD_AUTH_TOKEN -p 127.0.0.1:0:7654 \
    -v "$conf:/etc/brokerd/brokerd.toml:ro" "$IMAGE" >/dev/null || fail "docker run with a mounted configuration failed"
addr=$(published_addr "$c")
wait_until "$c: accepting clients on $addr" 30 \
    brokerctl --server "$addr" pub docker-test.ready x 2>/dev/null
brokerctl --server "$addr" pub docker-test.small "$(head -c 500 /dev/zero | tr '\0' x)" --ack 2>"$TMP/err" ||
    fail "with max_payload = 1000 a 500-byte publish failed: $(cat "$TMP/err")"
if brokerctl --server "$addr" pub docker-test.big "$(head -c 2000 /dev/zero | tr '\0' x)" --ack 2>"$TMP/err"; then
    fail "with max_payload = 1000 mounted, a 2000-byte publish was accepted"
fi
grep -q 'maximum of 1000' "$TMP/err" || fail "the 2000-byte publish failed for another reason: $(cat "$TMP/err")"
docker stop --time "$STOP_GRACE" "$c" >/dev/null
log "   ok: max_payload = 1000 from the mounted file refuses a 2000-byte publish"

# 6. compose.yaml, on the image built above, on a free port of 127.0.0.1.
log "6. compose.yaml"
export BROKERD_IMAGE=$IMAGE BROKERD_PORT=0
COMPOSE_UP=1
compose up -d --no-build >"$TMP/compose.log" 2>&1 || fail "compose up failed: $(cat "$TMP/compose.log")"
c=$(compose ps -q brokerd)
[ -n "$c" ] || fail "compose up started no brokerd container"
CONTAINERS+=("$c")
wait_healthy "$c" 45
addr=$(published_addr "$c")
check_pubsub "$addr" compose
compose stop --timeout "$STOP_GRACE" >"$TMP/compose.log" 2>&1 || fail "compose stop failed: $(cat "$TMP/compose.log")"
code=$(docker inspect --format '{{.State.ExitCode}}' "$c")
[ "$code" = 0 ] || fail "compose: brokerd exit code $code after stop"
compose down --volumes --remove-orphans >"$TMP/compose.log" 2>&1 || fail "compose down failed: $(cat "$TMP/compose.log")"
COMPOSE_UP=
left=$(docker ps -aq --filter "label=com.docker.compose.project=$PROJECT")
[ -z "$left" ] || fail "compose down left containers: $left"
log "   ok: healthy, served $addr, stopped with exit code 0, down"

# 7. Streams live in the image's data volume: a new container on the same volume has them.
log "7. streams survive the container"
vol=$PREFIX-data
VOLUMES+=("$vol")
c=$PREFIX-streams-1
CONTAINERS+=("$c")
docker run -d --name "$c" -e BROKERD_AUTH_TOKEN -p 127.0.0.1:0:7654 -v "$vol:/var/lib/brokerd" \
    "$IMAGE" >/dev/null || fail "docker run with a data volume failed"
addr=$(published_addr "$c")
wait_until "$c: accepting clients on $addr" 30 \
    brokerctl --server "$addr" pub docker-test.ready x 2>/dev/null
brokerctl --server "$addr" stream add DOCKER --filter 'docker-test.stream.>' --fsync always \
    >/dev/null 2>"$TMP/err" || fail "$c: stream add failed: $(cat "$TMP/err")"
brokerctl --server "$addr" pub docker-test.stream.one "kept across containers" --stored \
    >/dev/null 2>"$TMP/err" || fail "$c: a stored publish failed: $(cat "$TMP/err")"
docker stop --time "$STOP_GRACE" "$c" >/dev/null
docker rm "$c" >/dev/null
c=$PREFIX-streams-2
CONTAINERS+=("$c")
docker run -d --name "$c" -e BROKERD_AUTH_TOKEN -p 127.0.0.1:0:7654 -v "$vol:/var/lib/brokerd" \
    "$IMAGE" >/dev/null || fail "docker run on the same data volume failed"
addr=$(published_addr "$c")
wait_until "$c: accepting clients on $addr" 30 \
    brokerctl --server "$addr" pub docker-test.ready x 2>/dev/null
brokerctl --server "$addr" sub --stream DOCKER --from all --count 1 >"$TMP/replay" 2>"$TMP/err" ||
    fail "$c: replay failed: $(cat "$TMP/err")"
grep -q "kept across containers" "$TMP/replay" ||
    fail "$c: the replay printed $(cat "$TMP/replay"), not the stored message"
docker stop --time "$STOP_GRACE" "$c" >/dev/null
log "   ok: a stream added in one container replayed in the next from the volume $vol"

size=$(docker image inspect --format '{{.Size}}' "$IMAGE")
base_size=$(docker image inspect --format '{{.Size}}' "$RUNTIME_BASE")
log "image $IMAGE: $size bytes ($((size / 1000000)) MB; its runtime base $((base_size / 1000000)) MB)"
log "all checks passed"
