#!/usr/bin/env bash
# Bounded API fuzzing: schemathesis against a real `backvault serve` on a throwaway
# database, with a little seeded data so that ids in paths resolve to real resources.
#
#   bash ci/fuzz.sh
#
# Fails when schemathesis reports a failing check (all of them by default: 5xx, status codes,
# response schemas, content types and headers the spec documents, schema-valid requests
# rejected, schema-violating requests accepted, resources gone or missing after the calls
# the spec's links describe), or when the server logged a panic or an ERROR line (every 5xx
# is logged at ERROR, so this also catches 5xx answers to requests that schemathesis did not
# flag). Where a check's expectation does not fit an operation (a 422 for a rule that no
# schema can state), the generated config says so per operation, with the reason.
#
# Knobs (environment):
#   DATABASE_URL        Postgres to create the throwaway database on (its db name is replaced)
#   BACKVAULT_BIN       a prebuilt server binary; skips `cargo build` (ci/lib/server.sh builds
#                       the server and the agent when it is unset)
#   FUZZ_SEED           schemathesis/hypothesis seed (fixed by default: runs are reproducible)
#   FUZZ_CHECKS         schemathesis checks (comma-separated; default all)
#   FUZZ_MAX_EXAMPLES   test cases per operation and phase
#   FUZZ_PHASES         schemathesis phases
#   FUZZ_RUN_TIMEOUT    seconds one schemathesis run may take before it is stopped
#   FUZZ_TIME_BUDGET    seconds all runs together may take (a run gets what is left, at most
#                       FUZZ_RUN_TIMEOUT); a run stopped by either bound fails the script
#   FUZZ_WORKERS        schemathesis workers
#   FUZZ_OUT            where logs and reports go (default target/fuzz; a new run replaces
#                       what the last one left there)
set -euo pipefail
cd "$(dirname "$0")/.."

# --- settings -----------------------------------------------------------------------------

# Every check: the spec is the contract (issue #12). Exceptions are per operation, in the
# generated config below, never global.
FUZZ_CHECKS="${FUZZ_CHECKS:-all}"
FUZZ_MAX_EXAMPLES="${FUZZ_MAX_EXAMPLES:-20}"
FUZZ_SEED="${FUZZ_SEED:-20250101}"
FUZZ_PHASES="${FUZZ_PHASES:-examples,coverage,fuzzing,stateful}"
FUZZ_RUN_TIMEOUT="${FUZZ_RUN_TIMEOUT:-300}"
# Keeps the whole script within ~8 minutes on a 2-core machine, build and seeding included
# (the three runs with the defaults take about a minute together).
FUZZ_TIME_BUDGET="${FUZZ_TIME_BUDGET:-420}"
# One worker: with several, hypothesis parses lambda sources with `ast` from several threads,
# which on some CPython builds (3.11.7 here) fails with "AST constructor recursion depth
# mismatch" and shows up as a schemathesis error that is no finding.
FUZZ_WORKERS="${FUZZ_WORKERS:-1}"
FUZZ_OUT="${FUZZ_OUT:-target/fuzz}"

# schemathesis 4 changed its CLI and config format; pin what this script was written against.
SCHEMATHESIS_VERSION=4.32.5
VENV=target/fuzz-venv

# shellcheck source=ci/lib/server.sh
source ci/lib/server.sh
bv_init fuzz
log() { bv_log "$*"; }
die() { bv_die "$*"; }
command -v timeout >/dev/null || die "timeout is required"

mkdir -p "$FUZZ_OUT"
FUZZ_OUT="$(cd "$FUZZ_OUT" && pwd)"
# Only what an earlier run left: FUZZ_OUT may be a directory with other things in it.
rm -rf "$FUZZ_OUT"/{agent,admin,enroll} "$FUZZ_OUT"/{agent,admin,enroll}.log \
    "$FUZZ_OUT"/{server.log,offending.log,schemathesis.toml,openapi.json,openapi-strict.json}

