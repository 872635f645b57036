#!/usr/bin/env bash
# Makes sure headless Chromium and its WebDriver are installed, for the
# console's browser test (tests/console/browser.py).
#
#   scripts/browser.sh            # install when missing, then print the paths
#
# Debian's `chromium` and `chromium-driver` (/usr/bin/chromium,
# /usr/bin/chromedriver): installed with apt-get only when either is
# missing. Exits non-zero, saying why, when they cannot be installed — the
# test script then fails the browser test rather than skipping it. Prints
#   CHROMIUM_BIN=… and CHROMEDRIVER_BIN=…  (sourceable)
set -euo pipefail

die() { echo "browser.sh: $*" >&2; exit 1; }

find_bins() {
    chromium=$(command -v chromium || command -v chromium-browser || true)
    driver=$(command -v chromedriver || true)
}

find_bins
if [[ -z "$chromium" || -z "$driver" ]]; then
    command -v apt-get >/dev/null || die "chromium or chromedriver is missing and apt-get is not available; install Chromium and its driver"
    sudo=()
    [[ $(id -u) -ne 0 ]] && sudo=(sudo)
    echo "browser.sh: installing chromium and chromium-driver (apt-get)" >&2
    "${sudo[@]}" apt-get update -qq >&2 || die "apt-get update failed"
    DEBIAN_FRONTEND=noninteractive "${sudo[@]}" apt-get install -y -qq --no-install-recommends \
        chromium chromium-driver fonts-dejavu-core >&2 \
        || die "apt-get install chromium chromium-driver failed"
    find_bins
fi
[[ -n "$chromium" ]] || die "no chromium after the install"
[[ -n "$driver" ]] || die "no chromedriver after the install"
"$chromium" --version >&2 || die "$chromium does not run"
"$driver" --version >&2 || die "$driver does not run"
echo "CHROMIUM_BIN=$chromium"
echo "CHROMEDRIVER_BIN=$driver"
