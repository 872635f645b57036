# syntax=docker/dockerfile:1
#
# rtpd container image: built with cargo-chef so the dependency layer is cached
# and only rebuilt when Cargo.toml / Cargo.lock change; the runtime stage is
# distroless `cc` (glibc, libgcc, CA certificates, /etc/passwd with `nonroot`;
# no shell, no package manager) holding the one binary, running as non-root.
#
#   docker build -t rtpd:local .
#
#   # `serve` (the default command) refuses to start without vendor credentials:
#   # mount a vendor keys file (docs/security.md for its format) ...
#   docker run --rm -p 8080:8080 \
#     -v "$PWD/vendor-keys:/run/secrets/rtpd/vendor-keys:ro" \
#     -e RTPD_VENDOR_KEYS_FILE=/run/secrets/rtpd/vendor-keys rtpd:local
#   # ... or opt out explicitly for a local try (logged as a warning):
#   docker run --rm -p 8080:8080 -e RTPD_AUTH=none rtpd:local
#
#   docker run --rm rtpd:local config --env-names
#
# Base images are pinned by digest: a tag says which release, the digest makes
# the build reproducible and stops a re-pushed tag from changing what ships.
# Builder and runtime are the same Debian release (13, trixie), so the binary's
# glibc matches the runtime's. To move to a newer image, resolve the tag's
# current digest and replace both tag and digest in the FROM line:
#
#   docker buildx imagetools inspect rust:1.95-slim-trixie --format '{{json .Manifest.Digest}}'
#   docker buildx imagetools inspect gcr.io/distroless/cc-debian13:nonroot --format '{{json .Manifest.Digest}}'
#
# (or `crane digest IMAGE`). The digests below were taken from public
# Dockerfiles that pin the same tags; they were not resolved against the
# registries when written (no registry access there), so the first build is
# also their check: a digest that does not exist fails the pull, it never
# silently pulls something else.
# Dependabot and Renovate both update `FROM image:tag@sha256:...` lines.

ARG CARGO_CHEF_VERSION=0.1.77

FROM rust:1.95-slim-trixie@sha256:28846ec5a6bcfcddb93f403ba7071bd579787852b2f2ac3839965620e8bd9456 AS chef
ARG CARGO_CHEF_VERSION
# cmake: aws-lc-sys (rustls' crypto provider) falls back to a CMake build on some targets.
# make, pkg-config, libssl-dev, zlib1g-dev: librdkafka (the Kafka intake), built
# from the source rdkafka-sys vendors, against the system's OpenSSL (libssl3 is
# in the distroless runtime).
RUN apt-get update \
 && apt-get install -y --no-install-recommends cmake make pkg-config libssl-dev zlib1g-dev \
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
# The runtime has no shell to create directories with: make the data directory
# here and copy it over with its owner (distroless `nonroot` is 65532:65532).
RUN install -d -m 0750 /rootfs/var/lib/rtpd

FROM gcr.io/distroless/cc-debian13:nonroot@sha256:54df941ed0d06a1bd95ef5e0ce391fd8d9f94b64782dc9a60062727849ee3f97 AS runtime
COPY --from=builder --chown=65532:65532 /rootfs/var/lib/rtpd /var/lib/rtpd
COPY --from=builder /src/target/release/rtpd /usr/local/bin/rtpd

USER 65532:65532
WORKDIR /var/lib/rtpd
# rtpd defaults to 127.0.0.1, which is unreachable from outside a container.
ENV RTPD_HTTP_ADDR=0.0.0.0:8080 \
    RTPD_DATA_DIR=/var/lib/rtpd
EXPOSE 8080

# No curl (and no shell) in the image: rtpd probes itself and exits 0 (healthy)
# or 1. The port is fixed here; services listening elsewhere (mock-downstream)
# override the healthcheck in docker-compose.yml. Container Apps ignores
# HEALTHCHECK and uses the probes in bicep/modules/apps.bicep.
HEALTHCHECK --interval=10s --timeout=3s --start-period=20s --retries=3 \
  CMD ["/usr/local/bin/rtpd", "healthcheck", "--url", "http://127.0.0.1:8080/healthz"]

ENTRYPOINT ["/usr/local/bin/rtpd"]
CMD ["serve"]
