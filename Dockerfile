# syntax=docker/dockerfile:1
# mqtt-connector: multi-stage build.
#   docker build -t mqtt-connector .
#   docker run --rm mqtt-connector            # runs `mqtt-connector worker`
#   docker run --rm mqtt-connector check      # any other subcommand

# ---- builder ---------------------------------------------------------------------------------
FROM rust:1-bookworm AS builder
WORKDIR /build

# Dependency-caching layer: build the dependencies against a stub main.rs (and the stub bench
# target Cargo.toml names), so that a change in
# src/ alone does not rebuild them.
COPY Cargo.toml Cargo.lock ./
RUN mkdir src benches \
    && echo 'fn main() {}' > src/main.rs \
    && echo 'fn main() {}' > benches/throughput.rs \
    && cargo build --release --locked \
    && rm -rf src

# The real sources. COPY keeps the files' own mtimes, which may be older than the stub's build:
# touch them so that cargo rebuilds the crate itself.
COPY src ./src
RUN find src -type f -name '*.rs' -exec touch {} + \
    && cargo build --release --locked \
    && install -m 0755 target/release/mqtt-connector /usr/local/bin/mqtt-connector

# ---- runtime ---------------------------------------------------------------------------------
FROM debian:bookworm-slim

RUN apt-get update \
    && apt-get install -y --no-install-recommends ca-certificates \
    && rm -rf /var/lib/apt/lists/* \
    && groupadd --system --gid 10001 mqtt-connector \
    && useradd --system --uid 10001 --gid mqtt-connector --no-create-home \
        --home-dir /nonexistent --shell /usr/sbin/nologin mqtt-connector

COPY --from=builder /usr/local/bin/mqtt-connector /usr/local/bin/mqtt-connector
COPY config/connectors /etc/mqtt-connector/connectors

ENV MQTT_CONNECTOR_CONNECTORS=/etc/mqtt-connector/connectors \
    MQTT_CONNECTOR_METRICS_ADDR=0.0.0.0:9090

USER mqtt-connector:mqtt-connector
EXPOSE 9090
ENTRYPOINT ["mqtt-connector"]
CMD ["worker"]
