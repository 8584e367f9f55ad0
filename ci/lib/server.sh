# shellcheck shell=bash
# A throwaway backvault for CI scripts: a Postgres database of its own, `backvault serve` on
# a free port with a random signing key, tokens, reference agents, and cleanup on exit.
# Source it; do not run it.
#
#   source ci/lib/server.sh
#   bv_init sdk-python              # log prefix, work dir, EXIT trap (call first)
#   bv_build                        # BACKVAULT_BIN, BACKVAULT_AGENT_BIN (cargo build if unset)
#   bv_start_server                 # database + server: BASE_URL, ADMIN_TOKEN
#   bv_start_agent                  # one agent on the default inventory: BV_VM_ID, ...
#
# or all of that at once: `bv_init NAME && bv_up`.
#
# Knobs (environment, read by the functions):
#   DATABASE_URL         Postgres to create the throwaway database on (its db name is
#                        replaced; default postgres://postgres@127.0.0.1:5432/postgres)
#   BACKVAULT_BIN        a prebuilt server binary; with BACKVAULT_AGENT_BIN, skips cargo
#   BACKVAULT_AGENT_BIN  a prebuilt agent binary
#   BV_KEEP              1: keep the work dir (logs, inventories) after exit
#
# Exported for the tests (all strings):
#   BASE_URL             http://127.0.0.1:PORT (no trailing slash)
#   ADMIN_TOKEN          an admin token for every subscription (`*`), valid 1h
#   BV_SUBSCRIPTION_ID   the subscription of the default agent's VM (sub-ci)
#   BV_RESOURCE_GROUP    its resource group (rg-ci)
#   BV_REGION            its region (westeurope)
#   BV_VM_NAME           the default agent's VM name (sqlvm-ci)
#   BV_VM_ID             that VM's id, once its agent has enrolled (bv_start_agent waits)
#   BV_INSTANCE          the SQL Server instance of its inventory (MSSQLSERVER)
#   BV_DATABASES         its user databases, comma-separated (sales,hr,finance); all in the
#                        full recovery model, none with a name issue
#
# Also set (not exported): BV_WORK (work dir: logs, inventories, token files), BV_DB (the
# database name), BV_DB_URL, BV_SERVER_LOG, BV_SERVER_PID, BV_JWT_SECRET.
#
# Functions:
#   bv_init NAME                    log prefix NAME; creates BV_WORK; installs the EXIT trap
#   bv_on_exit 'COMMAND'            runs COMMAND at exit, before processes are stopped
#   bv_build                        sets BACKVAULT_BIN / BACKVAULT_AGENT_BIN (debug build)
#   bv_create_db                    creates the throwaway database (BV_DB, BV_DB_URL)
#   bv_start_server [ARGS...]       creates the database if needed, starts the server (extra
#                                   ARGS go to `backvault serve`), waits for /readyz, exports
#                                   BASE_URL and ADMIN_TOKEN
#   bv_token ROLE [ARGS...]         prints a token: `backvault token --role ROLE --ttl 1h
#                                   ARGS...` with this server's key and database
#                                   (e.g. bv_token enrollment --subscription sub-ci)
#   bv_write_inventory FILE VM SUBSCRIPTION RESOURCE_GROUP REGION INSTANCE DB...
#                                   writes an agent inventory (TOML): one instance, full
#                                   recovery model, backups taking no time
#   bv_spawn_agent NAME INVENTORY ENROLLMENT_TOKEN [ARGS...]
#                                   starts `backvault-agent` (log in BV_WORK/NAME.log, token
#                                   file BV_WORK/NAME.token); prints nothing, sets BV_LAST_PID
#   bv_wait_vm NAME SUBSCRIPTION    prints the id of VM NAME once its agent has enrolled
#   bv_start_agent                  the default VM (sqlvm-ci, see above): inventory,
#                                   enrollment token, agent, BV_VM_ID
#   bv_up [SERVER ARGS...]          bv_build, bv_start_server, bv_start_agent
#   bv_stop_pid PID                 SIGTERM, up to 5 s, then SIGKILL (for processes of your own)
#   bv_log MESSAGE / bv_die MESSAGE
#
# Requires bash 4+, curl, psql, python3.

