"""README's walk-through through the generated Python client, against a real server and the
real reference agent: vault, policy (preview, create, conditional replace, pagination),
VM registration and discovery, protection, an on-demand backup and its recovery points, and
typed problems for 401, 404, 409, 412 and 422.

The module's fixtures build the state step by step (each asserts what it got), so the tests
can run alone or in any order.
"""

import datetime
import uuid

import pytest

from backvault_client import Client
from backvault_client.api.discovery import (
    discover_vm,
    list_discovery_candidates,
    list_protectable_items,
)
from backvault_client.api.policies import (
    create_policy,
    get_policy,
    list_policies,
    preview_policy,
    replace_policy,
)
from backvault_client.api.protection import backup_now, configure_protection, list_protected_items
from backvault_client.api.recovery import list_recovery_points
from backvault_client.api.vaults import create_vault, get_vault, list_vaults
from backvault_client.api.vms import get_vm
from backvault_client.models import (
    BackupPolicy,
    ConfigureProtection,
    ConfigureProtectionResult,
    CreatePolicy,
    CreateVault,
    DailyRetentionSpec,
    DifferentialSpec,
    FullFrequency,
    FullScheduleSpec,
    Job,
    JobStatus,
    LogSpec,
    LogSpecFrequencyMinutes,
    MonthlyRetentionSpec,
    OnDemandBackup,
    OnDemandType,
    PolicyList,
    PolicyPreview,
    PolicySpec,
    ProtectedItemList,
    RecoveryPoints,
    RecoveryPointType,
    ReplacePolicy,
    RetentionSpec,
    Vault,
    VaultList,
    Vm,
    WeekOfMonth,
    Weekday,
    WeeklyRetentionSpec,
)

from conftest import CLIENT_TIMEOUT, expect, expect_problem, wait_for_job

DONE = {JobStatus.COMPLETED, JobStatus.COMPLETED_WITH_WARNINGS}


def gold_spec(log_retention_days: int = 14) -> PolicySpec:
    """README's Gold policy: weekly full on Sunday, differential on Wednesday, logs every 30
    minutes."""
    return PolicySpec(
        time_zone="Europe/Amsterdam",
        full=FullScheduleSpec(frequency=FullFrequency.WEEKLY, days=[Weekday.SUNDAY], time="22:00"),
        differential=DifferentialSpec(days=[Weekday.WEDNESDAY], time="22:00", retention_days=30),
        log=LogSpec(
            frequency_minutes=LogSpecFrequencyMinutes(30), retention_days=log_retention_days
        ),
        retention=RetentionSpec(
            weekly=WeeklyRetentionSpec(weeks=8),
            monthly=MonthlyRetentionSpec(
                weeks_of_month=[WeekOfMonth.FIRST], days_of_week=[Weekday.SUNDAY], months=12
            ),
        ),
        compression=True,
    )


def broken_spec() -> PolicySpec:
    """README's broken policy, as far as the typed models let one write it: an unknown time
    zone, a full at 02:15 (not on the half hour) and logs kept 60 days (at most 35). (The
    README's 5-minute log frequency cannot be sent: the spec makes `frequency_minutes` an
    enum of the allowed values.)"""
    return PolicySpec(
        time_zone="Mars/Base",
        full=FullScheduleSpec(frequency=FullFrequency.DAILY, time="02:15"),
        log=LogSpec(frequency_minutes=LogSpecFrequencyMinutes(15), retention_days=60),
        retention=RetentionSpec(daily=DailyRetentionSpec(days=30)),
    )


BROKEN_RULES = [
    ("/full/time", "time_not_on_half_hour"),
    ("/log/retention_days", "log_retention_above_maximum"),
    ("/time_zone", "time_zone_unknown"),
]


# --- the state, built step by step ------------------------------------------------------------