# --- schemathesis ---------------------------------------------------------------------------

if [[ "$("$VENV/bin/schemathesis" --version 2>/dev/null || true)" != *"version $SCHEMATHESIS_VERSION" ]]; then
    log "installing schemathesis $SCHEMATHESIS_VERSION into $VENV"
    [[ -x "$VENV/bin/python" ]] || python3 -m venv "$VENV"
    "$VENV/bin/python" -m pip install --quiet --disable-pip-version-check \
        "schemathesis==$SCHEMATHESIS_VERSION"
fi
PY="$VENV/bin/python"
ST="$VENV/bin/schemathesis"
log "$("$ST" --version)"

# --- the server ------------------------------------------------------------------------------

# Leases outlive the fuzz runs, so the jobs seeded as running keep their leases instead of
# being rescued back to pending half-way through.
bv_start_server --lease-seconds 3600
BASE="$BASE_URL"
# The spec the runs test (generated from the code): failures are read against this one.
curl -sf "$BASE/openapi.json" -o "$FUZZ_OUT/openapi.json" || die "no $BASE/openapi.json"
# The runs test the spec without its `default` responses: `default` would make every status
# conform, and each status the server answers must be documented on its operation (a 5xx
# fails the run either way).
"$PY" - "$FUZZ_OUT/openapi.json" "$FUZZ_OUT/openapi-strict.json" <<'PY'
import json, sys
doc = json.load(open(sys.argv[1]))
for item in doc["paths"].values():
    for operation in item.values():
        if isinstance(operation, dict):
            operation.get("responses", {}).pop("default", None)
json.dump(doc, open(sys.argv[2], "w"))
PY

# --- tokens, seed data, schemathesis config -----------------------------------------------

# Enrollment tokens are recorded in the server's database, and are single-use by default.
ENROLL_TOKEN="$(bv_token enrollment --subscription sub-fuzz --subject fuzz)"
# The enrollment run gets a token of another subscription: re-enrolling the seeded VM would
# revoke the agent token (harmless, that run comes last, but it would muddle the seed).
ENROLL_TOKEN_FUZZ="$(bv_token enrollment --subscription sub-fuzz-enroll --max-uses 100 --subject fuzz)"
CONFIG="$FUZZ_OUT/schemathesis.toml"

# Walks the README's flow as an operator and an agent would: vaults, an enrolled VM,
# discovery, protection with full backups (so recovery points exist), auto-protection, a
# policy, and backup jobs left running under leases for the agent run. Then writes the
# schemathesis config: random UUIDs only ever reach "not found", so dictionaries make most
# generated ids and references the seeded ones, and the handlers run past their lookups.
# Destructive operations get "victim" resources of their own, or an early DELETE/stop
# would turn every later request on the shared fixtures into a 404.
# Prints the agent token.
AGENT_TOKEN="$("$PY" - "$BASE" "$ADMIN_TOKEN" "$ENROLL_TOKEN" "$CONFIG" <<'PY'
import datetime, json, sys, urllib.error, urllib.request

base, admin, enroll, config_path = sys.argv[1:5]

def call(method, path, token, body=None, ok=(200, 201, 202, 204)):
    req = urllib.request.Request(base + path, method=method,
                                 data=None if body is None else json.dumps(body).encode())
    req.add_header("Authorization", f"Bearer {token}")
    if body is not None:
        req.add_header("Content-Type", "application/json")
    try:
        with urllib.request.urlopen(req, timeout=30) as res:
            status, text = res.status, res.read().decode()
    except urllib.error.HTTPError as e:
        status, text = e.code, e.read().decode()
    if status not in ok:
        sys.exit(f"seed: {method} {path} answered {status}: {text}")
    return json.loads(text) if text else None

