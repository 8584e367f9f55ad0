//! Log-sequence numbers that chain like SQL Server's, per database.
//!
//! A full backup starts a base: its differentials and logs carry its `first_lsn` as their
//! `database_backup_lsn`. Log backups form one unbroken chain: each starts where the
//! previous log ended, or where the first full ended. Later fulls do not restart the log
//! chain (as in SQL Server, a full backup does not truncate the log). A copy-only full is
//! outside both chains: it moves neither.
//!
//! A backup changes the chain only once the server has accepted it ([`ChainStore::commit`]);
//! a result the server never recorded must not leave a gap in what it sees.

use std::collections::{BTreeMap, HashMap};
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};

use anyhow::Context;
use backvault_domain::agent::RecoveryPointType;
use serde::{Deserialize, Serialize};
use tokio::sync::OwnedMutexGuard;

pub type Lsn = u128;

/// Hands out strictly increasing LSNs, derived from the clock so that they also increase
/// across restarts of an agent without a state file.
#[derive(Debug, Default)]
pub struct LsnClock {
    last: Lsn,
}

impl LsnClock {
    pub fn next(&mut self) -> Lsn {
        let micros = chrono::Utc::now().timestamp_micros();
        self.next_at(Lsn::try_from(micros).unwrap_or(0))
    }

    fn next_at(&mut self, now: Lsn) -> Lsn {
        self.last = now.max(self.last + 1);
        self.last
    }

    fn observe(&mut self, lsn: Lsn) {
        self.last = self.last.max(lsn);
    }
}

/// Where one database's chains stand.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct DbChain {
    /// The `first_lsn` of the last (not copy-only) full backup: the base of differentials
    /// and logs.
    pub last_full_first_lsn: Option<Lsn>,
    /// Where the next log backup starts.
    pub last_lsn: Option<Lsn>,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Lsns {
    pub first: Lsn,
    pub last: Lsn,
    pub database_backup: Lsn,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ChainError {
    /// A differential or log backup needs a full backup to be based on.
    NoFullBackup,
}

/// The LSNs of a backup of `kind` taken when the database stands at `chain`, and where it
/// stands afterwards.
pub fn next_backup(
    chain: DbChain,
    kind: RecoveryPointType,
    clock: &mut LsnClock,
) -> Result<(Lsns, DbChain), ChainError> {
    match kind {
        RecoveryPointType::Full | RecoveryPointType::CopyOnlyFull => {
            let first = clock.next();
            let last = clock.next();
            let lsns = Lsns {
                first,
                last,
                database_backup: first,
            };
            let after = if kind == RecoveryPointType::Full {
                DbChain {
                    last_full_first_lsn: Some(first),
                    last_lsn: chain.last_lsn.or(Some(last)),
                }
            } else {
                chain
            };
            Ok((lsns, after))
        }
        RecoveryPointType::Differential => {
            let base = chain.last_full_first_lsn.ok_or(ChainError::NoFullBackup)?;
            let first = clock.next();
            let last = clock.next();
            let lsns = Lsns {
                first,
                last,
                database_backup: base,
            };
            Ok((lsns, chain))
        }
        RecoveryPointType::Log => {
            let (Some(base), Some(first)) = (chain.last_full_first_lsn, chain.last_lsn) else {
                return Err(ChainError::NoFullBackup);
            };
            let last = clock.next();
            let lsns = Lsns {
                first,
                last,
                database_backup: base,
            };
            Ok((
                lsns,
                DbChain {
                    last_lsn: Some(last),
                    ..chain
                },
            ))
        }
    }
}

/// A database, as SQL Server tells them apart (names ignore case).
#[derive(Debug, Clone, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct DbKey {
    instance: String,
    database: String,
}

impl DbKey {
    pub fn new(instance: &str, database: &str) -> Self {
        Self {
            instance: instance.to_lowercase(),
            database: database.to_lowercase(),
        }
    }
}

