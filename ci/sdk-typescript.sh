#!/usr/bin/env bash
# The TypeScript SDK suite: generates types from the committed openapi/openapi.json with
# openapi-typescript, type-checks sdk/typescript (a client that uses only openapi-fetch and
# those types) with `tsc --noEmit`, and runs its flow (src/flow.ts) against a real
# `backvault serve` on a throwaway database, with a real `backvault-agent` that the flow
# starts with an enrollment token it asks the API for.
#
#   bash ci/sdk-typescript.sh
#
# Fails when the generator prints a warning or an error, when tsc finds a type error (an
# error body typed `never` is one: the flow reads `error.code` of every failure it expects),
# when the flow fails an expectation or outlives SDK_TYPESCRIPT_TIMEOUT, or when the server
# logged a panic or an ERROR line.
#
# Knobs (environment):
#   DATABASE_URL            Postgres to create the throwaway database on (its db name is replaced)
#   BACKVAULT_BIN           a prebuilt server binary } both set: no cargo build
#   BACKVAULT_AGENT_BIN     a prebuilt agent binary  }
#   SDK_TYPESCRIPT_TIMEOUT  seconds the flow may take (default 120)
#   SDK_TYPESCRIPT_SPEC     the OpenAPI document to generate from (default openapi/openapi.json)
#   BV_KEEP=1               keep the work dir (server and agent logs) after the run
#
# node_modules is installed with `npm ci` from the committed package-lock.json (npm's own
# cache makes a second run fast); src/schema.d.ts is generated on every run and never
# committed.
set -euo pipefail
cd "$(dirname "$0")/.."

SDK=sdk/typescript
SPEC="${SDK_TYPESCRIPT_SPEC:-openapi/openapi.json}"
SDK_TYPESCRIPT_TIMEOUT="${SDK_TYPESCRIPT_TIMEOUT:-120}"

# shellcheck source=ci/lib/server.sh
source ci/lib/server.sh
bv_init sdk-typescript
for tool in node npm timeout; do
    command -v "$tool" >/dev/null || bv_die "$tool is required"
done
node -e 'process.exit(Number(process.versions.node.split(".")[0]) >= 20 ? 0 : 1)' \
    || bv_die "node 20 or later is required (found $(node --version))"
STARTED=$SECONDS
SPEC_ABS="$(cd "$(dirname "$SPEC")" && pwd)/$(basename "$SPEC")"
[[ -f "$SPEC_ABS" ]] || bv_die "no OpenAPI document at $SPEC"

# --- dependencies, types, type check ---------------------------------------------------------

phase=$SECONDS
bv_log "npm ci in $SDK (node $(node --version), npm $(npm --version))"
(cd "$SDK" && npm ci --no-audit --no-fund --prefer-offline --loglevel=error) >&2 \
    || bv_die "npm ci failed"
bv_log "npm ci took $((SECONDS - phase))s"

phase=$SECONDS
GEN_LOG="$BV_WORK/openapi-typescript.log"
bv_log "generating $SDK/src/schema.d.ts from $SPEC"
set +e
(cd "$SDK" && npx --no-install openapi-typescript "$SPEC_ABS" -o src/schema.d.ts) >"$GEN_LOG" 2>&1
rc=$?
set -e
# The generator validates the document (Redocly) and prints what it cannot express.
if [[ $rc -ne 0 ]] || grep -qiE 'warn|error|invalid|unsupported|could not|unable' "$GEN_LOG"; then
    cat "$GEN_LOG" >&2
    bv_die "openapi-typescript reported problems with $SPEC (exit $rc)"
fi
[[ -s "$SDK/src/schema.d.ts" ]] || bv_die "no types generated"

bv_log "tsc --noEmit"
(cd "$SDK" && npx --no-install tsc --noEmit) >&2 || bv_die "tsc found type errors (above)"
bv_log "types generated and checked in $((SECONDS - phase))s"

# --- server, then the flow (which starts its own agent) -------------------------------------

phase=$SECONDS
bv_build # cargo build unless BACKVAULT_BIN and BACKVAULT_AGENT_BIN are both set
bv_log "binaries ready in $((SECONDS - phase))s"

# shellcheck disable=SC2119  # no extra `backvault serve` arguments
bv_start_server

FLOW_WORK_DIR="$BV_WORK/flow"
mkdir -p "$FLOW_WORK_DIR"
export FLOW_WORK_DIR
# The flow stops its agent itself; should it be killed first (timeout), this does.
# shellcheck disable=SC2016  # expanded when the hook runs
bv_on_exit '[[ -s "$FLOW_WORK_DIR/agent.pid" ]] && bv_stop_pid "$(cat "$FLOW_WORK_DIR/agent.pid")"'

phase=$SECONDS
bv_log "running src/flow.ts (at most ${SDK_TYPESCRIPT_TIMEOUT}s)"
set +e
# `node --import tsx`: one process, so that the timeout's signal reaches the flow itself.
(cd "$SDK" && timeout --kill-after=10 "$SDK_TYPESCRIPT_TIMEOUT" node --import tsx src/flow.ts)
rc=$?
set -e
if [[ $rc -eq 124 || $rc -eq 137 ]]; then
    bv_log "the flow did not finish within ${SDK_TYPESCRIPT_TIMEOUT}s"
fi
bv_log "the flow took $((SECONDS - phase))s, exit $rc"
if [[ $rc -eq 0 ]]; then
    # The example docs/clients.md quotes (tests/openapi.rs keeps the two identical).
    bv_log "running src/example.ts"
    set +e
    (cd "$SDK" && timeout --kill-after=10 30 node --import tsx src/example.ts)
    rc=$?
    set -e
fi

# Every 5xx is logged at ERROR; a panic prints "panicked at".
if grep -qE '"level":"ERROR"|panicked at' "$BV_SERVER_LOG"; then
    bv_log "the server logged panics or ERROR lines:"
    grep -E '"level":"ERROR"|panicked at' "$BV_SERVER_LOG" | head -n 20 >&2
    rc=1
fi
if [[ $rc -ne 0 ]]; then
    bv_log "server log: $BV_SERVER_LOG; agent log: $FLOW_WORK_DIR/*.log"
    bv_log "FAILED after $((SECONDS - STARTED))s"
    exit "$rc"
fi
bv_log "passed in $((SECONDS - STARTED))s"