def vault(name):
    return call("POST", "/v1/vaults", admin, {"name": name, "subscription_id": "sub-fuzz",
                "resource_group": "rg-fuzz", "region": "westeurope"})["id"]

vault_id, victim_vault = vault("fuzz-vault"), vault("fuzz-victim")
facts = {"name": "fuzz-vm", "resource_group": "rg-fuzz", "subscription_id": "sub-fuzz",
         "region": "westeurope", "deployment_model": "resource_manager", "agent_version": "1.0.0",
         "dotnet_version": "4.8", "sql_iaas_extension": True, "other_backup_product": False}
enrolled = call("POST", "/v1/agent/enroll", enroll, {"facts": facts})
vm, agent = enrolled["vm_id"], enrolled["agent_token"]
victim_vm = call("PUT", "/v1/vms", admin, {"name": "fuzz-victim-vm", "resource_group": "rg-fuzz",
                 "subscription_id": "sub-fuzz", "region": "westeurope",
                 "deployment_model": "resource_manager"})["id"]

inventory = {
    "instances": [{"name": "MSSQLSERVER", "version": "2019"}, {"name": "SQL2", "version": "2017"}],
    "databases": [{"instance": i, "name": n, "recovery_model": m, "size_bytes": 1024}
                  for i, n, m in (("MSSQLSERVER", "sales", "full"), ("MSSQLSERVER", "hr", "simple"),
                                  ("SQL2", "finance", "full"))],
}
now = datetime.datetime.now(datetime.timezone.utc).replace(microsecond=0).isoformat()
next_lsn = iter(range(1000, 10**9, 10))

def run_jobs(leave_running=False):
    """Plays the agent: claims the pending jobs and completes them (or leaves them running)."""
    claimed = call("POST", "/v1/agent/claim", agent, {"max_jobs": 50, "wait_seconds": 0})["jobs"]
    for job in [] if leave_running else claimed:
        kind = job["kind"]
        if kind == "discovery":
            result = {"kind": "discovery", "inventory": inventory}
        elif kind == "configure_protection":
            result = {"kind": "configure_protection"}
        elif kind.startswith("backup_"):
            points = []
            for item in job["items"]:
                first = next(next_lsn)
                points.append({"instance": item["instance"], "database": item["database"],
                               "backup_type": "full", "started_at": now, "backup_time": now,
                               "first_lsn": str(first), "last_lsn": str(first + 5),
                               "database_backup_lsn": str(first), "size_bytes": 100})
            result = {"kind": "backup", "recovery_points": points}
        else:
            result = {"kind": "restore", "restored_database": "restored"}
        call("POST", f"/v1/agent/jobs/{job['job_id']}/complete", agent,
             {"lease": job["lease"], "result": result})
    return claimed

completed_job = call("POST", f"/v1/vaults/{vault_id}/vms/{vm}/discover", admin)["id"]
run_jobs()
containers = call("GET", f"/v1/vaults/{vault_id}/protectable-items", admin)
instances = {c["name"]: c["id"] for c in containers}
databases = {d["name"]: d["id"] for c in containers for d in c["databases"]}
call("POST", f"/v1/vaults/{vault_id}/protected-items", admin,
     {"policy": "HourlyLogBackup", "databases": [databases["sales"], databases["hr"]]})
run_jobs()
items = {i["database"]: i["id"] for i in
         call("GET", f"/v1/vaults/{vault_id}/protected-items", admin)["items"]}
for item in items.values():
    call("POST", f"/v1/vaults/{vault_id}/protected-items/{item}/backup", admin,
         {"type": "full", "retention_days": 45})
run_jobs()
points = [p["id"] for p in call("GET", f"/v1/vaults/{vault_id}/protected-items/{items['sales']}"
                                 "/recovery-points", admin)["items"]]
intent = call("POST", f"/v1/vaults/{vault_id}/auto-protection", admin,
              {"instance_id": instances["MSSQLSERVER"], "policy": "HourlyLogBackup"})["id"]
