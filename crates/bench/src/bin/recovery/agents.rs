//! The simulated agents of `ingest`: each claims and completes its jobs over HTTP as a
//! real agent does, reporting an inventory for discoveries and, for backups, recovery
//! points whose log sequence numbers chain as a SQL Server's would.

use std::collections::HashMap;
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::{Context, bail, ensure};
use chrono::{DateTime, Utc};
use serde_json::{Value, json};
use uuid::Uuid;

/// JSON over HTTP to the server, for the admin's calls and the agents'.
#[derive(Clone)]
pub struct Http {
    pub client: reqwest::Client,
    pub base: Arc<String>,
}

impl Http {
    async fn call(
        &self,
        method: reqwest::Method,
        path: &str,
        token: &str,
        body: Option<&Value>,
    ) -> anyhow::Result<(u16, Value)> {
        let mut req = self
            .client
            .request(method.clone(), format!("{}{path}", self.base))
            .bearer_auth(token);
        if let Some(b) = body {
            req = req.json(b);
        }
        let res = req
            .send()
            .await
            .with_context(|| format!("{method} {path}"))?;
        let status = res.status().as_u16();
        let bytes = res.bytes().await?;
        let value = if bytes.is_empty() {
            Value::Null
        } else {
            serde_json::from_slice(&bytes)
                .unwrap_or_else(|_| Value::String(String::from_utf8_lossy(&bytes).into()))
        };
        Ok((status, value))
    }

    /// POST that must answer `expect`.
    pub async fn post(
        &self,
        path: &str,
        token: &str,
        body: &Value,
        expect: u16,
    ) -> anyhow::Result<Value> {
        let (status, value) = self
            .call(reqwest::Method::POST, path, token, Some(body))
            .await?;
        ensure!(status == expect, "POST {path}: {status} {value}");
        Ok(value)
    }

    pub async fn get(&self, path: &str, token: &str) -> anyhow::Result<Value> {
        let (status, value) = self.call(reqwest::Method::GET, path, token, None).await?;
        ensure!(status == 200, "GET {path}: {status} {value}");
        Ok(value)
    }
}

/// A fake SQL Server's log-sequence state per database, so that reported points chain.
#[derive(Default)]
pub struct Lsns {
    next: u128,
    full_first: HashMap<String, u128>,
    last_log: HashMap<String, u128>,
}

impl Lsns {
    /// Log sequence numbers from `next` on.
    pub fn starting_at(next: u128) -> Self {
        Self {
            next,
            ..Self::default()
        }
    }

    fn point(&mut self, instance: &str, db: &str, kind: &str, at: DateTime<Utc>) -> Value {
        self.next += 10;
        let (first, last, base, backup_type) = match kind {
            "backup_full" => {
                let first = self.next;
                self.full_first.insert(db.to_owned(), first);
                // A full does not break the log chain; before the first log, the chain
                // starts within the first full.
                self.last_log.entry(db.to_owned()).or_insert(first + 5);
                (first, first + 5, first, "full")
            }
            "backup_differential" => (
                self.next,
                self.next + 5,
                self.full_first.get(db).copied().unwrap_or(0),
                "differential",
            ),
            _ => {
                let first = self.last_log.get(db).copied().unwrap_or(0);
                self.last_log.insert(db.to_owned(), self.next + 5);
                (
                    first,
                    self.next + 5,
                    self.full_first.get(db).copied().unwrap_or(0),
                    "log",
                )
            }
        };
        json!({"instance": instance, "database": db, "backup_type": backup_type,
               "started_at": at - chrono::Duration::seconds(30), "backup_time": at,
               "first_lsn": first.to_string(), "last_lsn": last.to_string(),
               "database_backup_lsn": base.to_string(), "size_bytes": 1_073_741_824i64})
    }
}

pub struct AgentSim {
    pub vm_id: Uuid,
    pub token: String,
    pub databases: usize,
    pub lsns: Lsns,
}

#[derive(Default, Clone)]
pub struct DrainStats {
    pub kinds: std::collections::BTreeMap<String, usize>,
    pub jobs: usize,
    pub points: usize,
    pub claims: usize,
    pub claim_time: Duration,
    pub complete_time: Duration,
    pub complete_max: Duration,
}

impl AgentSim {
    fn inventory(&self) -> Value {
        let databases: Vec<Value> = (1..=self.databases)
            .map(|d| json!({"instance": "MSSQLSERVER", "name": format!("db{d:03}"), "recovery_model": "full", "size_bytes": 1_073_741_824i64}))
            .collect();
        json!({"instances": [{"name": "MSSQLSERVER", "version": "2019"}], "databases": databases})
    }

