#!/usr/bin/env bash
# What building rtpd needs besides Rust: the Kafka intake's librdkafka is
# compiled from the source rdkafka-sys vendors, against the system's OpenSSL,
# so a C compiler, make, pkg-config and OpenSSL's headers (Debian:
# build-essential pkg-config libssl-dev). Installs them from the OS packages
# when missing; does nothing when they are there.
set -euo pipefail
if { command -v cc && command -v make && pkg-config --exists openssl; } >/dev/null 2>&1; then
    exit 0
fi
command -v apt-get >/dev/null || {
    echo "build-deps.sh: building librdkafka needs cc, make, pkg-config and OpenSSL's headers; install them (or build without the Kafka intake: cargo build --no-default-features)" >&2
    exit 1
}
sudo=()
[[ $(id -u) -ne 0 ]] && sudo=(sudo)
echo "build-deps.sh: installing build-essential pkg-config libssl-dev (apt-get)" >&2
"${sudo[@]}" apt-get update -qq >&2 || true
DEBIAN_FRONTEND=noninteractive "${sudo[@]}" apt-get install -y -qq build-essential pkg-config libssl-dev >&2
