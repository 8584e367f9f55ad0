// The product's flow, from TypeScript, against a real backvault server and a real agent.
//
// Only openapi-fetch and the types openapi-typescript generates from openapi/openapi.json
// (src/schema.d.ts, see README.md): every path, parameter, body, response and error body
// below is checked by `tsc --noEmit` against the spec. Nothing is cast.
//
// Environment:
//   BASE_URL             the server, e.g. http://127.0.0.1:8080
//   ADMIN_TOKEN          an admin token for every subscription (`*`)
//   BACKVAULT_AGENT_BIN  the reference agent binary (backvault-agent), started by this flow
//                        with an enrollment token the flow asks the API for
//   FLOW_WORK_DIR        where the agent's inventory, token, state and log go (default: a
//                        new temp dir); the agent's pid is written to FLOW_WORK_DIR/agent.pid
//   FLOW_JOB_TIMEOUT     seconds a job may take to finish (default 60)
//
// Exits 0 when every expectation held, 1 (with the failed expectation on stderr) otherwise.

import { spawn, type ChildProcess } from "node:child_process";
import { randomUUID } from "node:crypto";
import { mkdtempSync, openSync, writeFileSync } from "node:fs";
import { tmpdir } from "node:os";
import { join } from "node:path";

import createClient from "openapi-fetch";

import type { components, paths } from "./schema.js";

type Schemas = components["schemas"];
type Job = Schemas["Job"];
type JobStatus = Schemas["JobStatus"];
type PolicySpec = Schemas["PolicySpec"];

// --- plumbing ----------------------------------------------------------------------------

class FlowFailure extends Error {}

function fail(message: string): never {
  throw new FlowFailure(message);
}

function log(message: string): void {
  console.log(`sdk-typescript: ${message}`);
}

function env(name: string, fallback?: string): string {
  const value = process.env[name] ?? fallback;
  if (value === undefined || value === "") {
    fail(`${name} is not set`);
  }
  return value;
}

/** The status a call answered, or a failure naming the call, the status and the body. */
function expectStatus(what: string, response: Response, expected: number, body: unknown): void {
  if (response.status !== expected) {
    fail(`${what}: expected HTTP ${expected}, got ${response.status}: ${JSON.stringify(body)}`);
  }
}

/** The body of a successful call, or a failure with the error body. */
function ok<T>(what: string, result: { data?: T; error?: unknown; response: Response }, status = 200): T {
  const { data, error, response } = result;
  expectStatus(what, response, status, error ?? data);
  if (data === undefined) {
    fail(`${what}: HTTP ${response.status} without a body`);
  }
  return data;
}

function expectEqual<T>(what: string, actual: T, expected: T): void {
  if (actual !== expected) {
    fail(`${what}: expected ${JSON.stringify(expected)}, got ${JSON.stringify(actual)}`);
  }
}

function check(what: string, condition: boolean): void {
  if (!condition) {
    fail(what);
  }
}

function header(what: string, response: Response, name: string): string {
  const value = response.headers.get(name);
  if (value === null || value === "") {
    fail(`${what}: no ${name} header (HTTP ${response.status})`);
  }
  return value;
}

const baseUrl = env("BASE_URL").replace(/\/+$/, "");
const adminToken = env("ADMIN_TOKEN");
const jobTimeoutMs = Number(env("FLOW_JOB_TIMEOUT", "60")) * 1000;
// Names unique to this run, so that the flow also runs against a server that has seen it.
const run = randomUUID().slice(0, 8);

const api = createClient<paths>({ baseUrl, headers: { Authorization: `Bearer ${adminToken}` } });
const anonymous = createClient<paths>({ baseUrl });
const forged = createClient<paths>({ baseUrl, headers: { Authorization: "Bearer not-a-jwt" } });

// --- jobs: long-polls, no sleeps ---------------------------------------------------------

const TERMINAL: ReadonlySet<JobStatus> = new Set<JobStatus>([
  "completed",
  "completed_with_warnings",
  "failed",
  "cancelled",
]);
const SUCCEEDED: ReadonlySet<JobStatus> = new Set<JobStatus>(["completed", "completed_with_warnings"]);

/**
 * Waits for a job to finish: `GET /v1/jobs/{id}?wait=30s` answers as soon as the job changes
 * state (at once when it has finished), so each call is re-issued until the status is
 * terminal. Fails unless the job succeeded.
 */
