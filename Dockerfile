# syntax=docker/dockerfile:1
#
# rtpd container image: built with cargo-chef so the dependency layer is cached
# and only rebuilt when Cargo.toml / Cargo.lock change; the runtime stage holds
# the one binary on debian-slim, running as a non-root user.
#
#   docker build -t rtpd:local .
#   docker run --rm -p 8080:8080 rtpd:local            # `rtpd serve`, embedded backends
#   docker run --rm rtpd:local config --env-names
#
# Builder and runtime use the same Debian release so the binary's glibc matches.

ARG RUST_VERSION=1.95
ARG DEBIAN_RELEASE=trixie
ARG CARGO_CHEF_VERSION=0.1.77

FROM rust:${RUST_VERSION}-slim-${DEBIAN_RELEASE} AS chef
ARG CARGO_CHEF_VERSION
# cmake: aws-lc-sys (rustls' crypto provider) falls back to a CMake build on some targets.
RUN apt-get update \
 && apt-get install -y --no-install-recommends cmake \
 && rm -rf /var/lib/apt/lists/*
RUN cargo install cargo-chef --locked --version "${CARGO_CHEF_VERSION}"
WORKDIR /src

# The recipe is a summary of the manifests only: it changes when dependencies do.
FROM chef AS planner
COPY . .
RUN cargo chef prepare --recipe-path recipe.json

FROM chef AS builder
COPY --from=planner /src/recipe.json recipe.json
# The cached layer: every dependency of rtpd, compiled in release mode.
RUN cargo chef cook --release --locked --bin rtpd --recipe-path recipe.json
COPY . .
RUN cargo build --release --locked --bin rtpd

FROM debian:${DEBIAN_RELEASE}-slim AS runtime
# ca-certificates: TLS to Azure (Blob, Service Bus, Redis, Entra ID) and the downstream.
RUN apt-get update \
 && apt-get install -y --no-install-recommends ca-certificates \
 && rm -rf /var/lib/apt/lists/* \
 && groupadd --system --gid 10001 rtpd \
 && useradd --system --uid 10001 --gid rtpd --home-dir /var/lib/rtpd --no-create-home \
      --shell /usr/sbin/nologin rtpd \
 && install -d -o rtpd -g rtpd -m 0750 /var/lib/rtpd
COPY --from=builder /src/target/release/rtpd /usr/local/bin/rtpd

USER 10001:10001
WORKDIR /var/lib/rtpd
# rtpd defaults to 127.0.0.1, which is unreachable from outside a container.
ENV RTPD_HTTP_ADDR=0.0.0.0:8080 \
    RTPD_DATA_DIR=/var/lib/rtpd
EXPOSE 8080

# No curl in the image: rtpd probes itself and exits 0 (healthy) or 1.
# The port is fixed here; services listening elsewhere (mock-downstream) override
# the healthcheck in docker-compose.yml.
HEALTHCHECK --interval=10s --timeout=3s --start-period=20s --retries=3 \
  CMD ["/usr/local/bin/rtpd", "healthcheck", "--url", "http://127.0.0.1:8080/healthz"]

ENTRYPOINT ["/usr/local/bin/rtpd"]
CMD ["serve"]
