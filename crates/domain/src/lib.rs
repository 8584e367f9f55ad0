//! The rules of backvault, free of I/O: policy validation, backup schedules, retention
//! and the recovery chain, resource names. Every rule lives here once; `service` calls it,
//! `api` renders what it returns.
// Input reaches every rule here: arithmetic that could overflow must say why it cannot
// (tests are exempt: their numbers are their own).
#![cfg_attr(not(test), warn(clippy::arithmetic_side_effects))]

pub mod access;
pub mod agent;
pub mod audit;
pub mod availability;
pub mod chain;
pub mod configure;
pub mod instants;
pub mod jobs;
pub mod lsn;
pub mod names;
pub mod policy;
pub mod preview;
pub mod protection;
pub mod restore;
pub mod retention;
pub mod safety;
pub mod schedule;
#[cfg(feature = "sqlx")]
mod sql;
pub mod text;
pub mod tokens;
pub mod violation;

pub use violation::Violation;
