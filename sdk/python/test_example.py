import os
import uuid

from backvault_client import AuthenticatedClient
from backvault_client.api.vaults import create_vault
from backvault_client.models import CreateVault, Problem, Vault


def test_create_a_vault():
    client = AuthenticatedClient(
        base_url=os.environ["BASE_URL"],
        token=os.environ["ADMIN_TOKEN"],
        raise_on_unexpected_status=True,  # a status the spec does not document is an error
    )
    body = CreateVault(
        name=f"docs-{uuid.uuid4().hex[:8]}",
        subscription_id=os.environ["BV_SUBSCRIPTION_ID"],
        resource_group="rg-sql",
        region="westeurope",
    )
    created = create_vault.sync_detailed(client=client, body=body)
    assert isinstance(created.parsed, Vault), created.parsed
    print(created.status_code, created.parsed.id, created.headers["etag"])

    again = create_vault.sync_detailed(client=client, body=body)
    assert isinstance(again.parsed, Problem)  # every error is a typed Problem
    print(again.status_code, again.parsed.code)  # 409 vault_name_taken
