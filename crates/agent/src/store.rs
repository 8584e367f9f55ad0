//! The simulated databases of this VM, kept across restarts in the state file.
//!
//! A change is made the moment SQL Server would make it, and saved at once: a backup
//! taken stays taken whether or not the server ever hears of it, as in `msdb`. Jobs on one
//! database take turns; jobs on different databases run side by side.
//!
//! The databases of an availability group with a `shared_state` file live in that file
//! instead, which the agents of all its replicas (separate processes) read and write: an
//! availability database has one log, so its LSNs, its differential base and its backups
//! are the same whichever replica looks. A job holds an exclusive lock on the file
//! (`<file>.lock`, since the file itself is replaced by a rename) from before it reads the
//! file until what it did is written back.

use std::collections::{BTreeMap, HashMap};
use std::fs::{File, OpenOptions};
use std::io::Write;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};

use anyhow::Context;
use backvault_domain::agent::RecoveryModel;
use backvault_domain::lsn::Lsn;
use serde::{Deserialize, Serialize};
use tokio::sync::OwnedMutexGuard;
use tokio::task::JoinHandle;
use uuid::Uuid;

use crate::sim::{BackupSet, Database, LsnClock, lsn_text};

/// A database whose state lives in an availability group's shared file, under the name
/// the key gives it (replicas may name their instances differently; the database's name
/// is the same on every replica).
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord)]
pub struct SharedDb {
    pub key: DbKey,
    pub file: PathBuf,
}

/// A database, as SQL Server tells them apart: instance names ignore case; database names
/// follow the instance's collation, so the caller folds them
/// ([`crate::config::InventoryFile::db_key`]).
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

/// Every simulated database, and the clock their LSNs come from.
#[derive(Debug, Default)]
pub struct SimState {
    pub clock: LsnClock,
    pub databases: BTreeMap<DbKey, Database>,
    /// Bumped by every change, so that a save can tell a snapshot older than the file.
    version: u64,
}

impl SimState {
    /// The database, created as SQL Server would have it if it is new to the simulation.
    pub fn database(&mut self, key: &DbKey, model: RecoveryModel) -> &mut Database {
        self.databases
            .entry(key.clone())
            .or_insert_with(|| Database::new(Some(model)))
    }

    /// A backup set of any database of this VM: a restore may read another database's.
    pub fn backup_set(&self, uuid: Uuid) -> Option<&BackupSet> {
        self.databases.values().find_map(|db| db.backup_set(uuid))
    }
}

/// All simulated databases, optionally persisted so that restarts keep them.
pub struct Store {
    state: Mutex<SimState>,
    file: Option<Arc<StateFile>>,
    locks: Mutex<HashMap<DbKey, Arc<tokio::sync::Mutex<()>>>>,
}

/// The state file. Jobs change the state concurrently; their saves take turns.
struct StateFile {
    path: PathBuf,
    /// The version of the state the file holds. Locked for the whole of a save.
    saved: Mutex<u64>,
}

/// A job's databases, held until it is done with them.
pub struct Locked<'a> {
    store: &'a Store,
    _guards: Vec<OwnedMutexGuard<()>>,
    shared: Vec<HeldFile>,
}

/// A shared state file, locked against every other job (of this agent or another) until
/// what this job did is written back to it.
struct HeldFile {
    path: PathBuf,
    /// Holds the lock; closing it releases it.
    _lock: File,
    /// The last LSN any replica handed out: new ones come after it.
    clock: Lsn,
    /// What the file holds, by database name; while a job runs, this VM's databases are
    /// in the store's state instead.
    databases: BTreeMap<String, Database>,
    /// This VM's databases among them: their names in the file and here.
    mine: Vec<(String, DbKey)>,
}

/// A save under way. It runs to its end even if nobody waits for it.
pub struct Saving(Option<JoinHandle<anyhow::Result<()>>>);

impl Saving {
    pub async fn finished(self) -> anyhow::Result<()> {
        match self.0 {
            Some(handle) => handle.await.context("the state save panicked")?,
            None => Ok(()),
        }
    }
}