/// Backups planned by one job, to apply once the server has accepted them. Holds the
/// job's databases locked until then, so two jobs on one database cannot interleave.
#[derive(Debug)]
pub struct PendingChain {
    updates: Vec<(DbKey, DbChain)>,
    _locks: Vec<OwnedMutexGuard<()>>,
}

impl PendingChain {
    pub fn none() -> Self {
        Self {
            updates: Vec::new(),
            _locks: Vec::new(),
        }
    }
}

/// All databases' chains, optionally persisted so that restarts keep them.
pub struct ChainStore {
    state: Mutex<State>,
    path: Option<PathBuf>,
    locks: Mutex<HashMap<DbKey, Arc<tokio::sync::Mutex<()>>>>,
}

#[derive(Debug, Default)]
struct State {
    clock: LsnClock,
    chains: BTreeMap<DbKey, DbChain>,
}

/// A job's backups: the LSNs of each, in order, with the change to make once accepted.
pub struct Planner<'a> {
    store: &'a ChainStore,
    planned: HashMap<DbKey, DbChain>,
    pending: PendingChain,
}

impl ChainStore {
    /// Loads `path` if it exists; a missing file is a first start.
    pub fn open(path: Option<PathBuf>) -> anyhow::Result<Self> {
        let mut state = State::default();
        if let Some(path) = &path
            && path.exists()
        {
            state = load(path).with_context(|| format!("chain state {}", path.display()))?;
        }
        Ok(Self {
            state: Mutex::new(state),
            path,
            locks: Mutex::default(),
        })
    }

    #[cfg(test)]
    pub fn in_memory() -> Self {
        Self {
            state: Mutex::default(),
            path: None,
            locks: Mutex::default(),
        }
    }

    /// Waits until no other job works on these databases, then plans against them.
    pub async fn planner(&self, keys: impl IntoIterator<Item = DbKey>) -> Planner<'_> {
        let mut keys: Vec<DbKey> = keys.into_iter().collect();
        // One order for everyone, so two jobs never wait on each other's databases.
        keys.sort();
        keys.dedup();
        let mutexes: Vec<_> = {
            let mut locks = self.locks.lock().expect("chain locks");
            keys.into_iter()
                .map(|k| Arc::clone(locks.entry(k).or_default()))
                .collect()
        };
        let mut guards = Vec::with_capacity(mutexes.len());
        for mutex in mutexes {
            guards.push(mutex.lock_owned().await);
        }
        Planner {
            store: self,
            planned: HashMap::new(),
            pending: PendingChain {
                updates: Vec::new(),
                _locks: guards,
            },
        }
    }

    #[cfg(test)]
    pub fn get(&self, key: &DbKey) -> DbChain {
        self.state
            .lock()
            .expect("chain state")
            .chains
            .get(key)
            .copied()
            .unwrap_or_default()
    }

    /// Applies backups the server accepted, and saves the state file if there is one.
    pub fn commit(&self, pending: PendingChain) {
        if pending.updates.is_empty() {
            return;
        }
        let saved = {
            let mut state = self.state.lock().expect("chain state");
            for (key, chain) in pending.updates {
                state.chains.insert(key, chain);
            }
            self.path
                .as_ref()
                .map(|path| (path.clone(), to_file(&state)))
        };
        if let Some((path, file)) = saved
            && let Err(e) = save(&path, &file)
        {
            // The server has the backups already; losing the file only costs a new full
            // backup after a restart, so it is not worth failing anything for.
            tracing::error!(path = %path.display(), error = format!("{e:#}"), "cannot save the chain state");
        }
    }
}

impl Planner<'_> {
    /// The next backup of `key`, following any this job already planned for it.
    pub fn plan(&mut self, key: &DbKey, kind: RecoveryPointType) -> Result<Lsns, ChainError> {
        let mut state = self.store.state.lock().expect("chain state");
        let chain = match self.planned.get(key) {
            Some(chain) => *chain,
            None => state.chains.get(key).copied().unwrap_or_default(),
        };
        let (lsns, after) = next_backup(chain, kind, &mut state.clock)?;
        if after != chain {
            self.planned.insert(key.clone(), after);
            self.pending.updates.push((key.clone(), after));
        }
        Ok(lsns)
    }

    pub fn finish(self) -> PendingChain {
        self.pending
    }
}