BV_NAME="${BV_NAME:-ci}"
BV_WORK=""
BV_DB=""
BV_DB_URL=""
BV_SERVER_PID=""
BV_SERVER_LOG=""
BV_JWT_SECRET=""
BV_LAST_PID=""
BV_PIDS=()
BV_EXIT_HOOKS=()

bv_log() { echo "$BV_NAME: $*" >&2; }
bv_die() {
    echo "$BV_NAME: $*" >&2
    exit 1
}

bv_init() {
    BV_NAME="${1:-$BV_NAME}"
    local tool
    for tool in curl psql python3; do
        command -v "$tool" >/dev/null || bv_die "$tool is required"
    done
    DATABASE_URL="${DATABASE_URL:-postgres://postgres@127.0.0.1:5432/postgres}"
    BV_WORK="$(mktemp -d "${TMPDIR:-/tmp}/backvault-$BV_NAME.XXXXXX")"
    trap bv_cleanup EXIT
    trap 'exit 130' INT
    trap 'exit 143' TERM
}

bv_on_exit() { BV_EXIT_HOOKS+=("$1"); }

# Stops one process: SIGTERM, up to 5 s to exit, then SIGKILL.
bv_stop_pid() {
    local pid=$1
    [[ -n "$pid" ]] && kill -0 "$pid" 2>/dev/null || return 0
    kill -TERM "$pid" 2>/dev/null || true
    local _
    for _ in $(seq 1 50); do
        kill -0 "$pid" 2>/dev/null || break
        sleep 0.1
    done
    kill -KILL "$pid" 2>/dev/null || true
    wait "$pid" 2>/dev/null || true
}

# shellcheck disable=SC2317  # run by the EXIT trap, which shellcheck does not follow
bv_cleanup() {
    local rc=$? hook pid
    trap - EXIT
    for hook in "${BV_EXIT_HOOKS[@]}"; do
        eval "$hook" || true
    done
    # Agents first (they would only retry against a server that is going away).
    for pid in "${BV_PIDS[@]}"; do
        bv_stop_pid "$pid"
    done
    bv_stop_pid "$BV_SERVER_PID"
    if [[ -n "$BV_DB" ]]; then
        psql "$DATABASE_URL" -qAtc "drop database if exists \"$BV_DB\" with (force)" \
            >/dev/null 2>&1 || bv_log "could not drop database $BV_DB"
    fi
    if [[ -n "$BV_WORK" && -d "$BV_WORK" ]]; then
        if [[ "${BV_KEEP:-0}" == 1 || $rc -ne 0 ]]; then
            bv_log "logs kept in $BV_WORK"
        else
            rm -rf "$BV_WORK"
        fi
    fi
    exit "$rc"
}

bv_build() {
    if [[ -n "${BACKVAULT_BIN:-}" && -n "${BACKVAULT_AGENT_BIN:-}" ]]; then
        :
    else
        # (`--bin backvault -p backvault-agent` alone selects only the agent's package.)
        local build=(cargo build --locked -p backvault -p backvault-agent
            --bin backvault --bin backvault-agent)
        bv_log "${build[*]}"
        "${build[@]}" >&2 || bv_die "cargo build failed"
        local target
        target="$(cargo metadata --format-version 1 --no-deps \
            | python3 -c 'import json,sys; print(json.load(sys.stdin)["target_directory"])')"
        BACKVAULT_BIN="${BACKVAULT_BIN:-$target/debug/backvault}"
        BACKVAULT_AGENT_BIN="${BACKVAULT_AGENT_BIN:-$target/debug/backvault-agent}"
    fi
    [[ -x "$BACKVAULT_BIN" ]] || bv_die "no server binary at $BACKVAULT_BIN"
    [[ -x "$BACKVAULT_AGENT_BIN" ]] || bv_die "no agent binary at $BACKVAULT_AGENT_BIN"
    # Absolute, so that a client started in another directory (sdk/typescript) finds them.
    BACKVAULT_BIN="$(realpath "$BACKVAULT_BIN")"
    BACKVAULT_AGENT_BIN="$(realpath "$BACKVAULT_AGENT_BIN")"
    export BACKVAULT_BIN BACKVAULT_AGENT_BIN
}