impl Store {
    /// Loads `path` if it exists; a missing file is a first start.
    pub fn open(path: Option<PathBuf>) -> anyhow::Result<Self> {
        let mut state = SimState::default();
        if let Some(path) = &path
            && path.exists()
        {
            state = load(path).with_context(|| format!("simulation state {}", path.display()))?;
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

    /// Waits until no other job works on these databases, then holds them. `shared` names
    /// the databases, among these and any others a job reads, that live in shared files:
    /// those files are locked and read too.
    pub async fn lock(
        &self,
        keys: impl IntoIterator<Item = DbKey>,
        shared: Vec<SharedDb>,
    ) -> anyhow::Result<Locked<'_>> {
        let mut keys: Vec<DbKey> = keys.into_iter().collect();
        // One order for everyone, so two jobs never wait on each other's databases.
        keys.sort();
        keys.dedup();
        let mutexes: Vec<_> = {
            let mut locks = self.locks.lock().expect("database locks");
            keys.into_iter()
                .map(|k| Arc::clone(locks.entry(k).or_default()))
                .collect()
        };
        let mut guards = Vec::with_capacity(mutexes.len());
        for mutex in mutexes {
            guards.push(mutex.lock_owned().await);
        }
        // After the databases' own locks, so that a job holding a file never waits for
        // another job of this agent. Blocking: the lock may take as long as another
        // agent's job.
        let shared = if shared.is_empty() {
            Vec::new()
        } else {
            tokio::task::spawn_blocking(move || hold(shared))
                .await
                .context("locking the shared state panicked")??
        };
        Ok(Locked {
            store: self,
            _guards: guards,
            shared,
        })
    }

    /// A database as the shared file `path` holds it, under its name there.
    #[cfg(test)]
    pub fn shared_database(path: &Path, name: &str) -> Option<Database> {
        let file: SharedFile = serde_json::from_str(&std::fs::read_to_string(path).ok()?).ok()?;
        file.databases.get(name).cloned()
    }

    #[cfg(test)]
    pub fn database(&self, key: &DbKey) -> Option<Database> {
        self.state
            .lock()
            .expect("simulation state")
            .databases
            .get(key)
            .cloned()
    }
}

impl Locked<'_> {
    /// Runs `f` on the simulated state, with the shared databases as their files hold
    /// them, and starts saving what it left. Call it only for the databases this lock
    /// holds; it releases them.
    pub fn apply<R>(self, f: impl FnOnce(&mut SimState) -> R) -> (R, Saving) {
        let Locked {
            store, mut shared, ..
        } = self;
        let (result, snapshot) = {
            let mut state = store.state.lock().expect("simulation state");
            for file in &mut shared {
                file.lend(&mut state);
            }
            let result = f(&mut state);
            for file in &mut shared {
                file.take_back(&mut state);
            }
            state.version += 1;
            let snapshot = store
                .file
                .as_ref()
                .map(|file| (Arc::clone(file), state.version, to_bytes(&state)));
            (result, snapshot)
        };
        if snapshot.is_none() && shared.is_empty() {
            return (result, Saving(None));
        }
        // Spawned rather than awaited here: a job dropped now (its lease lost) must not
        // take the record of what it did with it.
        let saving = tokio::task::spawn_blocking(move || {
            let mut outcome = Ok(());
            // Every file is written, and its lock released, whatever another's fate.
            for file in shared {
                outcome = outcome.and(file.save());
            }
            if let Some((file, version, bytes)) = snapshot {
                outcome = outcome.and(bytes.and_then(|bytes| file.save(version, bytes)));
            }
            outcome
        });
        (result, Saving(Some(saving)))
    }
}

/// Locks the files `shared` names, one after another in one order for every agent (so
/// that two jobs never hold one each while waiting for the other's), and reads them.
fn hold(shared: Vec<SharedDb>) -> anyhow::Result<Vec<HeldFile>> {
    let mut by_file: BTreeMap<PathBuf, Vec<(String, DbKey)>> = BTreeMap::new();
    for db in shared {
        by_file
            .entry(db.file)
            .or_default()
            .push((db.key.database.clone(), db.key));
    }
    by_file
        .into_iter()
        .map(|(path, mine)| {
            HeldFile::open(&path, mine)
                .with_context(|| format!("shared simulation state {}", path.display()))
        })
        .collect()
}