/// The state file: JSON, LSNs as decimal strings like on the wire.
#[derive(Debug, Serialize, Deserialize)]
struct ChainFile {
    databases: Vec<ChainFileEntry>,
}

#[derive(Debug, Serialize, Deserialize)]
struct ChainFileEntry {
    instance: String,
    database: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    last_full_first_lsn: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    last_lsn: Option<String>,
}

fn to_file(state: &State) -> ChainFile {
    ChainFile {
        databases: state
            .chains
            .iter()
            .map(|(key, chain)| ChainFileEntry {
                instance: key.instance.clone(),
                database: key.database.clone(),
                last_full_first_lsn: chain.last_full_first_lsn.map(|l| l.to_string()),
                last_lsn: chain.last_lsn.map(|l| l.to_string()),
            })
            .collect(),
    }
}

fn load(path: &Path) -> anyhow::Result<State> {
    let file: ChainFile = serde_json::from_str(&std::fs::read_to_string(path)?)?;
    let mut state = State::default();
    let parse = |lsn: Option<String>| -> anyhow::Result<Option<Lsn>> {
        lsn.map(|l| l.parse().with_context(|| format!("bad LSN {l:?}")))
            .transpose()
    };
    for entry in file.databases {
        let chain = DbChain {
            last_full_first_lsn: parse(entry.last_full_first_lsn)?,
            last_lsn: parse(entry.last_lsn)?,
        };
        // New LSNs must come after every one already handed out, whatever the clock says.
        for lsn in [chain.last_full_first_lsn, chain.last_lsn]
            .into_iter()
            .flatten()
        {
            state.clock.observe(lsn);
        }
        state
            .chains
            .insert(DbKey::new(&entry.instance, &entry.database), chain);
    }
    Ok(state)
}

/// Writes a temporary file and renames it, so a crash never leaves half a file.
fn save(path: &Path, file: &ChainFile) -> anyhow::Result<()> {
    let mut tmp = path.as_os_str().to_owned();
    tmp.push(".tmp");
    let tmp = PathBuf::from(tmp);
    std::fs::write(&tmp, serde_json::to_vec_pretty(file)?)?;
    std::fs::rename(&tmp, path)?;
    Ok(())
}

#[cfg(test)]
mod tests {
    use RecoveryPointType::{CopyOnlyFull, Differential, Full, Log};

    use super::*;

    /// Plans one backup and commits it, as after the server accepted it.
    async fn backup(store: &ChainStore, db: &str, kind: RecoveryPointType) -> Lsns {
        let key = DbKey::new("MSSQLSERVER", db);
        let mut planner = store.planner([key.clone()]).await;
        let lsns = planner.plan(&key, kind).unwrap();
        store.commit(planner.finish());
        assert!(lsns.first < lsns.last);
        lsns
    }

    #[test]
    fn lsns_strictly_increase_even_if_the_clock_stalls() {
        let mut clock = LsnClock::default();
        assert_eq!(clock.next_at(100), 100);
        assert_eq!(clock.next_at(100), 101);
        assert_eq!(clock.next_at(50), 102);
        assert_eq!(clock.next_at(500), 500);
        let (a, b) = (clock.next(), clock.next());
        assert!(a > 500 && b > a);
    }

    #[tokio::test]
    async fn full_logs_differential_log_chain() {
        let store = ChainStore::in_memory();
        let full = backup(&store, "sales", Full).await;
        assert_eq!(full.database_backup, full.first);

        let log1 = backup(&store, "sales", Log).await;
        assert_eq!(
            log1.first, full.last,
            "the first log starts where the full ended"
        );
        assert_eq!(log1.database_backup, full.first);
        let log2 = backup(&store, "sales", Log).await;
        assert_eq!(log2.first, log1.last);
        assert_eq!(log2.database_backup, full.first);

        let diff = backup(&store, "sales", Differential).await;
        assert_eq!(diff.database_backup, full.first);
        assert!(diff.first > log2.last && diff.last > diff.first);

        let log3 = backup(&store, "sales", Log).await;
        assert_eq!(
            log3.first, log2.last,
            "a differential does not break the log chain"
        );
        assert_eq!(log3.database_backup, full.first);

        let full2 = backup(&store, "sales", Full).await;
        let log4 = backup(&store, "sales", Log).await;
        assert_eq!(log4.first, log3.last, "nor does a later full");
        assert_eq!(
            log4.database_backup, full2.first,
            "but logs now build on it"
        );
        let diff2 = backup(&store, "sales", Differential).await;
        assert_eq!(diff2.database_backup, full2.first);
    }