async function waitForJob(what: string, jobId: string): Promise<Job> {
  const deadline = Date.now() + jobTimeoutMs;
  let polls = 0;
  for (;;) {
    polls += 1;
    const job = ok(
      `GET /v1/jobs/${jobId}?wait=30s (${what})`,
      await api.GET("/v1/jobs/{job_id}", {
        params: { path: { job_id: jobId }, query: { wait: "30s" } },
      }),
    );
    if (TERMINAL.has(job.status)) {
      if (!SUCCEEDED.has(job.status)) {
        fail(`${what}: job ${jobId} ended ${job.status}: ${JSON.stringify(job.error)}`);
      }
      log(`${what}: job ${jobId} ${job.status} after ${polls} long-poll(s)`);
      return job;
    }
    if (Date.now() > deadline) {
      fail(`${what}: job ${jobId} still ${job.status} after ${jobTimeoutMs / 1000}s`);
    }
    const progress = job.progress;
    if (progress !== undefined && progress !== null && typeof progress.percent === "number") {
      log(`${what}: job ${jobId} ${job.status}, ${progress.percent}% ${progress.message ?? ""}`);
    }
  }
}

// --- the agent -----------------------------------------------------------------------------

function inventory(vm: string, subscription: string, resourceGroup: string): string {
  const databases = [
    ["sales", "full"],
    ["hr", "full"],
    ["staging", "simple"],
  ]
    .map(
      ([name, model]) =>
        `[[databases]]\ninstance = "MSSQLSERVER"\nname = "${name}"\nrecovery_model = "${model}"\nsize_bytes = 1048576\n`,
    )
    .join("\n");
  return [
    "sysadmin = true",
    "",
    "[vm]",
    `name = "${vm}"`,
    `resource_group = "${resourceGroup}"`,
    `subscription_id = "${subscription}"`,
    'region = "westeurope"',
    'deployment_model = "resource_manager"',
    'agent_version = "2.1.0"',
    'dotnet_version = "4.8"',
    "sql_iaas_extension = true",
    "other_backup_product = false",
    "",
    "[[instances]]",
    'name = "MSSQLSERVER"',
    'version = "2019"',
    "",
    databases,
    "[faults]",
    "backup_millis = 0",
    "",
  ].join("\n");
}

let agent: ChildProcess | undefined;

function startAgent(
  workDir: string,
  vm: string,
  subscription: string,
  resourceGroup: string,
  enrollmentToken: string,
): void {
  const agentBin = env("BACKVAULT_AGENT_BIN");
  const inventoryFile = join(workDir, `${vm}.toml`);
  writeFileSync(inventoryFile, inventory(vm, subscription, resourceGroup));
  const logFile = join(workDir, `${vm}.log`);
  const out = openSync(logFile, "a");
  agent = spawn(
    agentBin,
    // prettier-ignore
    [
      "--server", baseUrl,
      "--inventory", inventoryFile,
      "--token-file", join(workDir, `${vm}.token`),
      "--state-file", join(workDir, `${vm}.state.json`),
      "--heartbeat-seconds", "2",
      "--claim-wait-seconds", "5",
      "--shutdown-grace-seconds", "2",
    ],
    {
      // The enrollment token through the environment, not argv (which `ps` shows).
      env: {
        PATH: process.env["PATH"] ?? "",
        BACKVAULT_ENROLLMENT_TOKEN: enrollmentToken,
        BACKVAULT_LOG: "info",
      },
      stdio: ["ignore", out, out],
    },
  );
  const pid = agent.pid;
  if (pid === undefined) {
    fail(`could not start ${agentBin}`);
  }
  writeFileSync(join(workDir, "agent.pid"), `${pid}\n`);
  agent.on("exit", (code, signal) => {
    if (agent !== undefined) {
      log(`the agent exited (${signal ?? code}); its log: ${logFile}`);
      agent = undefined;
    }
  });
  log(`agent for ${vm} started (pid ${pid}, log ${logFile})`);
}

async function stopAgent(): Promise<void> {
  const child = agent;
  if (child === undefined) {
    return;
  }
  agent = undefined;
  const exited = new Promise<void>((resolve) => child.once("exit", () => resolve()));
  child.kill("SIGTERM");
  const timer = setTimeout(() => child.kill("SIGKILL"), 5000);
  await exited;
  clearTimeout(timer);
}

// --- the flow ------------------------------------------------------------------------------

