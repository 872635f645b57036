#!/usr/bin/env bash
# The deterministic simulation (tests/sim, docs/reliability.md).
#   scripts/sim.sh                  the CI budget: seeds 0..300 against tests/sim/known-defects.txt
#   scripts/sim.sh --seed N         replay seed N exactly, printing its history and violations
#                                   (SIM_LOG=rtp_durability=info adds the service's log lines)
#   scripts/sim.sh --seeds N [--from S]
#                                   run N seeds from S (default 0); fails on any violation
#   scripts/sim.sh --write-known [--seeds N]
#                                   rewrite tests/sim/known-defects.txt from seeds 0..N (review the diff)
# Builds through the shared cargo lock when /work/.cargo.lock exists.
set -euo pipefail
cd "$(dirname "$0")/.."

usage() { sed -n '2,9p' "$0" | sed 's/^# \{0,1\}//'; exit 2; }
die() { echo "sim.sh: $*" >&2; exit 2; }

mode=budget seed= seeds= from=0
while (($#)); do
    case "$1" in
        --seed) [[ $# -ge 2 && $2 =~ ^[0-9]+$ ]] || die "--seed needs a whole number"; mode=replay seed=$2; shift 2 ;;
        --seeds) [[ $# -ge 2 && $2 =~ ^[0-9]+$ ]] || die "--seeds needs a whole number"; seeds=$2; [[ $mode == budget ]] && mode=explore; shift 2 ;;
        --from) [[ $# -ge 2 && $2 =~ ^[0-9]+$ ]] || die "--from needs a whole number"; from=$2; shift 2 ;;
        --write-known) mode=write; shift ;;
        -h|--help) usage ;;
        *) die "unknown argument $1 (try --help)" ;;
    esac
done

lock=()
[[ -e /work/.cargo.lock ]] && lock=(flock /work/.cargo.lock)
"${lock[@]}" cargo nextest run --no-run --test sim >/dev/null 2>&1 \
    || "${lock[@]}" cargo nextest run --no-run --test sim

case $mode in
    budget)
        SIM_SEEDS=${seeds:-300} exec cargo nextest run --test sim -E 'test(seed_budget) | test(regression_seeds)' --no-capture ;;
    replay)
        SIM_SEED=$seed exec cargo nextest run --test sim --run-ignored only -E 'test(replay_seed)' --no-capture ;;
    explore)
        SIM_SEEDS=$seeds SIM_FROM=$from exec cargo nextest run --test sim --run-ignored only -E 'test(explore)' --no-capture ;;
    write)
        SIM_SEEDS=${seeds:-300} exec cargo nextest run --test sim --run-ignored only -E 'test(write_known_defects)' --no-capture ;;
esac