    #[tokio::test]
    async fn copy_only_full_moves_nothing() {
        let store = ChainStore::in_memory();
        let full = backup(&store, "sales", Full).await;
        let log1 = backup(&store, "sales", Log).await;
        let before = store.get(&DbKey::new("MSSQLSERVER", "sales"));

        let copy = backup(&store, "sales", CopyOnlyFull).await;
        assert_eq!(copy.database_backup, copy.first);
        assert_eq!(store.get(&DbKey::new("mssqlserver", "SALES")), before);

        let diff = backup(&store, "sales", Differential).await;
        assert_eq!(diff.database_backup, full.first);
        let log2 = backup(&store, "sales", Log).await;
        assert_eq!(log2.first, log1.last);
    }

    #[tokio::test]
    async fn differential_and_log_need_a_full() {
        let store = ChainStore::in_memory();
        let key = DbKey::new("MSSQLSERVER", "sales");
        let mut planner = store.planner([key.clone()]).await;
        assert_eq!(planner.plan(&key, Log), Err(ChainError::NoFullBackup));
        assert_eq!(
            planner.plan(&key, Differential),
            Err(ChainError::NoFullBackup)
        );
        // A copy-only full is not a base either.
        planner.plan(&key, CopyOnlyFull).unwrap();
        assert_eq!(planner.plan(&key, Log), Err(ChainError::NoFullBackup));
    }

    #[tokio::test]
    async fn unaccepted_backups_leave_the_chain_alone() {
        let store = ChainStore::in_memory();
        backup(&store, "sales", Full).await;
        let log1 = backup(&store, "sales", Log).await;
        let key = DbKey::new("MSSQLSERVER", "sales");
        let mut planner = store.planner([key.clone()]).await;
        let lost = planner.plan(&key, Log).unwrap();
        let again = planner.plan(&key, Log).unwrap();
        assert_eq!(
            again.first, lost.last,
            "one job's backups chain among themselves"
        );
        drop(planner);
        let log2 = backup(&store, "sales", Log).await;
        assert_eq!(log2.first, log1.last);
        assert!(log2.last > again.last, "LSNs are never reused");
    }

    #[tokio::test]
    async fn state_file_survives_a_restart() {
        let path =
            std::env::temp_dir().join(format!("backvault-chain-{}.json", uuid::Uuid::new_v4()));
        let store = ChainStore::open(Some(path.clone())).unwrap();
        let full = backup(&store, "a+b", Full).await;
        let log1 = backup(&store, "a+b", Log).await;
        drop(store);

        let store = ChainStore::open(Some(path.clone())).unwrap();
        let log2 = backup(&store, "A+B", Log).await;
        assert_eq!(log2.first, log1.last);
        assert_eq!(log2.database_backup, full.first);
        std::fs::remove_file(&path).unwrap();
    }

    #[tokio::test]
    async fn jobs_on_one_database_take_turns() {
        let store = Arc::new(ChainStore::in_memory());
        let key = DbKey::new("MSSQLSERVER", "sales");
        let first = store.planner([key.clone()]).await;
        let waiting = {
            let store = Arc::clone(&store);
            let key = key.clone();
            tokio::spawn(async move {
                let _planner = store.planner([DbKey::new("x", "other"), key]).await;
            })
        };
        tokio::time::sleep(std::time::Duration::from_millis(50)).await;
        assert!(!waiting.is_finished());
        drop(first);
        waiting.await.unwrap();
    }
}