victim_intent = call("POST", f"/v1/vaults/{vault_id}/auto-protection", admin,
                     {"instance_id": instances["SQL2"], "policy": "HourlyLogBackup"})["id"]
run_jobs()
for name in ("Gold", "Victim"):
    call("POST", f"/v1/vaults/{vault_id}/policies/HourlyLogBackup/copy", admin,
         {"target_vault_id": vault_id, "name": name})
# Jobs running under leases for the agent run (each complete/fail ends one), then one left
# pending for the admin run.
for _ in range(4):
    call("POST", "/v1/jobs", admin, {"vm_id": vm, "kind": "backup_full",
         "items": [{"instance": "MSSQLSERVER", "database": "sales"}]})
running = run_jobs(leave_running=True)
pending = call("POST", "/v1/jobs", admin, {"vm_id": vm, "kind": "backup_log",
               "items": [{"instance": "MSSQLSERVER", "database": "sales"}]})["id"]

dictionaries = {
    "vault_ids": [vault_id], "victim_vault_ids": [victim_vault],
    "vm_ids": [vm], "victim_vm_ids": [victim_vm],
    "item_ids": [items["sales"]], "victim_item_ids": [items["hr"]],
    "intent_ids": [intent], "victim_intent_ids": [victim_intent],
    "policy_names": ["HourlyLogBackup", "Gold"], "victim_policy_names": ["Victim"],
    "job_ids": [j["job_id"] for j in running] + [pending, completed_job],
    "leases": [j["lease"] for j in running],
    "database_ids": list(databases.values()), "instance_ids": list(instances.values()),
    "instance_names": [i["name"] for i in inventory["instances"]],
    "database_names": [d["name"] for d in inventory["databases"]],
    "lsns": ["1000", "1005", "1010", "99999999999999999999999999"],
    "instants": [now],
    "recovery_point_ids": points,
    # Claims long-poll for up to wait_seconds when no job is pending; values in 1..60
    # would only make the run wait. These still probe the bounds.
    "no_wait": [0, 61, 2147483647],
    # A job read with ?wait= long-polls until the job changes (at most 60s): the seeded jobs
    # do not change, so waits stay short and the run does not sit out minutes.
    "short_waits": ["0", "0s", "5ms", "1"],
    # Free-text body fields, now and then: a NUL (Postgres text and jsonb refuse it, and the
    # schema's `pattern` forbids control characters, so schemathesis sends it only in negative
    # cases: the probe that the server rejects NUL with a 4xx) and strings that look like
    # instants at or past the ends of what chrono and Postgres represent.
    # Idempotency keys as HTTP delivers them: a generated key padded with spaces or tabs
    # arrives trimmed (RFC 9110 strips whitespace around a field value), so a key the
    # schema refuses would reach the server as one it takes; the server's own refusals of
    # long and non-ASCII keys are tested in tests/api.
    "idempotency_keys": ["retry-1", "0" * 255, "k"],
    "hostile_strings": ["a\u0000b", "-4714-11-24T00:00:00Z", "-262143-01-01T00:00:00Z",
                        "+262142-12-31T23:59:59Z"],
    # date-time parameters: valid RFC 3339 instants whose UTC value lies past year 0 or 9999
    # (Postgres has no year 0; a UTC offset moves them past the 4-digit years).
    "edge_instants": ["0000-01-01T00:00:00Z", "0000-01-01T00:00:00+23:59",
                      "9999-12-31T23:59:59-23:59", "9999-12-31T23:59:59.999999999Z"],
}
bind = lambda d, p: f'{{ dictionary = "{d}", probability = {p} }}'
parameters = {
    "path.vault_id": bind("vault_ids", 0.8), "path.vm_id": bind("vm_ids", 0.8),
    "path.item_id": bind("item_ids", 0.8), "path.intent_id": bind("intent_ids", 0.8),
    "path.job_id": bind("job_ids", 0.8), "path.policy_name": bind("policy_names", 0.6),
    "query.vm_id": bind("vm_ids", 0.5),
    "body.vm_id": bind("vm_ids", 0.8), "body.target_vm_id": bind("vm_ids", 0.5),
    "body.target_vault_id": bind("vault_ids", 0.8),
    "body.databases[*]": bind("database_ids", 0.8), "body.instance_id": bind("instance_ids", 0.8),
    "body.recovery_point_id": bind("recovery_point_ids", 0.5),
    "body.policy": bind("policy_names", 0.6), "body.lease": bind("leases", 0.7),
    "header.Idempotency-Key": bind("idempotency_keys", 1.0),
    # Recovery points the agent reports: about the seeded databases, with plausible LSNs,
    # so that some are recorded and later reads (recovery points, restore plans) see them.
    **{f"body.result.recovery_points[*].{field}": bind(d, 0.7) for field, d in (
        ("instance", "instance_names"), ("database", "database_names"),
        ("first_lsn", "lsns"), ("last_lsn", "lsns"), ("database_backup_lsn", "lsns"),
        ("started_at", "instants"), ("backup_time", "instants"))},
    # Free-text fields, which no validation rule narrows beyond "no control characters".
    # Only these: a type-wide string binding would also put the NUL and the instant-like
    # strings into enums, uuids, dates and names, where they are never schema-valid and so
    # only duplicate what the negative phase already sends there.
    **{f"body.{field}": bind("hostile_strings", 0.1) for field in (
        "description", "facts.agent_version", "facts.dotnet_version", "code", "message",
        "warnings[*]", "target_database", "result.restored_database")},
    **{f"{where}": bind("edge_instants", 0.2) for where in (
        "query.created_after", "query.created_before", "query.from", "body.point_in_time")},
}
operations = {  # operation id -> parameter -> dictionary (probability 1)
    "delete_vault": {"path.vault_id": "victim_vault_ids"},
    "delete_vm": {"path.vm_id": "victim_vm_ids"},
    "stop_protection": {"path.item_id": "victim_item_ids"},
    "disable_auto_protection": {"path.intent_id": "victim_intent_ids"},
    "delete_policy": {"path.policy_name": "victim_policy_names"},
    "claim_jobs": {"body.wait_seconds": "no_wait"},
    "claim_jobs_v2": {"body.wait_seconds": "no_wait"},
    "get_job": {"query.wait": "short_waits"},
}