@pytest.fixture(scope="module")
def vault(client, env) -> Vault:
    name = f"sdk-py-{uuid.uuid4().hex[:8]}"
    response = create_vault.sync_detailed(
        client=client,
        body=CreateVault(
            name=name,
            subscription_id=env.subscription_id,
            resource_group=env.resource_group,
            region=env.region,
            description="Python SDK suite",
        ),
        idempotency_key=f"create-{name}",
    )
    created = expect(response, 201, Vault)
    assert created.name == name
    assert created.subscription_id == env.subscription_id
    return created


@pytest.fixture(scope="module")
def gold(client, vault) -> BackupPolicy:
    response = create_policy.sync_detailed(
        vault.id, client=client, body=CreatePolicy(name="Gold", spec=gold_spec())
    )
    policy = expect(response, 201, BackupPolicy)
    assert policy.name == "Gold"
    assert policy.vault_id == vault.id
    return policy


@pytest.fixture(scope="module")
def discovery_job(client, env, vault) -> Job:
    """Registers the agent's VM with the vault and runs discovery (the agent answers it), as
    README does: Start Discovery lists the VM, Discover DBs registers it."""
    response = list_discovery_candidates.sync_detailed(vault.id, client=client)
    candidates = expect(response, 200, list)
    mine = [c for c in candidates if c.vm.id == env.vm_id]
    assert mine, f"VM {env.vm_id} is not among {[c.vm.name for c in candidates]}"
    assert mine[0].vm.name == env.vm_name
    assert mine[0].vm.agent_installed
    assert mine[0].issues == [], "the VM meets every registration prerequisite"

    response = discover_vm.sync_detailed(vault.id, env.vm_id, client=client)
    job = expect(response, 202, Job)
    assert job.vm_id == env.vm_id
    assert "location" in response.headers
    return wait_for_job(client, job.id)


@pytest.fixture(scope="module")
def protected(client, env, vault, gold, discovery_job) -> ConfigureProtectionResult:
    """Protects the first two databases of the VM with Gold, configure jobs done."""
    containers = expect(
        list_protectable_items.sync_detailed(vault.id, client=client), 200, list
    )
    by_name = {db.name: db for c in containers for db in c.databases}
    wanted = env.databases[:2]
    response = configure_protection.sync_detailed(
        vault.id,
        client=client,
        body=ConfigureProtection(policy=gold.name, databases=[by_name[n].id for n in wanted]),
    )
    result = expect(response, 202, ConfigureProtectionResult)
    assert sorted(item.database for item in result.items) == sorted(wanted)
    assert result.jobs, "configure protection dispatches a job"
    for job_id in result.jobs:
        job = wait_for_job(client, job_id)
        assert job.status in DONE, f"configure job {job_id}: {job.status} {job.error!r}"
    return result


# --- vaults -------------------------------------------------------------------------------------


def test_vault_reads_back(client, vault):
    got = expect(get_vault.sync_detailed(vault.id, client=client), 200, Vault)
    assert got.id == vault.id and got.name == vault.name


def test_create_vault_retry_with_the_idempotency_key_returns_the_first_response(client, env, vault):
    retry = create_vault.sync_detailed(
        client=client,
        body=CreateVault(
            name=vault.name,
            subscription_id=env.subscription_id,
            resource_group=env.resource_group,
            region=env.region,
            description="Python SDK suite",
        ),
        idempotency_key=f"create-{vault.name}",
    )
    assert expect(retry, 201, Vault).id == vault.id


def test_second_vault_with_the_same_name_is_409(client, env, vault):
    response = create_vault.sync_detailed(
        client=client,
        body=CreateVault(
            name=vault.name.upper(),  # names compare ignoring case
            subscription_id=env.subscription_id,
            resource_group=env.resource_group,
            region=env.region,
        ),
    )
    expect_problem(response, 409, "vault_name_taken")


def test_unknown_vault_is_404(client):
    expect_problem(get_vault.sync_detailed(uuid.uuid4(), client=client), 404, "vault_not_found")


