# brokerd image: `docker build -t brokerd .` then `docker run -p 7654:7654 brokerd`.
FROM rust:1.95-slim-bookworm AS build
WORKDIR /src
COPY . .
RUN cargo build --release --locked -p brokerd-server --bin brokerd -p brokerctl

FROM debian:bookworm-slim
RUN useradd --system --uid 10001 --no-create-home brokerd
COPY --from=build /src/target/release/brokerd /usr/local/bin/brokerd
COPY --from=build /src/target/release/brokerctl /usr/local/bin/brokerctl
COPY config/brokerd.toml /etc/brokerd/brokerd.toml
USER brokerd
# The defaults listen on loopback only; inside a container the broker must listen on every interface.
ENV BROKERD_LISTEN=0.0.0.0:7654
EXPOSE 7654
# Healthy while the broker answers a statistics request (docs/operations.md, "Monitoring").
HEALTHCHECK --interval=10s --timeout=5s --start-period=2s \
    CMD ["/usr/local/bin/brokerctl", "--server", "127.0.0.1:7654", "stats", "--json", "--timeout", "3s"]
STOPSIGNAL SIGTERM
ENTRYPOINT ["/usr/local/bin/brokerd"]