# Statuses that are right answers although the generic checks do not expect them, per
# operation, each with why. positive_data_acceptance wants 2xx/3xx/401/403/404/409/429 for
# schema-valid requests; a 422 is right where a rule cannot be written in JSON Schema (it
# depends on stored state, or on other fields in a way the schema does not express); a 400
# never is (it would mean the schema promises more than the server takes: a defect of the
# schema or the server, which the run must report). negative_data_rejection wants
# 400/401/403/404/405/406/409/415/422/428/429 for schema-violating requests.
POSITIVE = ["2xx", "3xx", "401", "403", "404", "409", "429", "5xx"]
NEGATIVE = ["400", "401", "403", "404", "405", "406", "409", "415", "422", "428", "429", "5xx"]
# An If-Match that names no current ETag of the resource (random, empty or stale) fails the
# precondition: 412 is the answer RFC 9110 prescribes, for generated ETags valid or not.
PRECONDITION = "412 Precondition Failed: a generated If-Match never names the current ETag"
expectations = {  # operation id -> (extra positive statuses, extra negative statuses, why)
    "preview_policy": (["422"], [], "422: a policy must hold the backup rules (an existing "
                       "IANA time zone, retention minimums and caps, log frequency, cross-field "
                       "rules between full, differential, log and retention), and `from` lies "
                       "between 1970 and 9000 (a year no date-time format bounds)"),
    "list_jobs": (["422"], [], "422: created_after and created_before lie between 1970 and "
                  "9000 (a year no date-time format bounds)"),
    "create_policy": (["422"], [], "422: the backup rules, as for preview_policy"),
    "replace_policy": (["412", "422"], ["412"],
                       f"422: the backup rules, as for preview_policy; {PRECONDITION}"),
    "update_vault": (["412"], ["412"], PRECONDITION),
    "delete_vault": (["412"], ["412"], PRECONDITION),
    "delete_policy": (["412"], ["412"], PRECONDITION),
    "change_protected_item_policy": (["412", "422"], ["412"], "422: the policy must exist in "
                                     f"the item's vault; {PRECONDITION}"),
    "create_vault": (["422"], [], "422: an Idempotency-Key reused with another body "
                     "(the coverage phase sends one key with many bodies), as the IETF "
                     "Idempotency-Key draft prescribes"),
    "copy_policy": (["422"], [], "422: an Idempotency-Key reused with another body, as for "
                    "create_vault"),
    "create_enrollment_token": (["422"], [], "422: vm_name and resource_group bind a token "
                                "to a VM together: both or neither (null counts as absent)"),
    "dispatch_job": (["422"], [], "422: the items must be databases of the VM's inventory, "
                     "the VM must have an agent, and each kind has its own item rules"),
    "enable_auto_protection": (["422"], [], "422: the instance or availability group must be "
                               "in the vault's inventory and the policy in the vault"),
    "configure_protection": (["422"], [], "422: the databases must be protectable items of "
                             "the vault, not yet protected, and the policy must exist in it"),
    "backup_now": (["422"], [], "422: retention_days is for full backups only, and its range "
                   "depends on copy_only and the item's state"),
    "start_restore": (["422"], [], "422: the recovery point or point in time must be in the "
                      "item's recovery chain, the target VM registered with the vault"),
    "plan_restore": (["422"], [], "422: as for start_restore"),
    "discover_vm": (["422"], [], "422: the VM must meet the registration prerequisites "
                    "(agent, .NET version, SQL IaaS extension, no other backup product)"),
    "list_protected_items": (["422"], [], "422: the policy filter must name a policy of "
                             "the vault"),
    "complete_job": (["422"], [], "422: the result kind must match the job's kind, and the "
                     "recovery points reported must belong to the job's items"),
    "claim_jobs_v2": (["422"], [], "422: as for complete_job, for the results it carries (the "
                      "text rule refuses a control character in any string of the body, field "
                      "names of a result included)"),
    "change_vault_safety": (["422"], [], "422: the settings must hold together (retention "
                            "bounds need immutability, the minimum under the maximum, a final "
                            "lock and always-on soft delete stay), across fields and the "
                            "vault's current state"),
    "create_guard": (["422"], [], "422: the always-guarded operations are not listed (the "
                     "operations share one enum with approvals)"),
    "list_audit_events": (["422"], [], "422: from and to lie between 1970 and 9000, as for "
                          "list_jobs"),
}
# Per-operation settings that are no status.
extra = {
    # A claim long-polls for up to wait_seconds when no job is pending; the coverage phase's
    # positive boundary case wait_seconds=60 would only make the run wait a minute on an
    # empty queue. Negative coverage cases still go out; positive claims come from the
    # fuzzing and stateful phases, with the no_wait dictionary. A long poll answers within
    # wait_seconds (at most 60) by design, so the response-time limit is above that.
    "claim_jobs": ['phases.coverage.generation.mode = "negative"', "checks.max_response_time = 65"],
    "claim_jobs_v2": ['phases.coverage.generation.mode = "negative"', "checks.max_response_time = 65"],
    # The coverage phase's boundary waits still reach 60s: a long poll by design.
    "get_job": ["checks.max_response_time = 65"],
}