def test_bad_token_is_401(bad_client, env):
    expect_problem(list_vaults.sync_detailed(client=bad_client), 401, "invalid_token")
    with Client(
        base_url=env.base_url, raise_on_unexpected_status=True, timeout=CLIENT_TIMEOUT
    ) as anonymous:
        expect_problem(list_vaults.sync_detailed(client=anonymous), 401, "missing_token")


def test_vaults_page_with_limit_and_cursor(client, env, vault):
    # A second vault, so that there are at least two pages.
    other = expect(
        create_vault.sync_detailed(
            client=client,
            body=CreateVault(
                name=f"sdk-py-{uuid.uuid4().hex[:8]}",
                subscription_id=env.subscription_id,
                resource_group=env.resource_group,
                region=env.region,
            ),
        ),
        201,
        Vault,
    )
    seen, cursor, pages = [], None, 0
    while True:
        kwargs = {"limit": 1} if cursor is None else {"limit": 1, "cursor": cursor}
        page = expect(list_vaults.sync_detailed(client=client, **kwargs), 200, VaultList)
        pages += 1
        assert len(page.items) <= 1
        seen += [v.id for v in page.items]
        cursor = page.next_cursor
        if not cursor:
            break
        assert pages < 100, "the cursor never ends"
    assert {vault.id, other.id} <= set(seen)
    assert len(seen) == len(set(seen)), "no vault twice"
    assert pages >= 2


# --- policies -----------------------------------------------------------------------------------


def test_preview_policy(client):
    response = preview_policy.sync_detailed(client=client, body=gold_spec(), count=3)
    preview = expect(response, 200, PolicyPreview)
    assert preview.time_zone == "Europe/Amsterdam"
    assert len(preview.full) == 3
    for run in preview.full:
        local = datetime.datetime.fromisoformat(run.local_time)  # e.g. 2026-12-06T22:00:00+01:00
        assert (local.weekday(), local.hour, local.minute) == (6, 22, 0), run.local_time
        assert local == run.at
        assert run.expires_at > run.at
    assert preview.differential and preview.log
    assert preview.max_gap_minutes == 30


def test_broken_policy_preview_is_422(client):
    """Every violation at once, each with a JSON pointer into the body and a rule code."""
    response = preview_policy.sync_detailed(client=client, body=broken_spec())
    problem = expect_problem(response, 422, "validation_failed")
    assert sorted((e.pointer, e.code) for e in problem.errors) == BROKEN_RULES


def test_broken_policy_create_is_422(client, vault):
    """On create the policy sits under `spec`, and so do the pointers."""
    response = create_policy.sync_detailed(
        vault.id, client=client, body=CreatePolicy(name="Broken", spec=broken_spec())
    )
    problem = expect_problem(response, 422, "validation_failed")
    assert sorted((e.pointer, e.code) for e in problem.errors) == [
        ("/spec" + pointer, code) for pointer, code in BROKEN_RULES
    ]


def test_replace_policy_with_if_match(client, vault, gold):
    read = get_policy.sync_detailed(vault.id, gold.name, client=client)
    assert expect(read, 200, BackupPolicy).spec.log.retention_days == 14
    etag = read.headers["etag"]
    assert etag

    replaced = replace_policy.sync_detailed(
        vault.id,
        gold.name,
        client=client,
        body=ReplacePolicy(spec=gold_spec(log_retention_days=21)),
        if_match=etag,
    )
    policy = expect(replaced, 200, BackupPolicy)
    assert policy.spec.log.retention_days == 21
    assert policy.version > gold.version
    assert replaced.headers["etag"] != etag

    # The ETag read before the change is stale now: a typed 412.
    stale = replace_policy.sync_detailed(
        vault.id,
        gold.name,
        client=client,
        body=ReplacePolicy(spec=gold_spec(log_retention_days=28)),
        if_match=etag,
    )
    expect_problem(stale, 412, "precondition_failed")
    again = expect(get_policy.sync_detailed(vault.id, gold.name, client=client), 200, BackupPolicy)
    assert again.spec.log.retention_days == 21, "a refused replace changes nothing"


