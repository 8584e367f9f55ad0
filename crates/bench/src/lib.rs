//! What every benchmark binary of `backvault-bench` shares: a scratch database per
//! benchmark ([`db`]), the real `backvault serve` started on a free port with agents
//! enrolled on it ([`server`]), and what `/proc` says about CPU and memory ([`sys`]).
//!
//! The binaries: `backvault-bench` (`src/main.rs`: the job queue against a pgbench
//! baseline) and `recovery` (`src/bin/recovery/`: scheduler tick, recovery-point
//! ingestion, retention sweep). `BENCHMARKS.md` says how to run them.

pub mod db;
pub mod fixture;
pub mod server;
pub mod sys;

use std::path::PathBuf;

/// The workspace this crate was built from (to find `target/release/backvault`).
pub fn workspace_root() -> PathBuf {
    let root = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../..");
    root.canonicalize().unwrap_or(root)
}