toml_list = lambda items: json.dumps(items)
with open(config_path, "w") as f:
    f.write("# Written by ci/fuzz.sh for one run: ids of the seeded resources.\n")
    # No crash cache (.schemathesis/ in the work tree): every run starts from the seed alone.
    f.write("[cache]\nenabled = false\n\n")
    for name, values in dictionaries.items():
        f.write(f"[dictionaries.{name}]\nvalues = {json.dumps(values)}\n")
    # The stateful phase follows the links the spec declares (and Location headers), not
    # links schemathesis guesses from field names: a guessed link from a nullable field
    # (a VM's vault_id, say) sends the literal "None" as a path id, which is no request a
    # client of this spec would make.
    f.write('\n[phases.stateful.inference]\nalgorithms = ["location-headers"]\n')
    f.write("\n[parameters]\n")
    for key, value in parameters.items():
        f.write(f'"{key}" = {value}\n')
    # One section per operation: schemathesis applies the first that matches.
    for op in dict.fromkeys([*operations, *expectations, *extra]):
        f.write("\n")
        lines = []
        if op in expectations:
            positive, negative, why = expectations[op]
            f.write(f"# {op}: {why}\n")
            if positive:
                lines.append("checks.positive_data_acceptance.expected-statuses = "
                             + toml_list(POSITIVE + positive))
            if negative:
                lines.append("checks.negative_data_rejection.expected-statuses = "
                             + toml_list(NEGATIVE + negative))
        if op in operations:
            inline = ", ".join(f'"{k}" = {bind(d, 1.0)}' for k, d in operations[op].items())
            lines.append(f"parameters = {{ {inline} }}")
        lines += extra.get(op, [])
        f.write(f'[[operations]]\ninclude-operation-id = "{op}"\n' + "".join(l + "\n" for l in lines))