    /// Claims and completes jobs until none is left, as an agent would; backups report
    /// one point per database taken at `at`.
    async fn drain(&mut self, http: &Http, at: DateTime<Utc>) -> anyhow::Result<DrainStats> {
        let mut stats = DrainStats::default();
        loop {
            let t = Instant::now();
            let claimed = http
                .post(
                    "/v1/agent/claim",
                    &self.token,
                    &json!({"max_jobs": 50, "wait_seconds": 0}),
                    200,
                )
                .await?;
            stats.claim_time += t.elapsed();
            stats.claims += 1;
            let jobs = claimed["jobs"].as_array().cloned().unwrap_or_default();
            if jobs.is_empty() {
                return Ok(stats);
            }
            for job in jobs {
                let kind = job["kind"].as_str().unwrap_or("").to_owned();
                let result = match kind.as_str() {
                    "discovery" => json!({"kind": "discovery", "inventory": self.inventory()}),
                    "configure_protection" => json!({"kind": "configure_protection"}),
                    k if k.starts_with("backup_") => {
                        let points: Vec<Value> = job["items"]
                            .as_array()
                            .map(Vec::as_slice)
                            .unwrap_or_default()
                            .iter()
                            .map(|i| {
                                self.lsns.point(
                                    i["instance"].as_str().unwrap_or(""),
                                    i["database"].as_str().unwrap_or(""),
                                    k,
                                    at,
                                )
                            })
                            .collect();
                        stats.points += points.len();
                        json!({"kind": "backup", "recovery_points": points})
                    }
                    other => bail!("unexpected job kind {other}"),
                };
                let t = Instant::now();
                http.post(
                    &format!(
                        "/v1/agent/jobs/{}/complete",
                        job["job_id"].as_str().unwrap_or("")
                    ),
                    &self.token,
                    &json!({"lease": job["lease"], "result": result}),
                    200,
                )
                .await?;
                let took = t.elapsed();
                stats.complete_time += took;
                stats.complete_max = stats.complete_max.max(took);
                stats.jobs += 1;
                *stats.kinds.entry(kind).or_default() += 1;
            }
        }
    }
}

/// Every agent drains its jobs at once; returns the agents and their summed statistics
/// and the wall time.
pub async fn drain_all(
    http: &Http,
    agents: Vec<AgentSim>,
    at: DateTime<Utc>,
) -> anyhow::Result<(Vec<AgentSim>, DrainStats, Duration)> {
    let started = Instant::now();
    let mut set = tokio::task::JoinSet::new();
    for (i, mut agent) in agents.into_iter().enumerate() {
        let http = http.clone();
        set.spawn(async move {
            let stats = agent.drain(&http, at).await;
            (i, agent, stats)
        });
    }
    let mut back: Vec<Option<AgentSim>> = Vec::new();
    let mut total = DrainStats::default();
    let mut first_error = None;
    while let Some(joined) = set.join_next().await {
        let (i, agent, stats) = joined?;
        if back.len() <= i {
            back.resize_with(i + 1, || None);
        }
        back[i] = Some(agent);
        match stats {
            Ok(s) => {
                total.jobs += s.jobs;
                for (k, n) in s.kinds {
                    *total.kinds.entry(k).or_default() += n;
                }
                total.points += s.points;
                total.claims += s.claims;
                total.claim_time += s.claim_time;
                total.complete_time += s.complete_time;
                total.complete_max = total.complete_max.max(s.complete_max);
            }
            Err(e) => {
                first_error.get_or_insert(e);
            }
        }
    }
    let wall = started.elapsed();
    if let Some(e) = first_error {
        return Err(e);
    }
    Ok((back.into_iter().flatten().collect(), total, wall))
}

/// Runs `count` tasks of `f`, `concurrency` at a time.
pub async fn for_each_concurrent<F, Fut>(
    count: usize,
    concurrency: usize,
    f: F,
) -> anyhow::Result<()>
where
    F: Fn(usize) -> Fut,
    Fut: Future<Output = anyhow::Result<()>> + Send + 'static,
{
    let gate = Arc::new(tokio::sync::Semaphore::new(concurrency));
    let mut set = tokio::task::JoinSet::new();
    for i in 0..count {
        let permit = gate.clone().acquire_owned().await?;
        let fut = f(i);
        set.spawn(async move {
            let r = fut.await;
            drop(permit);
            r
        });
    }
    while let Some(r) = set.join_next().await {
        r??;
    }
    Ok(())
}
