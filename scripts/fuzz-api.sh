#!/usr/bin/env bash
# Property-based pass over the HTTP API from its own OpenAPI document:
# starts `rtpd api` on a free port with a temp data dir and fresh credentials,
# runs schemathesis with a small fixed budget, stops the server.
#   scripts/fuzz-api.sh <rtpd binary> <schemathesis executable> [max examples]
set -uo pipefail
rtpd=${1:?usage: fuzz-api.sh <rtpd> <schemathesis> [max-examples]}
st=${2:?usage: fuzz-api.sh <rtpd> <schemathesis> [max-examples]}
rtpd=$(realpath "$rtpd"); st=$(realpath -s "$st")
examples=${3:-25}
work=$(mktemp -d "${TMPDIR:-/tmp}/rtpd-fuzz.XXXXXX")
pid=""
cleanup() {
    [[ -n $pid ]] && kill "$pid" 2>/dev/null && wait "$pid" 2>/dev/null
    rm -rf "$work"
}
trap cleanup EXIT

port=$(python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1",0)); print(s.getsockname()[1])')
key="fuzz_vk_$(openssl rand -hex 16)"
admin="fuzz_adm_$(openssl rand -hex 16)"
sha() { printf '%s' "$1" | sha256sum | cut -d' ' -f1; }

RTPD_HTTP_ADDR="127.0.0.1:$port" RTPD_DATA_DIR="$work/data" RTPD_LOG_FORMAT=json \
RTPD_VENDOR_KEYS="fuzz:sha256:$(sha "$key")" RTPD_ADMIN_TOKENS="ops:sha256:$(sha "$admin")" \
RTPD_VENDOR_RATE_PER_SEC=0 \
    "$rtpd" api >"$work/rtpd.log" 2>&1 &
pid=$!
for _ in $(seq 100); do
    curl -fs "http://127.0.0.1:$port/healthz" >/dev/null 2>&1 && break
    sleep 0.1
done

# From the temp dir: schemathesis keeps a cache in its working directory.
# Once as the vendor, once as the operator: a request carrying both an API key
# and a Bearer token is refused as ambiguous (400 ambiguous_credentials).
rc=0
for auth in "X-Api-Key: $key" "Authorization: Bearer $admin"; do
    (cd "$work" && "$st" run "http://127.0.0.1:$port/openapi.json" \
        --checks not_a_server_error,status_code_conformance \
        --max-examples "$examples" --seed 20240601 --workers 1 \
        -H "$auth" \
        --warnings off) || rc=1
done
if ! kill -0 "$pid" 2>/dev/null; then
    echo "fuzz-api.sh: rtpd api died during the run" >&2
    tail -20 "$work/rtpd.log" >&2
    rc=1
elif ! curl -fs "http://127.0.0.1:$port/healthz" >/dev/null; then
    echo "fuzz-api.sh: rtpd api is not healthy after the run" >&2
    rc=1
fi
exit $rc