/// The shared state file: JSON, LSNs as decimal strings like on the wire.
#[derive(Debug, Default, Serialize, Deserialize)]
struct SharedFile {
    #[serde(with = "lsn_text")]
    clock: Lsn,
    databases: BTreeMap<String, Database>,
}

impl HeldFile {
    fn open(path: &Path, mine: Vec<(String, DbKey)>) -> anyhow::Result<Self> {
        let mut lock_path = path.as_os_str().to_owned();
        lock_path.push(".lock");
        let lock = OpenOptions::new()
            .write(true)
            .create(true)
            .truncate(false)
            .open(&lock_path)
            .with_context(|| format!("opening {}", Path::new(&lock_path).display()))?;
        lock.lock().context("locking")?;
        let file: SharedFile = match std::fs::read_to_string(path) {
            Ok(text) => serde_json::from_str(&text).context("reading")?,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => SharedFile::default(),
            Err(e) => return Err(anyhow::Error::new(e).context("reading")),
        };
        let mut clock = LsnClock::default();
        clock.observe(file.clock);
        for db in file.databases.values() {
            observe_database(&mut clock, db);
        }
        Ok(Self {
            path: path.to_owned(),
            _lock: lock,
            clock: clock.last(),
            databases: file.databases,
            mine,
        })
    }

    /// Puts this VM's databases into `state` as the file holds them. One the file lacks
    /// keeps the state this VM has (it was kept here before the group shared a file), and
    /// moves to the file with the job.
    fn lend(&mut self, state: &mut SimState) {
        state.clock.observe(self.clock);
        for (name, key) in &self.mine {
            if let Some(db) = self.databases.remove(name) {
                state.databases.insert(key.clone(), db);
            }
        }
    }

    /// Takes this VM's databases back from `state`, as the job left them (they are kept in
    /// the file only), and the clock that observed the file's.
    fn take_back(&mut self, state: &mut SimState) {
        for (name, key) in &self.mine {
            if let Some(db) = state.databases.remove(key) {
                self.databases.insert(name.clone(), db);
            }
        }
        self.clock = state.clock.last();
    }

    /// Writes the file, then releases the lock (by dropping it).
    fn save(self) -> anyhow::Result<()> {
        let file = SharedFile {
            clock: self.clock,
            databases: self.databases,
        };
        let bytes = serde_json::to_vec(&file)?;
        replace_file(&self.path, &bytes)
            .with_context(|| format!("saving the shared simulation state {}", self.path.display()))
    }
}

impl StateFile {
    fn save(&self, version: u64, bytes: Vec<u8>) -> anyhow::Result<()> {
        let mut saved = self.saved.lock().expect("state file");
        // Saves may reach here out of order: a newer state on disk stays.
        if *saved >= version {
            return Ok(());
        }
        replace_file(&self.path, &bytes)
            .with_context(|| format!("saving the simulation state {}", self.path.display()))?;
        *saved = version;
        Ok(())
    }
}

/// The state file: JSON, LSNs as decimal strings like on the wire.
#[derive(Debug, Deserialize)]
struct FileIn {
    #[serde(default, with = "lsn_text::option")]
    clock: Option<Lsn>,
    databases: Vec<EntryIn>,
}

#[derive(Debug, Deserialize)]
struct EntryIn {
    instance: String,
    database: String,
    /// The first version of the file knew a database by these two LSNs only.
    #[serde(default, with = "lsn_text::option")]
    last_full_first_lsn: Option<Lsn>,
    #[serde(default, with = "lsn_text::option")]
    last_lsn: Option<Lsn>,
    #[serde(default)]
    simulated: Option<Database>,
}

#[derive(Serialize)]
struct FileOut<'a> {
    #[serde(with = "lsn_text")]
    clock: Lsn,
    databases: Vec<EntryOut<'a>>,
}

#[derive(Serialize)]
struct EntryOut<'a> {
    instance: &'a str,
    database: &'a str,
    simulated: &'a Database,
}

