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
use std::fs::OpenOptions;
use std::io::Write;
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

/// A database, as SQL Server tells them apart: instance names ignore case; database names
/// follow the instance's collation, so the caller folds them
/// ([`crate::config::InventoryFile::chain_key`]).
#[derive(Debug, Clone, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct DbKey {
    instance: String,
    database: String,
}

impl DbKey {
    pub fn new(instance: &str, database: &str) -> Self {
        Self {
            instance: instance.to_lowercase(),
            database: database.to_owned(),
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
    file: Option<Arc<StateFile>>,
    locks: Mutex<HashMap<DbKey, Arc<tokio::sync::Mutex<()>>>>,
}

#[derive(Debug, Default)]
struct State {
    clock: LsnClock,
    chains: BTreeMap<DbKey, DbChain>,
    /// Bumped by every commit, so that a save can tell a snapshot older than the file.
    version: u64,
}

/// The state file. Jobs commit concurrently; their saves take turns.
struct StateFile {
    path: PathBuf,
    /// The version of the state the file holds. Locked for the whole of a save.
    saved: Mutex<u64>,
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
            file: path.map(|path| {
                Arc::new(StateFile {
                    path,
                    saved: Mutex::new(0),
                })
            }),
            locks: Mutex::default(),
        })
    }

    #[cfg(test)]
    pub fn in_memory() -> Self {
        Self {
            state: Mutex::default(),
            file: None,
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

    /// Applies backups the server accepted, then saves the state file if there is one.
    /// The chains move even when the save fails: an error is about the file only.
    pub async fn commit(&self, pending: PendingChain) -> anyhow::Result<()> {
        if pending.updates.is_empty() {
            return Ok(());
        }
        let snapshot = {
            let mut state = self.state.lock().expect("chain state");
            for (key, chain) in pending.updates {
                state.chains.insert(key, chain);
            }
            state.version += 1;
            self.file
                .as_ref()
                .map(|file| (Arc::clone(file), state.version, to_file(&state)))
        };
        // Other jobs may plan against these databases now; they need not wait for the disk.
        drop(pending._locks);
        let Some((file, version, contents)) = snapshot else {
            return Ok(());
        };
        // The save runs to its end even if this future is dropped, and holds the file's
        // lock throughout, so no abandoned save can overtake a later one.
        tokio::task::spawn_blocking(move || file.save(version, &contents))
            .await
            .context("the chain state save panicked")?
    }
}

impl StateFile {
    fn save(&self, version: u64, contents: &ChainFile) -> anyhow::Result<()> {
        let mut saved = self.saved.lock().expect("state file");
        // Commits may reach here out of order: a newer state on disk stays.
        if *saved >= version {
            return Ok(());
        }
        let bytes = serde_json::to_vec_pretty(contents)?;
        replace_file(&self.path, &bytes)
            .with_context(|| format!("saving the chain state {}", self.path.display()))?;
        *saved = version;
        Ok(())
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

/// Replaces `path` with `bytes` so that readers, and a crash at any instant, find either
/// the old file or the new one in full: a temporary file, flushed to disk before it is
/// renamed over `path`, in the same directory since a rename cannot cross file systems.
fn replace_file(path: &Path, bytes: &[u8]) -> anyhow::Result<()> {
    let name = path.file_name().context("the path names no file")?;
    let dir = match path.parent() {
        Some(dir) if !dir.as_os_str().is_empty() => dir,
        _ => Path::new("."),
    };
    // Unique, so that it collides with neither another process saving the same file nor
    // the leftover of a save that crashed.
    let tmp = dir.join(format!(
        ".{}.{}.tmp",
        name.to_string_lossy(),
        uuid::Uuid::new_v4()
    ));
    if let Err(e) = write_then_rename(&tmp, path, bytes) {
        let _ = std::fs::remove_file(&tmp);
        return Err(e.into());
    }
    sync_dir(dir).with_context(|| format!("flushing directory {}", dir.display()))
}

fn write_then_rename(tmp: &Path, path: &Path, bytes: &[u8]) -> std::io::Result<()> {
    let mut file = OpenOptions::new().write(true).create_new(true).open(tmp)?;
    file.write_all(bytes)?;
    file.sync_all()?;
    std::fs::rename(tmp, path)
}

/// Makes the rename itself survive a power loss: it is a change to the directory.
#[cfg(unix)]
fn sync_dir(dir: &Path) -> std::io::Result<()> {
    std::fs::File::open(dir)?.sync_all()
}

/// std cannot open a directory on Windows to flush it.
#[cfg(not(unix))]
fn sync_dir(_dir: &Path) -> std::io::Result<()> {
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
        store.commit(planner.finish()).await.unwrap();
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
        assert_eq!(store.get(&DbKey::new("mssqlserver", "sales")), before);

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
        let log2 = backup(&store, "a+b", Log).await;
        assert_eq!(log2.first, log1.last);
        assert_eq!(log2.database_backup, full.first);
        std::fs::remove_file(&path).unwrap();
    }

    #[tokio::test]
    async fn names_differing_by_case_are_two_chains() {
        // The caller folds names on case-insensitive instances; these come from a
        // case-sensitive one.
        let path =
            std::env::temp_dir().join(format!("backvault-chain-{}.json", uuid::Uuid::new_v4()));
        let store = ChainStore::open(Some(path.clone())).unwrap();
        let upper = backup(&store, "Sales", Full).await;
        let lower = backup(&store, "sales", Full).await;
        drop(store);

        let store = ChainStore::open(Some(path.clone())).unwrap();
        assert_eq!(backup(&store, "Sales", Log).await.first, upper.last);
        assert_eq!(backup(&store, "sales", Log).await.first, lower.last);
        std::fs::remove_file(&path).unwrap();
    }

    /// Many jobs committing at once, on many threads, while someone reads the file.
    #[tokio::test(flavor = "multi_thread", worker_threads = 8)]
    async fn concurrent_saves_leave_the_last_state() {
        let dir = std::env::temp_dir().join(format!("backvault-chain-{}", uuid::Uuid::new_v4()));
        std::fs::create_dir(&dir).unwrap();
        let path = dir.join("chains.json");
        let store = Arc::new(ChainStore::open(Some(path.clone())).unwrap());

        let reading = Arc::new(std::sync::atomic::AtomicBool::new(true));
        let reader = {
            let (path, reading) = (path.clone(), Arc::clone(&reading));
            std::thread::spawn(move || {
                let mut reads = 0;
                while reading.load(std::sync::atomic::Ordering::Relaxed) {
                    if path.exists() {
                        load(&path).expect("the file always parses");
                        reads += 1;
                    }
                }
                reads
            })
        };
        let jobs: Vec<_> = (0..32)
            .map(|job| {
                let store = Arc::clone(&store);
                tokio::spawn(async move {
                    for kind in [Full, Log, Log, Full, Log, Differential, Log, Log] {
                        let key = DbKey::new("MSSQLSERVER", &format!("db{}", job % 8));
                        let mut planner = store.planner([key.clone()]).await;
                        planner.plan(&key, kind).unwrap();
                        store.commit(planner.finish()).await.unwrap();
                    }
                })
            })
            .collect();
        for job in jobs {
            job.await.unwrap();
        }
        reading.store(false, std::sync::atomic::Ordering::Relaxed);
        assert!(reader.join().unwrap() > 0);

        let on_disk = load(&path).unwrap();
        let state = store.state.lock().unwrap();
        assert_eq!(on_disk.chains, state.chains);
        assert_eq!(on_disk.chains.len(), 8);
        let files: Vec<_> = std::fs::read_dir(&dir).unwrap().collect();
        assert_eq!(files.len(), 1, "no temporary file is left behind");
        drop(state);
        std::fs::remove_dir_all(&dir).unwrap();
    }

    #[test]
    fn an_older_snapshot_never_replaces_a_newer_one() {
        let path =
            std::env::temp_dir().join(format!("backvault-chain-{}.json", uuid::Uuid::new_v4()));
        let file = StateFile {
            path: path.clone(),
            saved: Mutex::new(0),
        };
        let snapshot = |lsn: Lsn| {
            let mut state = State::default();
            let chain = DbChain {
                last_full_first_lsn: Some(lsn),
                last_lsn: Some(lsn),
            };
            state
                .chains
                .insert(DbKey::new("MSSQLSERVER", "sales"), chain);
            to_file(&state)
        };
        file.save(2, &snapshot(200)).unwrap();
        file.save(1, &snapshot(100)).unwrap();
        let key = DbKey::new("MSSQLSERVER", "sales");
        assert_eq!(load(&path).unwrap().chains[&key].last_lsn, Some(200));
        file.save(3, &snapshot(300)).unwrap();
        assert_eq!(load(&path).unwrap().chains[&key].last_lsn, Some(300));
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