print(agent)
PY
)" || die "seeding failed"
log "seeded; schemathesis config in $CONFIG"

# --- fuzz runs -------------------------------------------------------------------------------

FAILED_RUNS=()
FUZZ_STARTED=$SECONDS

# fuzz_run NAME TOKEN PHASES [schemathesis filter options...]
fuzz_run() {
    local name=$1 token=$2 phases=$3
    shift 3
    local limit=$((FUZZ_TIME_BUDGET - (SECONDS - FUZZ_STARTED)))
    if ((limit < 10)); then
        echo "fuzz: no time left for run '$name' (FUZZ_TIME_BUDGET=${FUZZ_TIME_BUDGET}s)" >&2
        FAILED_RUNS+=("$name (not run: no time left)")
        return
    fi
    ((limit <= FUZZ_RUN_TIMEOUT)) || limit=$FUZZ_RUN_TIMEOUT
    log "schemathesis run '$name' (at most ${limit}s)"
    local started=$SECONDS rc
    # SIGINT first: schemathesis then still prints its summary of what it found so far.
    # No example database: a fixed seed then means the same cases on every machine.
    # Health checks off: they judge the generator (slow or over-filtered strategies for the
    # large policy bodies), not the server. Request timeout: long polls answer within 60s.
    set +e
    timeout --signal=INT --kill-after=20 "$limit" \
        "$ST" --config-file "$CONFIG" run "$FUZZ_OUT/openapi-strict.json" --url "$BASE" \
        --header "Authorization: Bearer $token" \
        --checks "$FUZZ_CHECKS" \
        --phases "$phases" \
        --max-examples "$FUZZ_MAX_EXAMPLES" \
        --seed "$FUZZ_SEED" \
        --workers "$FUZZ_WORKERS" \
        --generation-database none \
        --suppress-health-check all \
        --request-timeout 65 \
        --no-color \
        --report junit,ndjson --report-dir "$FUZZ_OUT/$name" \
        "$@" 2>&1 | tee "$FUZZ_OUT/$name.log"
    rc=${PIPESTATUS[0]}
    set -e
    log "run '$name' took $((SECONDS - started))s, exit $rc"
    if [[ $rc -eq 124 || $rc -eq 137 ]]; then
        echo "fuzz: run '$name' did not finish within ${limit}s" >&2
        FAILED_RUNS+=("$name (timed out)")
    elif [[ $rc -ne 0 ]]; then
        FAILED_RUNS+=("$name")
    fi
}