fn to_bytes(state: &SimState) -> anyhow::Result<Vec<u8>> {
    let file = FileOut {
        clock: state.clock.last(),
        databases: state
            .databases
            .iter()
            .map(|(key, db)| EntryOut {
                instance: &key.instance,
                database: &key.database,
                simulated: db,
            })
            .collect(),
    };
    Ok(serde_json::to_vec(&file)?)
}

fn load(path: &Path) -> anyhow::Result<SimState> {
    let file: FileIn = serde_json::from_str(&std::fs::read_to_string(path)?)?;
    let mut state = SimState::default();
    if let Some(clock) = file.clock {
        state.clock.observe(clock);
    }
    for entry in file.databases {
        let db = entry.simulated.unwrap_or_else(|| {
            Database::from_first_version(entry.last_full_first_lsn, entry.last_lsn)
        });
        observe_database(&mut state.clock, &db);
        state
            .databases
            .insert(DbKey::new(&entry.instance, &entry.database), db);
    }
    Ok(state)
}

/// New LSNs must come after every one already handed out, whatever the clock says.
fn observe_database(clock: &mut LsnClock, db: &Database) {
    clock.observe(db.position);
    for set in &db.history {
        clock.observe(set.last_lsn);
    }
    if let Some(next) = db.log_chain.next_first_lsn {
        clock.observe(next);
    }
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
    use backvault_domain::agent::RecoveryPointType::{self, Differential, Full, Log};
    use chrono::Utc;

    use super::*;
    use crate::sim::{Activity, Taking};

    fn temp_path() -> PathBuf {
        std::env::temp_dir().join(format!("backvault-sim-{}.json", Uuid::new_v4()))
    }

    /// Takes one backup of `db` and waits for its save.
    async fn backup(store: &Store, db: &str, kind: RecoveryPointType) -> BackupSet {
        let key = DbKey::new("MSSQLSERVER", db);
        let locked = store.lock([key.clone()], Vec::new()).await.unwrap();
        let (set, saving) = locked.apply(|sim| {
            let taking = Taking {
                started_at: Utc::now(),
                backup_time: Utc::now(),
                size_bytes: 1,
                job_id: None,
                external_id: None,
            };
            let SimState {
                clock, databases, ..
            } = sim;
            databases
                .entry(key.clone())
                .or_insert_with(|| Database::new(Some(RecoveryModel::Full)))
                .backup(db, kind, Activity::default(), taking, clock)
                .unwrap()
        });
        saving.finished().await.unwrap();
        set
    }

    #[tokio::test]
    async fn the_state_file_survives_a_restart() {
        let path = temp_path();
        let store = Store::open(Some(path.clone())).unwrap();
        let full = backup(&store, "a+b", Full).await;
        let log1 = backup(&store, "a+b", Log).await;
        drop(store);

        let store = Store::open(Some(path.clone())).unwrap();
        let log2 = backup(&store, "a+b", Log).await;
        assert_eq!(log2.first_lsn, log1.last_lsn);
        assert_eq!(log2.database_backup_lsn, full.checkpoint_lsn.unwrap());
        let db = store.database(&DbKey::new("mssqlserver", "a+b")).unwrap();
        assert_eq!(db.history.len(), 3, "the history too");
        assert_eq!(db.history[0], full);
        std::fs::remove_file(&path).unwrap();
    }

    /// A file the first version of the agent wrote: two LSNs per database, microseconds.
    #[tokio::test]
    async fn a_first_version_state_file_loads() {
        let path = temp_path();
        std::fs::write(
            &path,
            r#"{"databases": [
                {"instance": "MSSQLSERVER", "database": "sales",
                 "last_full_first_lsn": "1764000000000001", "last_lsn": "1764000000000500"},
                {"instance": "MSSQLSERVER", "database": "fresh"}
            ]}"#,
        )
        .unwrap();
        let store = Store::open(Some(path.clone())).unwrap();
        let sales = store.database(&DbKey::new("MSSQLSERVER", "sales")).unwrap();
        assert_eq!(
            sales.differential_base.map(|b| b.checkpoint_lsn),
            Some(Lsn(1_764_000_000_000_001)),
            "its differentials keep the base the server knows"
        );
        assert_eq!(
            sales.log_chain.next_first_lsn,
            Some(Lsn(1_764_000_000_000_500))
        );
        assert_eq!(sales.recovery_model, None, "until the inventory says");
        let log = backup(&store, "sales", Log).await;
        assert_eq!(log.first_lsn, Lsn(1_764_000_000_000_500));
        assert!(log.last_lsn.textual().is_some(), "new LSNs have both forms");
        let diff = backup(&store, "sales", Differential).await;
        assert_eq!(diff.database_backup_lsn, Lsn(1_764_000_000_000_001));

        let fresh = store.database(&DbKey::new("MSSQLSERVER", "fresh")).unwrap();
        assert_eq!(fresh.differential_base, None);
        assert_eq!(fresh.log_chain.next_first_lsn, None);
        drop(store);
        // What it saves, it reads back.
        let store = Store::open(Some(path.clone())).unwrap();
        let again = store.database(&DbKey::new("MSSQLSERVER", "sales")).unwrap();
        assert_eq!(again.history.len(), 2);
        assert_eq!(again.database_guid, sales.database_guid);
        std::fs::remove_file(&path).unwrap();
    }

    #[tokio::test]
    async fn names_differing_by_case_are_two_databases() {
        // The caller folds names on case-insensitive instances; these come from a
        // case-sensitive one.
        let path = temp_path();
        let store = Store::open(Some(path.clone())).unwrap();
        let upper = backup(&store, "Sales", Full).await;
        let lower = backup(&store, "sales", Full).await;
        drop(store);

        let store = Store::open(Some(path.clone())).unwrap();
        assert_eq!(
            backup(&store, "Sales", Log).await.first_lsn,
            upper.first_lsn
        );
        assert_eq!(
            backup(&store, "sales", Log).await.first_lsn,
            lower.first_lsn
        );
        std::fs::remove_file(&path).unwrap();
    }

    /// Many jobs changing the state at once, on many threads, while someone reads the file.
    #[tokio::test(flavor = "multi_thread", worker_threads = 8)]
    async fn concurrent_saves_leave_the_last_state() {
        let dir = std::env::temp_dir().join(format!("backvault-sim-{}", Uuid::new_v4()));
        std::fs::create_dir(&dir).unwrap();
        let path = dir.join("state.json");
        let store = Arc::new(Store::open(Some(path.clone())).unwrap());

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
                        backup(&store, &format!("db{}", job % 8), kind).await;
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
        assert_eq!(on_disk.databases, state.databases);
        assert_eq!(on_disk.databases.len(), 8);
        assert_eq!(on_disk.clock, state.clock);
        let files: Vec<_> = std::fs::read_dir(&dir).unwrap().collect();
        assert_eq!(files.len(), 1, "no temporary file is left behind");
        drop(state);
        std::fs::remove_dir_all(&dir).unwrap();
    }

    #[test]
    fn an_older_snapshot_never_replaces_a_newer_one() {
        let path = temp_path();
        let file = StateFile {
            path: path.clone(),
            saved: Mutex::new(0),
        };
        let snapshot = |lsn: u128| {
            let mut state = SimState::default();
            state.clock.observe(Lsn(lsn));
            to_bytes(&state).unwrap()
        };
        file.save(2, snapshot(200)).unwrap();
        file.save(1, snapshot(100)).unwrap();
        assert_eq!(load(&path).unwrap().clock.last(), Lsn(200));
        file.save(3, snapshot(300)).unwrap();
        assert_eq!(load(&path).unwrap().clock.last(), Lsn(300));
        std::fs::remove_file(&path).unwrap();
    }

    #[tokio::test]
    async fn jobs_on_one_database_take_turns() {
        let store = Arc::new(Store::in_memory());
        let key = DbKey::new("MSSQLSERVER", "sales");
        let first = store.lock([key.clone()], Vec::new()).await.unwrap();
        let waiting = {
            let store = Arc::clone(&store);
            let key = key.clone();
            tokio::spawn(async move {
                let _locked = store
                    .lock([DbKey::new("x", "other"), key], Vec::new())
                    .await
                    .unwrap();
            })
        };
        tokio::time::sleep(std::time::Duration::from_millis(50)).await;
        assert!(!waiting.is_finished());
        drop(first);
        waiting.await.unwrap();
    }
}
