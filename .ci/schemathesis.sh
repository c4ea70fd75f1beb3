#!/usr/bin/env bash
# Property-based tests of the HTTP API against its own OpenAPI document: starts `keel serve`
# on a free port with a temporary data directory, creates an organisation and a key, runs
# schemathesis once as an operator and once as the organisation, and fails on any 5xx answer
# or any answer that does not match the document.
#
# Usage: .ci/schemathesis.sh [path to the keel binary]   (default: a fresh debug build)
set -euo pipefail
cd "$(dirname "$0")/.."

SCHEMATHESIS_VERSION=4.32.5
EXAMPLES="${SCHEMATHESIS_EXAMPLES:-100}"

export CARGO_TARGET_DIR="${CARGO_TARGET_DIR:-/var/tmp/keel-target}"
keel="${1:-}"
if [[ -z "$keel" ]]; then
  cargo build -q -p keel
  keel="$CARGO_TARGET_DIR/debug/keel"
fi

# schemathesis in its own virtual environment, pinned (not a KEEL_* variable: keel reads those).
venv="${SCHEMATHESIS_VENV:-/var/tmp/keel-schemathesis-$SCHEMATHESIS_VERSION}"
if [[ ! -x "$venv/bin/schemathesis" ]]; then
  python3 -m venv "$venv"
  "$venv/bin/pip" install -q "schemathesis==$SCHEMATHESIS_VERSION"
fi

work="$(mktemp -d)"
pid=""
cleanup() {
  if [[ -n "$pid" ]]; then
    kill -TERM "$pid" 2>/dev/null || true
    wait "$pid" 2>/dev/null || true
  fi
  rm -rf "$work"
}
trap cleanup EXIT

port="$(python3 -c 'import socket; s = socket.socket(); s.bind(("127.0.0.1", 0)); print(s.getsockname()[1])')"
base="http://127.0.0.1:$port"

# A short request timeout keeps long-polling claims short; the pressure thresholds are out of
# reach, so a slow disk does not shed creates (503 `overloaded` is keel working as designed,
# but it is a 5xx to schemathesis).
export KEEL_HTTP__REQUEST_TIMEOUT=3s
export KEEL_OVERLOAD__PRESSURE__ELEVATED_COMMIT_LATENCY=1h
export KEEL_OVERLOAD__PRESSURE__CRITICAL_COMMIT_LATENCY=2h
export KEEL_OVERLOAD__PRESSURE__ELEVATED_QUEUE_DEPTH=1000000
export KEEL_OVERLOAD__PRESSURE__CRITICAL_QUEUE_DEPTH=2000000
export KEEL_STORE__SYNCHRONOUS=normal

"$keel" serve --data-dir "$work/data" --listen "127.0.0.1:$port" >"$work/keel.log" 2>&1 &
pid=$!
for _ in $(seq 1 100); do
  curl -fsS "$base/healthz" >/dev/null 2>&1 && break
  sleep 0.1
done
curl -fsS "$base/healthz" >/dev/null || { cat "$work/keel.log"; exit 1; }

operator_key="$(cat "$work/data/operator-key")"
"$keel" admin --data-dir "$work/data" create-org schemathesis >/dev/null
org_key="$("$keel" admin --data-dir "$work/data" create-key --org schemathesis --name schemathesis \
  --scopes admin,commands:write,commands:read,agent --agent schemathesis-agent | grep -o 'keel_[A-Za-z0-9_]*' | head -n 1)"
[[ -n "$org_key" ]] || { echo "no organisation key" >&2; exit 1; }

run() {
  "$venv/bin/schemathesis" run "$base/openapi.json" \
    --checks not_a_server_error,response_schema_conformance \
    --max-examples "$EXAMPLES" \
    --request-timeout 10 \
    --seed 1 \
    --generation-database none \
    --no-color \
    "$@"
}

status=0
run --header "Authorization: Bearer $org_key" || status=1
run --header "Authorization: Bearer $operator_key" --include-path-regex '^/v1/admin/' || status=1

if [[ "$status" -ne 0 ]]; then
  echo "--- keel's log (errors) ---"
  grep -iE 'error|panic' "$work/keel.log" | tail -n 50 || true
fi
exit "$status"
