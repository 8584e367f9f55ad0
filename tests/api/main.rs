//! HTTP tests of every endpoint against real Postgres: each test gets its own database
//! (`#[sqlx::test]`) and drives the full router in process.

mod agent_trust;
mod agents;
mod auth;
mod chain;
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
mod security;
mod vaults;