bv_create_db() {
    [[ -n "$BV_DB" ]] && return 0
    local db="backvault_${BV_NAME//[^a-zA-Z0-9]/_}_$$"
    psql "$DATABASE_URL" -qAtc "create database \"$db\"" >/dev/null \
        || bv_die "cannot create database $db on ${DATABASE_URL%/*}"
    BV_DB="$db"
    BV_DB_URL="${DATABASE_URL%/*}/$BV_DB"
}

bv_start_server() {
    [[ -n "$BV_WORK" ]] || bv_die "call bv_init first"
    [[ -n "${BACKVAULT_BIN:-}" ]] || bv_build
    bv_create_db
    # A random key per run: tokens minted here are worthless after it.
    BV_JWT_SECRET="$(python3 -c 'import secrets; print(secrets.token_hex(32))')"
    BV_SERVER_LOG="$BV_WORK/server.log"
    bv_log "starting $BACKVAULT_BIN (database $BV_DB)"
    DATABASE_URL="$BV_DB_URL" BACKVAULT_JWT_SECRET="$BV_JWT_SECRET" \
        BACKVAULT_SHUTDOWN_GRACE_SECONDS=2 \
        "$BACKVAULT_BIN" serve --listen 127.0.0.1:0 --log-format json "$@" \
        >"$BV_SERVER_LOG" 2>&1 &
    BV_SERVER_PID=$!

    # The server logs `{"message":"listening","addr":"127.0.0.1:PORT",...}` once bound.
    local addr="" _
    for _ in $(seq 1 300); do
        kill -0 "$BV_SERVER_PID" 2>/dev/null \
            || { cat "$BV_SERVER_LOG" >&2; bv_die "server exited at start"; }
        addr="$(python3 - "$BV_SERVER_LOG" <<'PY'
import json, sys
for line in open(sys.argv[1], errors="replace"):
    try:
        entry = json.loads(line)
    except ValueError:
        continue
    if isinstance(entry, dict) and entry.get("message") == "listening":
        print(entry["addr"])
        break
PY
)"
        [[ -n "$addr" ]] && break
        sleep 0.1
    done
    [[ -n "$addr" ]] || { cat "$BV_SERVER_LOG" >&2; bv_die "server did not log 'listening' within 30s"; }
    BASE_URL="http://$addr"
    local ready=""
    for _ in $(seq 1 100); do
        if [[ "$(curl -s -o /dev/null -w '%{http_code}' "$BASE_URL/readyz")" == 200 ]]; then
            ready=1
            break
        fi
        sleep 0.2
    done
    [[ -n "$ready" ]] || { cat "$BV_SERVER_LOG" >&2; bv_die "$BASE_URL/readyz is not 200"; }
    ADMIN_TOKEN="$(bv_token admin --subscription '*' --subject "$BV_NAME")" \
        || bv_die "cannot mint the admin token"
    export BASE_URL ADMIN_TOKEN
    bv_log "server at $BASE_URL"
}

bv_token() {
    local role=$1
    shift
    [[ -n "$BV_JWT_SECRET" ]] || bv_die "bv_token: no server started"
    # The token is on stdout, its id on stderr. Enrollment tokens are recorded in the
    # server's database.
    DATABASE_URL="$BV_DB_URL" BACKVAULT_JWT_SECRET="$BV_JWT_SECRET" \
        "$BACKVAULT_BIN" token --role "$role" --ttl 1h "$@" 2>"$BV_WORK/token.err" \
        || { cat "$BV_WORK/token.err" >&2; bv_die "backvault token --role $role $* failed"; }
}