const gold: PolicySpec = {
  time_zone: "Europe/Amsterdam",
  full: { frequency: "weekly", days: ["sunday"], time: "22:00" },
  differential: { days: ["wednesday"], time: "22:00", retention_days: 30 },
  log: { frequency_minutes: 30, retention_days: 14 },
  retention: {
    weekly: { weeks: 8 },
    monthly: { weeks_of_month: ["first"], days_of_week: ["sunday"], months: 12 },
  },
  compression: true,
};

async function authErrors(): Promise<void> {
  // 401 without a token, and with one that is no JWT.
  {
    const { error, response } = await anonymous.GET("/v1/vaults");
    expectStatus("GET /v1/vaults without a token", response, 401, error);
    if (error === undefined) fail("GET /v1/vaults without a token: no error body");
    expectEqual("401 code without a token", error.code, "missing_token");
    expectEqual("401 status field", error.status, 401);
  }
  {
    const { error, response } = await forged.GET("/v1/vaults");
    expectStatus("GET /v1/vaults with a forged token", response, 401, error);
    if (error === undefined) fail("GET /v1/vaults with a forged token: no error body");
    expectEqual("401 code with a forged token", error.code, "invalid_token");
    log(`401 problems typed: ${error.code} (${error.title})`);
  }
}

async function main(): Promise<void> {
  const workDir = process.env["FLOW_WORK_DIR"] || mkdtempSync(join(tmpdir(), "backvault-sdk-ts-"));
  const subscription = `sub-ts-${run}`;
  const resourceGroup = "rg-ts";
  const vmName = `sqlvm-ts-${run}`;
  log(`against ${baseUrl}, run ${run}`);

  await authErrors();

  // A vault, created with an Idempotency-Key: the retry answers the first vault again.
  const vaultBody = {
    name: `ts-${run}`,
    subscription_id: subscription,
    resource_group: resourceGroup,
    region: "westeurope",
  };
  const idempotencyKey = `sdk-ts-${run}`;
  const created = await api.POST("/v1/vaults", {
    params: { header: { "Idempotency-Key": idempotencyKey } },
    body: vaultBody,
  });
  const vault = ok("POST /v1/vaults", created, 201);
  header("POST /v1/vaults", created.response, "ETag");
  header("POST /v1/vaults", created.response, "Location");
  const retried = ok(
    "POST /v1/vaults (the same Idempotency-Key)",
    await api.POST("/v1/vaults", {
      params: { header: { "Idempotency-Key": idempotencyKey } },
      body: vaultBody,
    }),
    201,
  );
  expectEqual("the retried create's vault", retried.id, vault.id);
  log(`vault ${vault.name} (${vault.id})`);

  // 409: the same name again, under another key.
  {
    const { error, response } = await api.POST("/v1/vaults", {
      params: { header: { "Idempotency-Key": `${idempotencyKey}-again` } },
      body: vaultBody,
    });
    expectStatus("POST /v1/vaults with a taken name", response, 409, error);
    if (error === undefined) fail("409 without an error body");
    expectEqual("409 status field", error.status, 409);
    check(`409 has a code (${JSON.stringify(error)})`, error.code.length > 0);
    log(`409 problem typed: ${error.code}`);
  }

  // 404: a vault that does not exist.
  {
    const { error, response } = await api.GET("/v1/vaults/{vault_id}", {
      params: { path: { vault_id: randomUUID() } },
    });
    expectStatus("GET /v1/vaults/{unknown}", response, 404, error);
    if (error === undefined) fail("404 without an error body");
    expectEqual("404 status field", error.status, 404);
    check(`404 has a code (${JSON.stringify(error)})`, error.code.length > 0);
    log(`404 problem typed: ${error.code}`);
  }

  // Preview the policy, then save it.
  const preview = ok(
    "POST /v1/policies/preview",
    await api.POST("/v1/policies/preview", { params: { query: { count: 3 } }, body: gold }),
  );
  expectEqual("previewed fulls", preview.full.length, 3);
  expectEqual("previewed differentials", preview.differential.length, 3);
  expectEqual("previewed logs", preview.log.length, 3);
  check(
    `a 30-minute log policy loses at most ~30 minutes (max_gap_minutes ${preview.max_gap_minutes})`,
    preview.max_gap_minutes <= 30,
  );
  log(`preview: next full ${preview.full[0]?.at ?? "?"}, worst gap ${preview.max_gap_minutes} min`);

  // 422: a policy that is well-formed but breaks the rules (an unknown time zone, a full
  // off the half hour, a daily full without daily retention, logs kept too long), with
  // every violation at once, each with a pointer and a code.
  {
    const broken: PolicySpec = {
      time_zone: "Mars/Base",
      full: { frequency: "daily", time: "02:15" },
      log: { frequency_minutes: 15, retention_days: 60 },
      retention: {},
    };
    const { error, response } = await api.POST("/v1/policies/preview", { body: broken });
    expectStatus("POST /v1/policies/preview (broken)", response, 422, error);
    if (error === undefined) fail("422 without an error body");
    expectEqual("422 code", error.code, "validation_failed");
    const violations = error.errors ?? [];
    check(`422 lists several violations (${JSON.stringify(error)})`, violations.length >= 3);
    for (const v of violations) {
      check(
        `violation has a pointer and a code: ${JSON.stringify(v)}`,
        v.pointer.startsWith("/") && v.code.length > 0,
      );
    }
    log(`422 problem typed: ${error.code}, ${violations.map((v) => `${v.pointer} ${v.code}`).join("; ")}`);
  }

  const policy = ok(
    "POST /v1/vaults/{vault_id}/policies",
    await api.POST("/v1/vaults/{vault_id}/policies", {
      params: { path: { vault_id: vault.id } },
      body: { name: "Gold", spec: gold },
    }),
    201,
  );
  log(`policy ${policy.name} v${policy.version}`);

  // Read it with its ETag, replace it with If-Match; the stale ETag then answers 412.
  const policyPath = { vault_id: vault.id, policy_name: "Gold" };
  const read = await api.GET("/v1/vaults/{vault_id}/policies/{policy_name}", {
    params: { path: policyPath },
  });
  const current = ok("GET the policy", read);
  const etag = header("GET the policy", read.response, "ETag");
  const longer: PolicySpec = { ...gold, log: { frequency_minutes: 15, retention_days: 14 } };
  const replaced = await api.PUT("/v1/vaults/{vault_id}/policies/{policy_name}", {
    params: { path: policyPath, header: { "If-Match": etag } },
    body: { spec: longer },
  });
  const updated = ok("PUT the policy with If-Match", replaced);
  const newEtag = header("PUT the policy", replaced.response, "ETag");
  check(`the ETag changed (${etag} -> ${newEtag})`, newEtag !== etag);
  check(`the version grew (${current.version} -> ${updated.version})`, updated.version > current.version);
  expectEqual("the replaced log frequency", updated.spec.log?.frequency_minutes, 15);
  {
    // A conditional read with the current ETag: 304, no body. openapi-fetch counts a 304
    // neither as data nor as a typed error (the spec gives it no body), so the status is
    // what to look at.
    const { data, response } = await api.GET("/v1/vaults/{vault_id}/policies/{policy_name}", {
      params: { path: policyPath, header: { "If-None-Match": newEtag } },
    });
    expectStatus("GET the policy with If-None-Match", response, 304, data);
    expectEqual("the 304's ETag", response.headers.get("ETag"), newEtag);
  }
  {
    const { error, response } = await api.PUT("/v1/vaults/{vault_id}/policies/{policy_name}", {
      params: { path: policyPath, header: { "If-Match": etag } },
      body: { spec: gold },
    });
    expectStatus("PUT the policy with a stale If-Match", response, 412, error);
    if (error === undefined) fail("412 without an error body");
    expectEqual("412 code", error.code, "precondition_failed");
    log(`412 problem typed: ${error.code} (${error.detail})`);
  }

  // Page through the vault's policies one at a time (HourlyLogBackup comes with the vault).
  const names: string[] = [];
  let cursor: string | undefined;
  let pages = 0;
  do {
    const page = ok(
      "GET /v1/vaults/{vault_id}/policies?limit=1",
      await api.GET("/v1/vaults/{vault_id}/policies", {
        params: {
          path: { vault_id: vault.id },
          query: { limit: 1, ...(cursor === undefined ? {} : { cursor }) },
        },
      }),
    );
    check(`a page of limit=1 holds at most one policy (${page.items.length})`, page.items.length <= 1);
    names.push(...page.items.map((p) => p.name));
    cursor = page.next_cursor ?? undefined;
    pages += 1;
    check("paging ends", pages <= 10);
  } while (cursor !== undefined);
  expectEqual("policies paged through", [...names].sort().join(","), "Gold,HourlyLogBackup");
  log(`paged ${names.length} policies in ${pages} pages: ${names.join(", ")}`);

  // The VM's agent enrolls itself with an enrollment token bound to the VM.
  const enrollment = ok(
    "POST /v1/enrollment-tokens",
    await api.POST("/v1/enrollment-tokens", {
      body: {
        subscription_id: subscription,
        vm_name: vmName,
        resource_group: resourceGroup,
        ttl_seconds: 600,
      },
    }),
    201,
  );
  expectEqual("enrollment token uses", enrollment.max_uses, 1);
  startAgent(workDir, vmName, subscription, resourceGroup, enrollment.token);

  // "Start Discovery": the enrolled VM shows up as a candidate with no issue. Enrollment has
  // no job to wait on, so this (only) is a bounded poll.
  let vmId: string | undefined;
  const enrollDeadline = Date.now() + 30_000;
  while (vmId === undefined) {
    if (agent === undefined) fail("the agent exited before its VM enrolled");
    const candidates = ok(
      "GET /v1/vaults/{vault_id}/discovery",
      await api.GET("/v1/vaults/{vault_id}/discovery", { params: { path: { vault_id: vault.id } } }),
    );
    const mine = candidates.find((c) => c.vm.name === vmName);
    if (mine !== undefined && mine.vm.agent_installed) {
      expectEqual(`issues of ${vmName}`, JSON.stringify(mine.issues), "[]");
      vmId = mine.vm.id;
    } else if (Date.now() > enrollDeadline) {
      fail(`VM ${vmName} did not enroll within 30s`);
    } else {
      await new Promise((resolve) => setTimeout(resolve, 200));
    }
  }
  log(`VM ${vmName} (${vmId}) enrolled`);

  // "Discover DBs": registers the VM with the vault; the job runs on the agent.
  const discover = await api.POST("/v1/vaults/{vault_id}/vms/{vm_id}/discover", {
    params: { path: { vault_id: vault.id, vm_id: vmId } },
  });
  const discovery = ok("POST .../vms/{vm_id}/discover", discover, 202);
  expectEqual("discovery job kind", discovery.kind, "discovery");
  header("POST .../discover", discover.response, "Location");
  const discovered = await waitForJob("discovery", discovery.id);
  // The payload and the result are unions tagged with `kind`: narrowing on it types the rest.
  expectEqual("the discovery job's payload kind", discovered.payload?.kind, "discovery");
  const result = discovered.result;
  if (result === undefined || result === null || result.kind !== "discovery") {
    fail(`the discovery job's result is no discovery: ${JSON.stringify(result)}`);
  }
  expectEqual(
    "databases the agent reported",
    result.inventory.databases
      .map((d) => d.name)
      .sort()
      .join(","),
    "hr,sales,staging",
  );

  // Protectable items: the instance and its databases.
  const containers = ok(
    "GET /v1/vaults/{vault_id}/protectable-items",
    await api.GET("/v1/vaults/{vault_id}/protectable-items", { params: { path: { vault_id: vault.id } } }),
  );
  const instance = containers.find((c) => c.vm_id === vmId && c.name === "MSSQLSERVER");
  if (instance === undefined) fail(`no MSSQLSERVER container: ${JSON.stringify(containers)}`);
  const sales = instance.databases.find((d) => d.name === "sales");
  const hr = instance.databases.find((d) => d.name === "hr");
  if (sales === undefined || hr === undefined)
    fail(`sales and hr not protectable: ${JSON.stringify(instance)}`);
  check("sales is protectable", sales.protectable);
  check("hr is protectable", hr.protectable);
  log(
    `protectable: ${instance.databases.map((d) => `${d.name}${d.protectable ? "" : " (not protectable)"}`).join(", ")}`,
  );

  // Configure protection with the policy; wait for the configure-protection jobs.
  const configured = ok(
    "POST /v1/vaults/{vault_id}/protected-items",
    await api.POST("/v1/vaults/{vault_id}/protected-items", {
      params: { path: { vault_id: vault.id } },
      body: { policy: "Gold", databases: [sales.id, hr.id] },
    }),
    202,
  );
  expectEqual("protected items", configured.items.length, 2);
  check("configure protection made a job", configured.jobs.length >= 1);
  for (const jobId of configured.jobs) {
    await waitForJob("configure protection", jobId);
  }
  const item = configured.items.find((i) => i.database === "sales");
  if (item === undefined) fail(`sales is not among the protected items: ${JSON.stringify(configured.items)}`);
  expectEqual("the item's policy", item.policy, "Gold");

  // The protected items, one page at a time.
  const itemIds: string[] = [];
  let itemCursor: string | undefined;
  do {
    const page = ok(
      "GET /v1/vaults/{vault_id}/protected-items?limit=1",
      await api.GET("/v1/vaults/{vault_id}/protected-items", {
        params: {
          path: { vault_id: vault.id },
          query: { limit: 1, ...(itemCursor === undefined ? {} : { cursor: itemCursor }) },
        },
      }),
    );
    itemIds.push(...page.items.map((i) => i.id));
    itemCursor = page.next_cursor ?? undefined;
    check("paging ends", itemIds.length <= 10);
  } while (itemCursor !== undefined);
  expectEqual("protected items paged through", itemIds.length, 2);

  // An on-demand full backup, and its job.
  const backup = ok(
    "POST .../protected-items/{item_id}/backup",
    await api.POST("/v1/vaults/{vault_id}/protected-items/{item_id}/backup", {
      params: { path: { vault_id: vault.id, item_id: item.id } },
      body: { type: "full", retention_days: 45 },
    }),
    202,
  );
  expectEqual("backup job kind", backup.kind, "backup_full");
  const backedUp = await waitForJob("full backup", backup.id);
  const payload = backedUp.payload;
  if (payload === undefined || payload === null || payload.kind !== "backup_full") {
    fail(`the backup job's payload is no backup_full: ${JSON.stringify(payload)}`);
  }
  expectEqual("the backup's payload: on demand", payload.on_demand, true);
  expectEqual("the backup's payload: retention days", payload.retention_days, 45);
  const backupResult = backedUp.result;
  if (backupResult === undefined || backupResult === null || backupResult.kind !== "backup") {
    fail(`the backup job's result is no backup: ${JSON.stringify(backupResult)}`);
  }
  expectEqual("recovery points the agent reported", backupResult.recovery_points.length, 1);

  // Recovery points: the full, from that job, and a range to restore to.
  const points = ok(
    "GET .../protected-items/{item_id}/recovery-points",
    await api.GET("/v1/vaults/{vault_id}/protected-items/{item_id}/recovery-points", {
      params: { path: { vault_id: vault.id, item_id: item.id } },
    }),
  );
  const full = points.items.find((p) => p.job_id === backup.id);
  if (full === undefined) fail(`no recovery point from job ${backup.id}: ${JSON.stringify(points)}`);
  expectEqual("recovery point type", full.backup_type, "full");
  check(
    `the full is retained (expires_at ${full.expires_at})`,
    full.expires_at !== null && full.expires_at !== undefined,
  );
  log(
    `recovery point ${full.id}: ${full.backup_type} at ${full.backup_time}, LSNs ${full.first_lsn}..${full.last_lsn}`,
  );

  // 404 through a typed error on a nested resource, too.
  {
    const { error, response } = await api.GET(
      "/v1/vaults/{vault_id}/protected-items/{item_id}/recovery-points",
      {
        params: { path: { vault_id: vault.id, item_id: randomUUID() } },
      },
    );
    expectStatus("recovery points of an unknown item", response, 404, error);
    if (error === undefined) fail("404 without an error body");
    check(`404 has a code (${JSON.stringify(error)})`, error.code.length > 0);
  }
}

// Stopped from outside (a timeout): take the agent along.
for (const signal of ["SIGTERM", "SIGINT"] as const) {
  process.on(signal, () => {
    console.error(`sdk-typescript: FAILED: stopped by ${signal}`);
    agent?.kill("SIGTERM");
    process.exit(signal === "SIGINT" ? 130 : 143);
  });
}

const started = Date.now();
let exitCode = 0;
try {
  await main();
  log(`flow passed in ${((Date.now() - started) / 1000).toFixed(1)}s`);
} catch (e) {
  exitCode = 1;
  if (e instanceof FlowFailure) {
    console.error(`sdk-typescript: FAILED: ${e.message}`);
  } else {
    console.error("sdk-typescript: FAILED with an unexpected error:", e);
  }
} finally {
  await stopAgent();
}
process.exit(exitCode);