def test_second_policy_with_the_same_name_is_409(client, vault, gold):
    response = create_policy.sync_detailed(
        vault.id, client=client, body=CreatePolicy(name="gold", spec=gold_spec())
    )
    expect_problem(response, 409, "policy_name_taken")


def test_unknown_policy_is_404(client, vault):
    response = get_policy.sync_detailed(vault.id, "NoSuchPolicy", client=client)
    expect_problem(response, 404, "policy_not_found")


def test_policies_page_with_limit_and_cursor(client, vault, gold):
    names, cursor, pages = [], None, 0
    while True:
        kwargs = {"limit": 1} if cursor is None else {"limit": 1, "cursor": cursor}
        page = expect(list_policies.sync_detailed(vault.id, client=client, **kwargs), 200, PolicyList)
        pages += 1
        assert len(page.items) <= 1
        names += [p.name for p in page.items]
        cursor = page.next_cursor
        if not cursor:
            break
        assert pages < 10, "the cursor never ends"
    # Every vault comes with the default policy HourlyLogBackup.
    assert sorted(names) == ["Gold", "HourlyLogBackup"]
    assert pages >= 2


# --- VMs, discovery, protection -------------------------------------------------------------


def test_discovery_registers_the_vm(client, env, vault, discovery_job):
    assert discovery_job.status in DONE, f"{discovery_job.status}: {discovery_job.error!r}"
    vm = expect(get_vm.sync_detailed(env.vm_id, client=client), 200, Vm)
    assert vm.vault_id == vault.id
    # Registered now, so no longer a candidate.
    candidates = expect(list_discovery_candidates.sync_detailed(vault.id, client=client), 200, list)
    assert env.vm_id not in [c.vm.id for c in candidates]


def test_discover_with_unknown_vault_is_404(client, env):
    response = discover_vm.sync_detailed(uuid.uuid4(), env.vm_id, client=client)
    expect_problem(response, 404, "vault_not_found")


def test_protectable_items_list_the_inventory(client, env, vault, discovery_job):
    containers = expect(
        list_protectable_items.sync_detailed(vault.id, client=client), 200, list
    )
    instances = [c for c in containers if c.vm_id == env.vm_id and c.name == env.instance]
    assert len(instances) == 1, containers
    databases = {db.name: db for db in instances[0].databases}
    for name in env.databases:
        assert name in databases, f"{name} not discovered: {sorted(databases)}"
        assert databases[name].protectable, databases[name].issue


def test_protection_is_configured(client, vault, gold, protected):
    page = expect(
        list_protected_items.sync_detailed(vault.id, client=client, policy=gold.name),
        200,
        ProtectedItemList,
    )
    ids = {item.id: item for item in page.items}
    for item in protected.items:
        assert item.id in ids
        assert ids[item.id].state == "protected", ids[item.id].state
        assert ids[item.id].policy == gold.name


def test_backup_now_makes_a_recovery_point(client, vault, protected):
    item = protected.items[0]
    response = backup_now.sync_detailed(
        vault.id,
        item.id,
        client=client,
        body=OnDemandBackup(type_=OnDemandType.FULL, retention_days=45),
    )
    job = expect(response, 202, Job)
    done = wait_for_job(client, job.id)
    assert done.status in DONE, f"{done.status}: {done.error!r}"

    points = expect(
        list_recovery_points.sync_detailed(vault.id, item.id, client=client), 200, RecoveryPoints
    )
    fulls = [p for p in points.items if p.backup_type == RecoveryPointType.FULL]
    assert fulls, f"no full recovery point: {points.items}"
    assert any(p.job_id == job.id for p in fulls), "the on-demand job recorded a point"


def test_recovery_points_of_unknown_vault_is_404(client, protected):
    response = list_recovery_points.sync_detailed(
        uuid.uuid4(), protected.items[0].id, client=client
    )
    expect_problem(response, 404, "vault_not_found")
