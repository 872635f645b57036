#!/usr/bin/env bash
# The real-process fault campaign and soak test (docs/reliability.md).
#
#   scripts/chaos.sh --quick [--seed N]      CI: >= 100 faults, a few minutes
#   scripts/chaos.sh [--seed N]              long: >= 1,000 faults
#   scripts/chaos.sh --soak [--soak-minutes 10]
#   scripts/chaos.sh --recovery [--reps 2]   one outage at a time, production timeouts: the 30 s target
#   scripts/chaos.sh --help                  every option
#
# Installs what it needs when missing: redis-server and libfaketime (Debian
# packages), Azurite (npm ci, via scripts/azurite.sh), a Python virtualenv
# (.venv) with tests/requirements.txt. Builds the release binaries unless
# --bin-dir DIR (or CHAOS_BIN_DIR) names binaries to use. Reports go to
# target/chaos/<time>-seed<seed>/ (report.txt, report.json, history, logs).
# Exit: 0 no violation, 1 violations, 2 the campaign could not run.
set -euo pipefail
cd "$(dirname "$0")/.."

die() { echo "chaos.sh: $*" >&2; exit 2; }

apt_install() {
    command -v apt-get >/dev/null || return 1
    local sudo=()
    [[ $(id -u) -ne 0 ]] && sudo=(sudo)
    echo "chaos.sh: installing $* (apt-get)" >&2
    "${sudo[@]}" apt-get update -qq >&2 || true
    DEBIAN_FRONTEND=noninteractive "${sudo[@]}" apt-get install -y -qq "$@" >&2
}

if ! command -v redis-server >/dev/null || ! command -v redis-cli >/dev/null; then
    apt_install redis-server || die "redis-server is missing and could not be installed"
fi
# Clock skew needs libfaketime; without it the campaign runs and says skew was not injected.
if ! ls /usr/lib/*/faketime/libfaketimeMT.so.1 >/dev/null 2>&1; then
    apt_install libfaketime || echo "chaos.sh: libfaketime not installed: no clock skew" >&2
fi
command -v node >/dev/null || die "node is missing (Azurite needs it)"

if [[ ! -x .venv/bin/python ]]; then
    python3 -m venv .venv || die "python3 -m venv failed (on Debian: apt-get install python3-venv)"
fi
.venv/bin/python -m pip install --quiet --disable-pip-version-check -r tests/requirements.txt \
    || die "pip install -r tests/requirements.txt failed"

bin_dir=${CHAOS_BIN_DIR:-}
args=("$@")
for a in "${args[@]}"; do
    [[ $a == -h || $a == --help ]] && exec .venv/bin/python tests/chaos/campaign.py --help
done
for ((i = 0; i < ${#args[@]}; i++)); do
    [[ ${args[i]} == --bin-dir ]] && bin_dir=${args[i + 1]:-}
    [[ ${args[i]} == --bin-dir=* ]] && bin_dir=${args[i]#--bin-dir=}
done
if [[ -z $bin_dir ]]; then
    cargo build --release --quiet --bins --workspace || die "build failed"
    bin_dir=target/release
fi
export CHAOS_BIN_DIR=$bin_dir
exec .venv/bin/python tests/chaos/campaign.py "$@"
