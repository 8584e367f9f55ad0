//! HTTP tests of every endpoint against real Postgres: each test gets its own database
//! (`#[sqlx::test]`) and drives the full router in process.
// A test's unwrap is its assertion: a panic fails the test that made it.
#![allow(clippy::unwrap_used)]

// The waits every integration test shares (`wait_for`, `wait_until`).
#[path = "../common/mod.rs"]
mod common;

mod agent_trust;
mod agents;
mod audit;
mod auth;
mod availability;
mod chain;
mod claim_v2;
mod contract;
mod hardening;
mod health;
mod helpers;
mod identity;
mod jobs;
mod policies;
mod protection;
mod queue;
mod recovery;
mod safety;
mod security;
mod vaults;
