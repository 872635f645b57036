#!/usr/bin/env bash
# The test command. Starts everything the tests need, runs every suite, stops
# what it started:
#   - Azurite (pinned in azurite/, installed with npm ci) on a free port
#   - Redis (installed from the OS packages if missing) on a free port
#   - PostgreSQL (the OS packages' binaries, installed if missing) on a free port
#   - a Python virtualenv (.venv) with tests/requirements.txt
#   - the Rust tests (cargo nextest; they include the deterministic simulation's
#     CI budget, tests/sim: 300 seeds against tests/sim/known-defects.txt), the
#     Service Bus conformance check with
#     Microsoft's SDK against the in-repo broker, a schemathesis pass over the
#     HTTP API, the deployment checks, and the real-process fault campaign's
#     quick mode (scripts/chaos.sh --quick, after its auditor's self-check).
# Needs: cargo (with cargo-nextest if present), node + npm, python3.
set -uo pipefail
cd "$(dirname "$0")/.."
repo=$(pwd)
work=$(mktemp -d "${TMPDIR:-/tmp}/rtpd-test.XXXXXX")
failed=()

cleanup() {
    scripts/azurite.sh stop "$work/azurite.env" >/dev/null 2>&1 || true
    [[ -x scripts/redis.sh ]] && scripts/redis.sh stop "$work/redis.env" >/dev/null 2>&1 || true
    scripts/postgres.sh stop "$work/postgres.env" >/dev/null 2>&1 || true
    rm -rf "$work"
}
trap cleanup EXIT

step() { printf '\n== %s\n' "$*"; }
die() { echo "test.sh: $*" >&2; exit 1; }

step "Azurite"
scripts/azurite.sh start "$work/azurite.env" || die "could not start Azurite"
set -a; . "$work/azurite.env"; set +a

if [[ -x scripts/redis.sh ]]; then
    step "Redis"
    scripts/redis.sh start "$work/redis.env" || die "could not start Redis"
    set -a; . "$work/redis.env"; set +a
fi

step "PostgreSQL"
scripts/postgres.sh start "$work/postgres.env" || die "could not start PostgreSQL"
set -a; . "$work/postgres.env"; set +a

step "Python test dependencies (.venv)"
if [[ ! -x .venv/bin/python ]]; then
    python3 -m venv .venv || die "python3 -m venv failed (on Debian: apt-get install python3-venv)"
fi
.venv/bin/python -m pip install --quiet --disable-pip-version-check -r tests/requirements.txt \
    || die "pip install -r tests/requirements.txt failed"
export SB_INTEROP_PYTHON="$repo/.venv/bin/python"
export RTPD_TEST_PYTHON="$repo/.venv/bin/python"

step "Build"
# One debug build serves both the tests and the suites that run the binaries:
# building the tests builds rtpd and sb-test-broker with the tests' features
# (tests/ of each package start its binary) and puts them in target/debug.
# A separate `cargo build --bins` would compile every dependency a second time
# with the features the dev-dependencies leave out (tokio's test-util, ...).
if cargo nextest --version >/dev/null 2>&1; then
    cargo nextest run --workspace --no-run --cargo-quiet || die "build failed"
else
    cargo test --workspace --no-run --quiet || die "build failed"
fi
[[ -x target/debug/rtpd && -x target/debug/sb-test-broker ]] || die "the test build left no target/debug/rtpd or sb-test-broker"
# The starvation test (tests/api/hostile_clients.rs) runs against the
# release binary, as issue 20 asks.
cargo build --quiet --release --bin rtpd || die "release build failed"
export RTPD_TEST_RELEASE_BIN="$repo/target/release/rtpd"

step "Rust tests"
if cargo nextest --version >/dev/null 2>&1; then
    cargo nextest run --workspace --profile ci || failed+=("rust tests")
else
    cargo test --workspace || failed+=("rust tests")
fi

step "Service Bus conformance (Microsoft's azure-servicebus SDK against the test broker)"
.venv/bin/python tests/servicebus/conformance.py --broker-bin target/debug/sb-test-broker \
    || failed+=("servicebus conformance")

step "API fuzzing (schemathesis from /openapi.json against rtpd api, fixed budget)"
scripts/fuzz-api.sh target/debug/rtpd .venv/bin/schemathesis 25 || failed+=("api fuzzing")

step "Deployment files (compose, Bicep, emulator config)"
target/debug/rtpd config --env-names >"$work/env-names" || die "rtpd config --env-names failed"
.venv/bin/python tests/deploy/check_deploy.py --env-names "$work/env-names" || failed+=("deployment checks")

step "Fault campaign auditor self-check (doctored histories must fail the audit)"
.venv/bin/python -m unittest discover -s tests/chaos -p 'test_*.py' || failed+=("chaos auditor self-check")

step "Fault campaign (scripts/chaos.sh --quick: the production-shaped stack, >= 100 faults, audited)"
# Debug binaries (built above); its own Azurite, Redis and broker on free
# ports. Report and logs: target/chaos/<time>-seed<seed>/.
# Every check fails the run: the last known one, attempt_after_journaled_success
# (issue 12 item 7), was fixed on 2026-11-30 (a reconcile pass re-reads the
# journal before it restores; the long campaign and seeds 300..1300 found none).
scripts/chaos.sh --quick --seed "${RTPD_CHAOS_SEED:-1}" --bin-dir target/debug \
    || failed+=("fault campaign")

if ((${#failed[@]})); then
    printf '\nFAILED: %s\n' "${failed[*]}"
    exit 1
fi
printf '\nall suites passed\n'
