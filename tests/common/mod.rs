//! Test support shared by the integration tests. The process tests (`e2e`, `agents_e2e`,
//! `faults`) start the real binaries through it: a database of their own, the server
//! started as an operator would and awaited until it listens, agents as separate
//! processes, and the setup they share (agents enrolled, a vault, VMs registered,
//! databases protected). Every test, the API tests included, waits through [`wait_for`] /
//! [`wait_until`]: on a condition with a deadline, never on a guessed sleep.
// Each test binary uses what it needs of this module.
#![allow(dead_code, unused_imports)]

mod agents;
mod client;
mod server;
mod setup;
mod wait;

pub use agents::{
    AgSpec, AgentProcess, Inventories, ag_replica_inventory_toml, agent_bin, fail_over,
    inventory_toml, set_role, set_synchronization_health,
};
pub use client::{Api, vm_facts};
pub use server::{
    BIN, Server, ServerLog, TestDb, free_local_addr, migrate, mint_token, mint_token_for,
    serve_refused,
};
pub use setup::Agents;
pub use wait::{Deadline, wait_for, wait_until};