bv_write_inventory() {
    local file=$1 vm=$2 sub=$3 rg=$4 region=$5 instance=$6
    shift 6
    {
        printf 'sysadmin = true\n\n[vm]\n'
        printf 'name = "%s"\nresource_group = "%s"\nsubscription_id = "%s"\nregion = "%s"\n' \
            "$vm" "$rg" "$sub" "$region"
        printf 'deployment_model = "resource_manager"\nagent_version = "1.0.0"\n'
        printf 'dotnet_version = "4.8"\nsql_iaas_extension = true\nother_backup_product = false\n\n'
        printf '[[instances]]\nname = "%s"\nversion = "2019"\n\n' "$instance"
        printf '[faults]\nbackup_millis = 0\n'
        local db
        for db in "$@"; do
            printf '\n[[databases]]\ninstance = "%s"\nname = "%s"\n' "$instance" "$db"
            printf 'recovery_model = "full"\nsize_bytes = 1048576\n'
        done
    } >"$file"
}

bv_spawn_agent() {
    local name=$1 inventory=$2 enroll=$3
    shift 3
    [[ -n "${BASE_URL:-}" ]] || bv_die "bv_spawn_agent: no server started"
    # Only BACKVAULT_LOG and the enrollment token reach the agent from here: every other
    # setting is a flag, so that stray BACKVAULT_* variables of the caller do not.
    env -u BACKVAULT_JWT_SECRET BACKVAULT_ENROLLMENT_TOKEN="$enroll" BACKVAULT_LOG=info \
        "$BACKVAULT_AGENT_BIN" \
        --server "$BASE_URL" \
        --inventory "$inventory" \
        --token-file "$BV_WORK/$name.token" \
        --state-file "$BV_WORK/$name.state.json" \
        --heartbeat-seconds 2 \
        --claim-wait-seconds 5 \
        --shutdown-grace-seconds 2 \
        "$@" >"$BV_WORK/$name.log" 2>&1 &
    BV_LAST_PID=$!
    BV_PIDS+=("$BV_LAST_PID")
}

bv_wait_vm() {
    local name=$1 sub=$2 id="" _
    for _ in $(seq 1 150); do
        id="$(curl -s -H "Authorization: Bearer $ADMIN_TOKEN" \
            "$BASE_URL/v1/vms?subscription_id=$sub&limit=200" \
            | python3 -c '
import json, sys
name = sys.argv[1]
try:
    page = json.load(sys.stdin)
except ValueError:
    sys.exit()
for vm in page.get("items", []):
    if vm.get("name") == name and vm.get("agent_installed"):
        print(vm["id"])
' "$name")"
        [[ -n "$id" ]] && break
        sleep 0.2
    done
    [[ -n "$id" ]] || bv_die "VM $name did not enroll within 30s"
    echo "$id"
}

bv_start_agent() {
    export BV_SUBSCRIPTION_ID=sub-ci BV_RESOURCE_GROUP=rg-ci BV_REGION=westeurope
    export BV_VM_NAME=sqlvm-ci BV_INSTANCE=MSSQLSERVER BV_DATABASES=sales,hr,finance
    local inventory="$BV_WORK/$BV_VM_NAME.toml" enroll
    local -a dbs
    IFS=, read -r -a dbs <<<"$BV_DATABASES"
    bv_write_inventory "$inventory" "$BV_VM_NAME" "$BV_SUBSCRIPTION_ID" "$BV_RESOURCE_GROUP" \
        "$BV_REGION" "$BV_INSTANCE" "${dbs[@]}"
    enroll="$(bv_token enrollment --subscription "$BV_SUBSCRIPTION_ID" \
        --vm-name "$BV_VM_NAME" --resource-group "$BV_RESOURCE_GROUP")" \
        || bv_die "cannot mint the enrollment token"
    bv_spawn_agent "$BV_VM_NAME" "$inventory" "$enroll"
    local pid=$BV_LAST_PID
    if ! BV_VM_ID="$(bv_wait_vm "$BV_VM_NAME" "$BV_SUBSCRIPTION_ID")"; then
        cat "$BV_WORK/$BV_VM_NAME.log" >&2
        bv_die "agent $BV_VM_NAME did not enroll"
    fi
    kill -0 "$pid" 2>/dev/null || { cat "$BV_WORK/$BV_VM_NAME.log" >&2; bv_die "agent exited"; }
    export BV_VM_ID
    bv_log "agent for VM $BV_VM_NAME ($BV_VM_ID) running"
}

bv_up() {
    bv_build
    bv_start_server "$@"
    bv_start_agent
}