# The agent run goes first: the admin run cancels jobs and re-registers or removes VMs,
# which would leave the agent run little to work on. Enrollment comes last (see above).
# The spec's links are between admin operations: the agent protocol and enrollment have
# none to follow, and a stateful phase there is an error ("all link definitions required
# for stateful testing are excluded by filters"), not a test.
NO_LINK_PHASES="$(tr ',' '\n' <<<"$FUZZ_PHASES" | grep -vx stateful | paste -sd, -)"
if [[ -n "$NO_LINK_PHASES" ]]; then
    fuzz_run agent "$AGENT_TOKEN" "$NO_LINK_PHASES" \
        --include-path-regex '^/v[12]/agent/' --exclude-path /v1/agent/enroll
fi
fuzz_run admin "$ADMIN_TOKEN" "$FUZZ_PHASES" --exclude-path-regex '^/v[12]/agent/'
if [[ -n "$NO_LINK_PHASES" ]]; then
    fuzz_run enroll "$ENROLL_TOKEN_FUZZ" "$NO_LINK_PHASES" --include-path /v1/agent/enroll
fi

# --- verdict -----------------------------------------------------------------------------------

# Every 5xx is logged at ERROR (crates/api/src/error.rs); a panic prints "panicked at" and,
# on the next line, its message. Collects those lines into $OFFENDING and prints one line per
# distinct route and error, with counts (each 5xx logs "request failed" and "response failed").
# The server's log beside the runs' logs, kept whatever the verdict.
SERVER_LOG="$FUZZ_OUT/server.log"
cp "$BV_SERVER_LOG" "$SERVER_LOG"
OFFENDING="$FUZZ_OUT/offending.log"
SUMMARY="$("$PY" - "$SERVER_LOG" "$OFFENDING" <<'PY'
import collections, json, sys
lines = open(sys.argv[1], errors="replace").read().splitlines()
offending, seen = [], collections.Counter()
for i, line in enumerate(lines):
    if "panicked at" in line:
        message = lines[i + 1].strip() if i + 1 < len(lines) else ""
        offending += [line, message]
        seen[f"PANIC at {line.split('panicked at', 1)[1].strip()} {message}"] += 1
        continue
    try:
        entry = json.loads(line)
    except ValueError:
        continue
    if not isinstance(entry, dict) or entry.get("level") != "ERROR":
        continue
    offending.append(line)
    if entry.get("message") != "response failed":
        span = entry.get("span") or {}
        detail = entry.get("error") or " ".join(
            str(entry[k]) for k in ("message", "panic") if k in entry)
        seen[f"{span.get('method', '-')} {span.get('route', '-')}: {detail}"] += 1
with open(sys.argv[2], "w") as f:
    f.writelines(l + "\n" for l in offending)
for what, count in seen.most_common():
    print(f"  {count:5d}  {what}")
PY
)"
status=0
if [[ ${#FAILED_RUNS[@]} -gt 0 ]]; then
    echo "fuzz: schemathesis failed: ${FAILED_RUNS[*]} (details in $FUZZ_OUT/<run>.log)" >&2
    status=1
fi
if [[ -s "$OFFENDING" ]]; then
    echo "fuzz: the server logged panics or ERROR lines; distinct ones, with counts:" >&2
    echo "$SUMMARY" >&2
    echo "fuzz: the offending lines ($(wc -l <"$OFFENDING"), all in $OFFENDING), the first 40:" >&2
    head -n 40 "$OFFENDING" >&2
    status=1
fi
if [[ $status -eq 0 ]]; then
    log "no failures, no panics, no ERROR lines"
fi
exit "$status"
