"""Fixtures for the Python SDK suite: a client generated from openapi/openapi.json, pointed
at a real backvault server with a real agent (both started by ci/sdk-python.sh through
ci/lib/server.sh, which exports the variables read below).

Everything talks to the server through the generated client only: `AuthenticatedClient`,
the `api.<tag>.<operation_id>` modules and `models`. No raw HTTP.
"""

import os
import time
import uuid
from dataclasses import dataclass
from uuid import UUID

import attrs
import httpx  # only for the client's timeout setting: no request goes through it directly
import pytest

from backvault_client import AuthenticatedClient
from backvault_client.api.jobs import get_job
from backvault_client.models import Job, JobStatus, Problem

TERMINAL = {
    JobStatus.COMPLETED,
    JobStatus.COMPLETED_WITH_WARNINGS,
    JobStatus.FAILED,
    JobStatus.CANCELLED,
}

# A long-poll answers within `wait` (at most 60 s); the client must wait longer than that.
LONG_POLL = "30s"
CLIENT_TIMEOUT = httpx.Timeout(75.0, connect=10.0)


def _env(name: str) -> str:
    value = os.environ.get(name)
    if not value:
        pytest.exit(f"{name} is not set: run this suite through ci/sdk-python.sh", returncode=2)
    return value


@dataclass(frozen=True)
class Env:
    base_url: str
    admin_token: str
    subscription_id: str
    resource_group: str
    region: str
    vm_id: UUID
    vm_name: str
    instance: str
    databases: list[str]


@pytest.fixture(scope="session")
def env() -> Env:
    return Env(
        base_url=_env("BASE_URL"),
        admin_token=_env("ADMIN_TOKEN"),
        subscription_id=_env("BV_SUBSCRIPTION_ID"),
        resource_group=_env("BV_RESOURCE_GROUP"),
        region=_env("BV_REGION"),
        vm_id=UUID(_env("BV_VM_ID")),
        vm_name=_env("BV_VM_NAME"),
        instance=_env("BV_INSTANCE"),
        databases=_env("BV_DATABASES").split(","),
    )


def make_client(base_url: str, token: str) -> AuthenticatedClient:
    # raise_on_unexpected_status: a status the spec does not document for the operation
    # raises errors.UnexpectedStatus instead of quietly parsing to None.
    return AuthenticatedClient(
        base_url=base_url,
        token=token,
        raise_on_unexpected_status=True,
        timeout=CLIENT_TIMEOUT,
    )


@pytest.fixture(scope="session")
def client(env: Env):
    with make_client(env.base_url, env.admin_token) as c:
        yield c


@pytest.fixture(scope="session")
def bad_client(env: Env):
    """A client whose token no server key signed."""
    with make_client(env.base_url, "not-a-jwt") as c:
        yield c


@pytest.fixture
def unique():
    """A fresh name suffix, so that reruns against one server never collide."""
    return lambda prefix: f"{prefix}-{uuid.uuid4().hex[:8]}"


def undocumented(value, path: str = "") -> list[str]:
    """Fields of a parsed response that the spec does not describe: the generated models
    keep them in `additional_properties`."""
    found = []
    if isinstance(value, list):
        for i, item in enumerate(value):
            found += undocumented(item, f"{path}/{i}")
    elif attrs.has(type(value)):
        extra = getattr(value, "additional_properties", None) or {}
        found += [f"{path}/{key}" for key in extra]
        for field in attrs.fields(type(value)):
            if field.name not in ("additional_properties",):
                found += undocumented(getattr(value, field.name), f"{path}/{field.name}")
    return found


def expect(response, status: int, model):
    """Asserts the status and the parsed model of a `sync_detailed` response, and that the
    response has no field the spec does not describe; returns the model."""
    assert response.status_code == status, (
        f"expected {status}, got {response.status_code}: {response.content[:2000]!r}"
    )
    assert isinstance(response.parsed, model), (
        f"expected a {model.__name__}, parsed {type(response.parsed).__name__}: {response.parsed!r}"
    )
    extra = undocumented(response.parsed)
    assert not extra, f"fields missing from the spec: {extra}"
    return response.parsed


def expect_problem(response, status: int, code: str) -> Problem:
    """Asserts a typed RFC 9457 problem with this status and code."""
    problem = expect(response, status, Problem)
    assert problem.status == status
    assert problem.code == code, f"expected code {code}, got {problem.code}: {problem.detail}"
    assert problem.type_ == f"urn:backvault:problem:{code}"
    assert response.headers["content-type"].startswith("application/problem+json")
    return problem


def wait_for_job(client: AuthenticatedClient, job_id: UUID, deadline_seconds: float = 90) -> Job:
    """Long-polls `GET /v1/jobs/{job_id}?wait=30s` until the job is terminal.

    Each call returns as soon as the job changes state (or after the wait), so this
    re-issues the wait instead of sleeping between polls.
    """
    deadline = time.monotonic() + deadline_seconds
    while True:
        job = expect(get_job.sync_detailed(job_id, client=client, wait=LONG_POLL), 200, Job)
        if job.status in TERMINAL:
            return job
        assert time.monotonic() < deadline, f"job {job_id} still {job.status} after {deadline_seconds}s"
