//! Applying a discovery job's report: the VM's instances, availability groups and
//! databases are replaced by what the agent found, recovery-model switches reach the
//! chains of protected items, recased names are flagged, and auto-protection intents
//! protect new databases, all in the completion's transaction.

use std::collections::{HashMap, HashSet};

use backvault_domain::agent::SqlInventory;
use backvault_store::availability;
use backvault_store::inventory::{self, DatabaseRow, DatabaseWrite};
use backvault_store::protection::{self as store};
use backvault_store::vms;
use sqlx::PgConnection;
use uuid::Uuid;

use backvault_domain::agent::RecoveryModel;

use crate::Service;
use crate::error::Result;

impl Service {
    /// Replaces the VM's SQL inventory with what its discovery job reported, and
    /// auto-protects new databases under an intent, in the completion's transaction.
    pub(crate) async fn apply_discovery(
        &self,
        tx: &mut PgConnection,
        vm_id: Uuid,
        reported: &SqlInventory,
    ) -> Result<()> {
        let Some(vm) = vms::vm_get(&mut *tx, vm_id).await? else {
            return Ok(());
        };
        let instance_rows = inventory::instances_replace(
            tx,
            vm_id,
            &reported
                .instances
                .iter()
                .map(|i| (i.name.clone(), i.version.clone()))
                .collect::<Vec<_>>(),
        )
        .await?;
        let instance_id: HashMap<String, Uuid> = instance_rows
            .iter()
            .filter(|i| i.gone_at.is_none())
            .map(|i| (i.name.to_lowercase(), i.id))
            .collect();
        let groups = self
            .apply_group_reports(tx, &vm, reported, &instance_id)
            .await?;
        let (group_of_db, db_names): (Vec<Uuid>, Vec<&str>) = reported
            .databases
            .iter()
            .filter_map(|db| {
                let group = db.availability_group.as_ref()?;
                let id = groups.by_name.get(&group.to_lowercase())?;
                Some((*id, db.name.as_str()))
            })
            .unzip();
        let group_database: HashMap<(Uuid, String), Uuid> =
            availability::group_databases_upsert(tx, &group_of_db, &db_names)
                .await?
                .into_iter()
                .map(|g| ((g.availability_group_id, g.name), g.id))
                .collect();
        let existing = inventory::databases_of_vm(&mut *tx, vm_id).await?;
        let protected_rows: HashSet<Uuid> = store::items_for_databases(
            &mut *tx,
            &existing.iter().map(|e| e.id).collect::<Vec<_>>(),
        )
        .await?
        .into_iter()
        .map(|p| p.database_id)
        .collect();
        let protected_groups: HashSet<Uuid> = store::items_for_keys(
            &mut *tx,
            &group_database.values().copied().collect::<Vec<_>>(),
        )
        .await?
        .into_iter()
        .map(|p| p.item_key)
        .collect();
        let mut touched_groups: Vec<Uuid> = existing
            .iter()
            .filter_map(|e| e.availability_group_id)
            .chain(groups.ids.iter().copied())
            .collect();
        touched_groups.sort_unstable();
        touched_groups.dedup();
        // Lookups by name, built once: a discovery of thousands of databases stays linear.
        let mut by_name: HashMap<(Uuid, &str), &DatabaseRow> = HashMap::new();
        let mut by_folded_name: HashMap<(Uuid, String), Vec<&DatabaseRow>> = HashMap::new();
        for e in &existing {
            by_name.entry((e.instance_id, e.name.as_str())).or_insert(e);
            by_folded_name
                .entry((e.instance_id, e.name.to_ascii_lowercase()))
                .or_default()
                .push(e);
        }
        let reported_names: std::collections::HashSet<(String, &str)> = reported
            .databases
            .iter()
            .map(|r| (r.instance.to_ascii_lowercase(), r.name.as_str()))
            .collect();
        let mut writes = Vec::new();
        let mut present = Vec::new();
        let mut recased = Vec::new();
        let mut switched = HashMap::new();
        for db in &reported.databases {
            let Some(&instance) = instance_id.get(&db.instance.to_lowercase()) else {
                continue;
            };
            let exact = by_name.get(&(instance, db.name.as_str())).copied();
            // The same database under another casing: keep its row (and history), flag it.
            let recase = exact.is_none().then(|| {
                let reported_instance = db.instance.to_ascii_lowercase();
                by_folded_name
                    .get(&(instance, db.name.to_ascii_lowercase()))
                    .into_iter()
                    .flatten()
                    .find(|e| {
                        !reported_names.contains(&(reported_instance.clone(), e.name.as_str()))
                    })
                    .copied()
            });
            let recase = recase.flatten();
            if let Some(e) = recase {
                recased.push(e.id);
            }
            let before = exact.or(recase);
            let id = before.map_or_else(Uuid::now_v7, |e| e.id);
            present.push(id);
            if let Some(before) = before
                && before.recovery_model != db.recovery_model
            {
                switched.insert(id, (before.recovery_model, db.recovery_model));
            }
            let availability_group_id = db
                .availability_group
                .as_ref()
                .and_then(|g| groups.by_name.get(&g.to_lowercase()).copied());
            let mut ag_database_id = availability_group_id
                .and_then(|g| group_database.get(&(g, db.name.clone())).copied());
            // A protected standalone database that joins a group whose database another
            // item already protects keeps its own item (and stays standalone here): two
            // items would protect one database.
            if let (Some(joined), Some(before)) = (ag_database_id, before)
                && before.ag_database_id != Some(joined)
                && protected_rows.contains(&before.id)
                && protected_groups.contains(&joined)
            {
                tracing::warn!(database = %before.id, group_database = %joined, "a protected database joined a group whose database is protected already; it keeps its own item");
                ag_database_id = None;
            }
            writes.push(DatabaseWrite {
                id,
                instance_id: instance,
                availability_group_id,
                ag_database_id,
                name: &db.name,
                recovery_model: db.recovery_model,
                system: db.system,
                read_only: db.read_only,
                size_bytes: db.size_bytes,
            });
        }
        inventory::databases_retire(tx, vm_id, &present).await?;
        inventory::databases_write(tx, vm_id, &writes).await?;
        if !switched.is_empty() {
            self.recovery_models_switched(tx, &switched).await?;
        }
        if !recased.is_empty() {
            store::items_flag_casing(&mut *tx, &recased).await?;
        }
        for intent in store::intents_for_vm(&mut *tx, vm_id).await? {
            self.auto_protect(tx, &intent).await?;
        }
        // After auto-protection, so that items it made on a secondary's copy (the first
        // to report a new group database) and their jobs move to the primary too.
        self.groups_changed(tx, &touched_groups).await?;
        Ok(())
    }

