#!/usr/bin/env bash
# The Python SDK suite: generates a client from the committed openapi/openapi.json with
# openapi-python-client, and runs sdk/python (pytest) through it against a real
# `backvault serve` and a real `backvault-agent` on a throwaway database.
#
#   bash ci/sdk-python.sh [PYTEST ARGS...]
#
# Fails when the generator prints any warning (a spec construct it cannot express would
# silently drop operations or models), when a test fails, or when the server logged a panic
# or an ERROR line.
#
# Knobs (environment):
#   DATABASE_URL         Postgres to create the throwaway database on (its db name is replaced)
#   BACKVAULT_BIN        a prebuilt server binary } both set: no cargo build
#   BACKVAULT_AGENT_BIN  a prebuilt agent binary  }
#   SDK_PYTHON_TIMEOUT   seconds pytest may take (default 120)
#   SDK_PYTHON_SPEC      the OpenAPI document to generate from (default openapi/openapi.json)
#   BV_KEEP=1            keep the work dir (server and agent logs) after the run
#
# The venv (target/sdk-python-venv) is reused across runs; the generated client is not: it
# lives in a temp dir and is re-installed every run. Nothing generated is committed.
set -euo pipefail
cd "$(dirname "$0")/.."

# openapi-python-client's output changes between minor versions; pin the minor.
GENERATOR_SPEC="openapi-python-client==0.29.*"
VENV=target/sdk-python-venv
SPEC="${SDK_PYTHON_SPEC:-openapi/openapi.json}"
SDK_PYTHON_TIMEOUT="${SDK_PYTHON_TIMEOUT:-120}"

# shellcheck source=ci/lib/server.sh
source ci/lib/server.sh
bv_init sdk-python
command -v timeout >/dev/null || bv_die "timeout is required"
STARTED=$SECONDS

# --- venv: the generator and pytest, nothing else -------------------------------------------

PY="$VENV/bin/python"
if ! [[ -x "$PY" ]] || ! "$PY" -c '
import importlib.metadata as m, sys
sys.exit(not m.version("openapi-python-client").startswith("0.29.") or not m.version("pytest"))
' 2>/dev/null; then
    bv_log "installing $GENERATOR_SPEC and pytest into $VENV"
    [[ -x "$PY" ]] || python3 -m venv "$VENV"
    "$PY" -m pip install --quiet --disable-pip-version-check "$GENERATOR_SPEC" pytest
fi
bv_log "$("$VENV/bin/openapi-python-client" --version)"

# --- the client, generated from the committed spec ------------------------------------------

GEN="$BV_WORK/generated"
mkdir -p "$GEN"
# Fixed names: the default ones derive from the spec's title.
cat >"$GEN/config.yaml" <<'YAML'
package_name_override: backvault_client
project_name_override: backvault-client
YAML
bv_log "generating the client from $SPEC"
set +e
# The venv's bin on PATH: the generator's post hooks run `ruff` (installed with it), and
# warn "ruff is not in PATH" without it.
PATH="$PWD/$VENV/bin:$PATH" "$VENV/bin/openapi-python-client" generate \
    --path "$SPEC" \
    --output-path "$GEN/backvault-client" \
    --meta setup \
    --config "$GEN/config.yaml" \
    --fail-on-warning >"$GEN/generate.log" 2>&1
rc=$?
set -e
# --fail-on-warning covers what the generator counts as warnings; the grep also catches any
# it prints without counting.
if [[ $rc -ne 0 ]] || grep -qiE 'warning|skipping|unable to|cannot|could not' "$GEN/generate.log"; then
    cat "$GEN/generate.log" >&2
    bv_die "openapi-python-client reported problems with $SPEC (exit $rc)"
fi
[[ -d "$GEN/backvault-client/backvault_client/api" ]] || bv_die "no client generated"
# Uninstall first: `version` is fixed, and pip would keep an earlier run's files.
"$PY" -m pip uninstall --quiet --yes backvault-client >/dev/null 2>&1 || true
"$PY" -m pip install --quiet --disable-pip-version-check "$GEN/backvault-client" \
    || bv_die "installing the generated client failed"
bv_log "client generated and installed"

# --- server and agent, then the suite ----------------------------------------------------------

# shellcheck disable=SC2119  # no extra `backvault serve` arguments
bv_up
bv_log "setup took $((SECONDS - STARTED))s"

set +e
# The suite imports the installed package, never the temp dir; -p no:cacheprovider keeps
# .pytest_cache out of the work tree (and no bytecode lands in sdk/python).
PYTHONDONTWRITEBYTECODE=1 timeout --signal=INT --kill-after=15 "$SDK_PYTHON_TIMEOUT" \
    "$PY" -m pytest sdk/python -p no:cacheprovider -q -rfE "$@"
rc=$?
set -e
if [[ $rc -eq 124 || $rc -eq 137 ]]; then
    bv_log "pytest did not finish within ${SDK_PYTHON_TIMEOUT}s"
fi
# Every 5xx is logged at ERROR: one the client parsed as a documented Problem still fails.
if grep -qE '"level":"ERROR"|panicked at' "$BV_SERVER_LOG"; then
    bv_log "the server logged panics or ERROR lines:"
    grep -E '"level":"ERROR"|panicked at' "$BV_SERVER_LOG" | head -n 20 >&2
    [[ $rc -ne 0 ]] || rc=1
fi
if [[ $rc -ne 0 ]]; then
    bv_log "server log: $BV_SERVER_LOG; agent log: $BV_WORK/$BV_VM_NAME.log"
    bv_log "FAILED after $((SECONDS - STARTED))s"
    exit "$rc"
fi
bv_log "passed in $((SECONDS - STARTED))s"
