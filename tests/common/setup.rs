//! The setup the process tests share, through the API as a user does it: agents started
//! and enrolled, a vault, its VMs registered, their databases protected.

use std::collections::BTreeMap;
use std::time::Duration;

use serde_json::{Value, json};

use super::{AgentProcess, Api, Inventories, wait_for};

/// Agents a test started, one per VM.
pub struct Agents {
    /// In the order the VMs were given.
    pub processes: Vec<AgentProcess>,
    /// VM id by VM name.
    pub vms: BTreeMap<String, String>,
    pub inventories: Inventories,
}

impl Agents {
    /// The id of the VM named `name`.
    pub fn vm(&self, name: &str) -> String {
        self.vms[name].clone()
    }
}

impl Api {
    /// Writes each `(VM name, inventory TOML)` into `inventories`, starts a
    /// `backvault-agent` for it with `enrollment` (and `agent_args`), and waits until every
    /// one has enrolled.
    pub async fn start_agents(
        &self,
        enrollment: &str,
        inventories: Inventories,
        vms: &[(&str, String)],
        agent_args: &[&str],
    ) -> Agents {
        let processes = vms
            .iter()
            .map(|(name, toml)| {
                let inventory = inventories.write(name, toml);
                AgentProcess::start_with(&self.base, enrollment, &inventory, agent_args)
            })
            .collect();
        let enrolled = self.vms_enrolled(vms.len()).await;
        let vms = vms
            .iter()
            .map(|(name, _)| {
                let vm = enrolled
                    .iter()
                    .find(|v| v["name"] == *name)
                    .unwrap_or_else(|| panic!("{name} among {enrolled:?}"));
                ((*name).to_owned(), vm["id"].as_str().unwrap().to_owned())
            })
            .collect();
        Agents {
            processes,
            vms,
            inventories,
        }
    }

    /// Waits (up to 30 s) until at least `count` VMs have enrolled; returns the VMs.
    pub async fn vms_enrolled(&self, count: usize) -> Vec<Value> {
        wait_for(
            Duration::from_secs(30),
            &format!("{count} agents to enroll"),
            || async move {
                let (_, vms) = self.get("/v1/vms?limit=200").await;
                let items = vms["items"].as_array().cloned().unwrap_or_default();
                if items.len() >= count {
                    Ok(items)
                } else {
                    Err(format!("{} enrolled: {vms}", items.len()))
                }
            },
        )
        .await
    }

    /// A vault named `name` in `sub-1`; returns its id.
    pub async fn create_vault(&self, name: &str) -> String {
        let vault = self
            .post_expecting(
                "/v1/vaults",
                json!({"name": name, "subscription_id": "sub-1", "resource_group": "rg-backup", "region": "westeurope"}),
                201,
            )
            .await;
        vault["id"].as_str().unwrap().to_owned()
    }

    /// The policy `name` of `spec` in the vault.
    pub async fn create_policy(&self, vault: &str, name: &str, spec: Value) {
        self.post_expecting(
            &format!("/v1/vaults/{vault}/policies"),
            json!({"name": name, "spec": spec}),
            201,
        )
        .await;
    }

    /// Registers the VMs with the vault: their discoveries, run by their agents, completed.
    pub async fn register(&self, vault: &str, vms: &[&str]) {
        let mut jobs = Vec::new();
        for vm in vms {
            let job = self
                .post_expecting(
                    &format!("/v1/vaults/{vault}/vms/{vm}/discover"),
                    json!({}),
                    202,
                )
                .await;
            jobs.push(job["id"].as_str().unwrap().to_owned());
        }
        for job in &jobs {
            self.completed_job(job).await;
        }
    }

    /// Every protectable database the vault's registered VMs have, across instances.
    pub async fn protectable_databases(&self, vault: &str) -> Vec<Value> {
        let (status, containers) = self
            .get(&format!("/v1/vaults/{vault}/protectable-items"))
            .await;
        assert_eq!(status, 200, "{containers}");
        containers
            .as_array()
            .unwrap()
            .iter()
            .flat_map(|c| c["databases"].as_array().unwrap().clone())
            .filter(|d| d["protectable"] == true)
            .collect()
    }

    /// Protects every protectable database of the vault with `policy`, and waits until the
    /// agents have configured them; returns the protected items.
    pub async fn protect_all(&self, vault: &str, policy: &str) -> Vec<Value> {
        let ids: Vec<Value> = self
            .protectable_databases(vault)
            .await
            .iter()
            .map(|d| d["id"].clone())
            .collect();
        let configured = self
            .post_expecting(
                &format!("/v1/vaults/{vault}/protected-items"),
                json!({"policy": policy, "databases": ids}),
                202,
            )
            .await;
        for job in configured["jobs"].as_array().unwrap() {
            self.completed_job(job.as_str().unwrap()).await;
        }
        configured["items"].as_array().unwrap().clone()
    }
}
