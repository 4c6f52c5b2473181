# brokerd image: the broker `brokerd` and the command-line tool `brokerctl`, nothing else.
#
#   docker build -t brokerd .
#   docker run -d -p 127.0.0.1:7654:7654 -e BROKERD_AUTH_TOKEN=... brokerd
#
# Inside the container brokerd listens on every interface, so it refuses to start without
# authentication: give it BROKERD_AUTH_TOKEN (or users in a mounted configuration), or
# BROKERD_ALLOW_ANONYMOUS=true to accept anyone who can reach the port. The image holds neither.
# The configuration is /etc/brokerd/brokerd.toml (the commented defaults); mount your own there.
#
# The base images are arguments so the same file builds where no registry is reachable:
# scripts/docker-test.sh passes images it made locally.
ARG RUST_IMAGE=rust:1.95-slim-bookworm
ARG RUNTIME_IMAGE=debian:bookworm-slim

FROM ${RUST_IMAGE} AS build
WORKDIR /src
COPY . .
# The release profile keeps line tables (for profiling); the image leaves them out, which takes
# the two binaries from about 52 MB to 11 MB. Panics still name their functions.
# `--build-arg CARGO_PROFILE_RELEASE_STRIP=none` keeps them.
ARG CARGO_PROFILE_RELEASE_STRIP=debuginfo
# `--bins` with both packages: a `--bin` flag would apply to both and leave brokerctl unbuilt.
RUN cargo build --release --locked -p brokerd-server -p brokerctl --bins

FROM ${RUNTIME_IMAGE}
RUN useradd --system --uid 10001 --no-create-home --shell /usr/sbin/nologin brokerd \
    && mkdir -p /var/lib/brokerd && chown brokerd:brokerd /var/lib/brokerd
COPY --from=build /src/target/release/brokerd /src/target/release/brokerctl /usr/local/bin/
COPY config/brokerd.toml /etc/brokerd/brokerd.toml
USER brokerd
ENV BROKERD_CONFIG=/etc/brokerd/brokerd.toml
# The configuration's default listens on loopback only; in a container the broker must listen on
# every interface to be reachable through a published port. This overrides the file's `listen`.
ENV BROKERD_LISTEN=0.0.0.0:7654
# Streams keep their files here (docs/operations.md, "Streams"); mount a volume to keep them.
ENV BROKERD_DATA_DIR=/var/lib/brokerd
VOLUME /var/lib/brokerd
EXPOSE 7654
# `brokerd --health` reads the same configuration and environment as the daemon, completes a
# handshake with it (with the token when one is set) and exits 0 on WELCOME within 3 s. Exec form:
# the image needs no shell for it.
HEALTHCHECK --interval=10s --timeout=5s --start-period=3s \
    CMD ["/usr/local/bin/brokerd", "--health"]
# SIGTERM makes brokerd stop accepting, write what is queued for up to timeouts.shutdown_grace
# (10 s by default), then exit 0. Give `docker stop` more than that (`--time 15`).
STOPSIGNAL SIGTERM
ENTRYPOINT ["/usr/local/bin/brokerd"]