    /// Databases whose recovery model changed since the last discovery: their items'
    /// chains follow (`domain::chain::model_changed`).
    async fn recovery_models_switched(
        &self,
        tx: &mut PgConnection,
        switched: &HashMap<Uuid, (RecoveryModel, RecoveryModel)>,
    ) -> Result<()> {
        let databases: Vec<Uuid> = switched.keys().copied().collect();
        let items: HashMap<Uuid, Uuid> = store::items_for_databases(&mut *tx, &databases)
            .await?
            .into_iter()
            .map(|p| (p.item_id, p.database_id))
            .collect();
        let ids: Vec<Uuid> = items.keys().copied().collect();
        let mut changed_ids = Vec::new();
        let mut chains = Vec::new();
        for item in backvault_store::recovery::chains_of_items(&mut *tx, &ids).await? {
            let Some((from, to)) = items.get(&item.id).and_then(|d| switched.get(d)) else {
                continue;
            };
            let has_differential = crate::recovery::policy_of(item.spec.as_ref())
                .is_some_and(|p| p.differential.is_some());
            changed_ids.push(item.id);
            chains.push(backvault_domain::chain::model_changed(
                item.chain.0,
                *from,
                *to,
                has_differential,
            ));
        }
        backvault_store::recovery::chains_set(&mut *tx, &changed_ids, &chains).await?;
        Ok(())
    }
}
