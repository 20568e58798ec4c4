# syntax=docker/dockerfile:1
# mqtt-connector: multi-stage build.
#   docker build -t mqtt-connector .
#   docker run --rm mqtt-connector            # runs `mqtt-connector worker`
#   docker run --rm mqtt-connector check      # any other subcommand
#
# The build stages (chef, planner, builder) are also run by `.ci/image-build.sh`, which reads
# their WORKDIR, COPY and RUN lines from this file and runs them in a scratch copy of the files
# they COPY: keep every build command in a RUN line of those stages, with relative paths only
# (the script maps WORKDIR and `COPY --from` paths, nothing else).

# ---- chef: the Rust toolchain and cargo-chef, pinned ----------------------------------------
FROM rust:1-bookworm AS chef
RUN cargo install --locked cargo-chef --version 0.1.78
WORKDIR /app

# ---- planner: a recipe of the dependencies, from the manifests and the targets they name ---
# Every file that names a target must be here (Cargo.toml names the `throughput` bench; the
# library and binary live in src/): cargo-chef turns them into a skeleton for the next stage.
# examples/ is not copied: Cargo.toml names no example target, and cargo discovers examples
# only where their files are. Name one in Cargo.toml and this stage must COPY it too (CI fails
# until it does).
FROM chef AS planner
COPY Cargo.toml Cargo.lock ./
COPY src ./src
COPY benches ./benches
RUN cargo chef prepare --recipe-path recipe.json

# ---- builder: dependencies first (a layer cached until Cargo.toml/Cargo.lock change), then us
FROM chef AS builder
COPY --from=planner /app/recipe.json recipe.json
RUN cargo chef cook --release --locked --recipe-path recipe.json
COPY Cargo.toml Cargo.lock ./
COPY src ./src
COPY benches ./benches
# `--version` proves the real binary was built, not the skeleton's empty main (which prints
# nothing): cargo-chef removes its dummy artifacts, and this line fails if it ever did not.
RUN cargo build --release --locked --bin mqtt-connector \
    && target/release/mqtt-connector --version | grep -q '^mqtt-connector '

# ---- runtime ---------------------------------------------------------------------------------
FROM debian:bookworm-slim

RUN apt-get update \
    && apt-get install -y --no-install-recommends ca-certificates \
    && rm -rf /var/lib/apt/lists/* \
    && groupadd --system --gid 10001 mqtt-connector \
    && useradd --system --uid 10001 --gid mqtt-connector --no-create-home \
        --home-dir /nonexistent --shell /usr/sbin/nologin mqtt-connector

COPY --from=builder /app/target/release/mqtt-connector /usr/local/bin/mqtt-connector
COPY config/connectors /etc/mqtt-connector/connectors

ENV MQTT_CONNECTOR_CONNECTORS=/etc/mqtt-connector/connectors \
    MQTT_CONNECTOR_METRICS_ADDR=0.0.0.0:9090

# Numeric, so that Kubernetes' runAsNonRoot can verify it without reading /etc/passwd.
USER 10001:10001
EXPOSE 9090
ENTRYPOINT ["mqtt-connector"]
CMD ["worker"]
