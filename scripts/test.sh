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
#     HTTP API, the operations console in headless Chromium (installed by
#     scripts/browser.sh when missing), the deployment checks, and the
#     real-process fault campaign's
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

# Each step's start, in seconds since the script began (for CI's time budget).
step() { printf '\n== %s  [%dm%02ds]\n' "$*" $((SECONDS / 60)) $((SECONDS % 60)); }
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
# librdkafka's build tools (a C compiler, make, pkg-config, OpenSSL's headers).
scripts/build-deps.sh || die "the C build tools librdkafka needs are missing"
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

# The tests that start the release build of rtpd (the starvation tests of
# issue 20, the recovery-time scenarios) run in a pass of their own, after
# the release build, which runs in the background beside the Python suites
# below (they start processes that mostly wait on each other, so the build
# takes up the idle core). In the first pass `release_rtpd()` refuses to run
# (RTPD_TEST_NO_RELEASE), so a new such test not listed here fails loudly
# instead of quietly running the debug build.
release_tests='test(/^recovery_time::/) | test(/^hostile_clients::(slow_anonymous_replays_against_the_release_binary|forgers_from_a_few_addresses_cannot_starve|forged_signature_headers_wait_in_the_unverified_pool)/)'

step "Rust tests (debug build; the release-binary tests come after the release build)"
if cargo nextest --version >/dev/null 2>&1; then
    RTPD_TEST_NO_RELEASE=1 cargo nextest run --workspace --profile ci -E "not ($release_tests)" \
        || failed+=("rust tests")
else
    cargo test --workspace || failed+=("rust tests")
fi

step "Release build of rtpd (in the background, beside the next steps)"
# Without the Kafka intake (librdkafka): nothing in the release pass uses it.
(cargo build --quiet --release --bin rtpd --no-default-features >"$work/release-build.log" 2>&1
    echo $? >"$work/release-build.rc") &
release_build=$!

step "Service Bus conformance (Microsoft's azure-servicebus SDK against the test broker)"
.venv/bin/python tests/servicebus/conformance.py --broker-bin target/debug/sb-test-broker \
    || failed+=("servicebus conformance")

step "API fuzzing (schemathesis from /openapi.json against rtpd api, fixed budget)"
scripts/fuzz-api.sh target/debug/rtpd .venv/bin/schemathesis 25 || failed+=("api fuzzing")

step "Operations console in a real browser (headless Chromium over WebDriver)"
# scripts/browser.sh installs Debian's chromium and chromium-driver when
# missing and fails when it cannot: the browser test never skips quietly.
# Screenshots and logs: target/console-browser/.
if scripts/browser.sh >"$work/browser.env"; then
    (set -a; . "$work/browser.env"; set +a
        .venv/bin/python tests/console/browser.py --rtpd-bin target/debug/rtpd \
            --out "$repo/target/console-browser") || failed+=("console browser test")
else
    failed+=("console browser test (no chromium: scripts/browser.sh failed)")
fi

step "Deployment files (compose, Bicep, emulator config)"
target/debug/rtpd config --env-names >"$work/env-names" || die "rtpd config --env-names failed"
.venv/bin/python tests/deploy/check_deploy.py --env-names "$work/env-names" || failed+=("deployment checks")

step "Fault campaign auditor self-check (doctored histories must fail the audit)"
.venv/bin/python -m unittest discover -s tests/chaos -p 'test_*.py' || failed+=("chaos auditor self-check")

step "Rust tests against the release build of rtpd"
wait "$release_build"
if [[ $(cat "$work/release-build.rc" 2>/dev/null) != 0 ]]; then
    cat "$work/release-build.log"
    failed+=("release build")
elif cargo nextest --version >/dev/null 2>&1; then
    RTPD_TEST_RELEASE_BIN="$repo/target/release/rtpd" cargo nextest run --workspace --profile ci \
        --cargo-quiet -E "$release_tests" || failed+=("rust tests (release binary)")
else
    echo "cargo-nextest is missing: the release-binary tests ran in the debug pass" >&2
fi

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
printf '\nall suites passed  [%dm%02ds]\n' $((SECONDS / 60)) $((SECONDS % 60))
