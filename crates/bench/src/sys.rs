//! What `/proc` says: CPU time of Postgres, the server and the load generator over a
//! measurement, how busy the machine is, and a process's resident memory. The one CPU
//! accounting of every benchmark binary.

use std::collections::HashMap;
use std::time::Instant;

/// Linux reports process CPU times in USER_HZ ticks, 100 per second on every mainstream
/// architecture.
const TICKS_PER_SECOND: f64 = 100.0;

/// `(comm, utime + stime ticks)` of a process.
fn proc_stat(pid: u32) -> Option<(String, u64)> {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    let open = stat.find('(')?;
    let close = stat.rfind(')')?;
    let comm = stat[open + 1..close].to_owned();
    let fields: Vec<&str> = stat[close + 1..].split_whitespace().collect();
    // After the comm: field 3 (state) is index 0, so utime (14) and stime (15) are 11 and 12.
    let utime: u64 = fields.get(11)?.parse().ok()?;
    let stime: u64 = fields.get(12)?.parse().ok()?;
    Some((comm, utime + stime))
}

/// Jiffies of the whole machine (first line of `/proc/stat`).
#[derive(Debug, Clone, Copy)]
struct MachineTicks {
    /// user, nice, system, irq, softirq
    busy: u64,
    /// Taken by the hypervisor for other guests.
    steal: u64,
    total: u64,
}

fn machine_ticks() -> Option<MachineTicks> {
    let stat = std::fs::read_to_string("/proc/stat").ok()?;
    let line = stat.lines().next()?;
    let v: Vec<u64> = line
        .split_whitespace()
        .skip(1)
        .filter_map(|v| v.parse().ok())
        .collect();
    let at = |i: usize| v.get(i).copied().unwrap_or(0);
    // user nice system idle iowait irq softirq steal (guest time is already in user).
    Some(MachineTicks {
        busy: at(0) + at(1) + at(2) + at(5) + at(6),
        steal: at(7),
        total: (0..8).map(at).sum(),
    })
}

/// (busy, steal) fractions between two readings.
fn machine_fractions(a: Option<MachineTicks>, b: Option<MachineTicks>) -> (f64, f64) {
    match (a, b) {
        (Some(a), Some(b)) if b.total > a.total => {
            let total = (b.total - a.total) as f64;
            (
                (b.busy - a.busy) as f64 / total,
                (b.steal - a.steal) as f64 / total,
            )
        }
        _ => (f64::NAN, f64::NAN),
    }
}

/// A Postgres backend (or autovacuum worker) serving a database whose name does not start
/// with `ours` (someone else's tests on the same server): its CPU is not ours.
fn foreign_backend(pid: u32, ours: &str) -> bool {
    let Ok(cmdline) = std::fs::read(format!("/proc/{pid}/cmdline")) else {
        return false;
    };
    let title = String::from_utf8_lossy(&cmdline);
    // Process titles: "postgres: 15/main: <user> <database> <host>(<port>) <state>",
    // "postgres: 15/main: autovacuum worker <database>", "postgres: 15/main: walwriter".
    let serves_a_database =
        title.contains('(') || title.contains("[local]") || title.contains("autovacuum worker");
    serves_a_database && !title.contains(ours)
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
enum Who {
    /// Postgres's background processes and the backends of the benchmark's databases.
    Postgres,
    Server,
    /// This process and any `pgbench`.
    Client,
    /// Every other process, someone else's Postgres backends included.
    Other,
}

/// CPU ticks per process at one instant.
pub struct CpuSnapshot {
    at: Instant,
    ticks: HashMap<u32, (Who, u64)>,
    machine: Option<MachineTicks>,
}

impl CpuSnapshot {
    /// `ours`: the name prefix of the benchmark's databases (whose backends count as
    /// Postgres's, see [`crate::db`]); `server`: the backvault server's pid, if one runs.
    /// The client is this process plus any `pgbench`.
    pub fn take(ours: &str, server: Option<u32>) -> Self {
        let me = std::process::id();
        let mut ticks = HashMap::new();
        if let Ok(dir) = std::fs::read_dir("/proc") {
            for entry in dir.flatten() {
                let Some(pid) = entry
                    .file_name()
                    .to_str()
                    .and_then(|s| s.parse::<u32>().ok())
                else {
                    continue;
                };
                let Some((comm, t)) = proc_stat(pid) else {
                    continue;
                };
                let who = if Some(pid) == server {
                    Who::Server
                } else if pid == me || comm == "pgbench" {
                    Who::Client
                } else if comm == "postgres" && !foreign_backend(pid, ours) {
                    Who::Postgres
                } else {
                    Who::Other
                };
                ticks.insert(pid, (who, t));
            }
        }
        Self {
            at: Instant::now(),
            ticks,
            machine: machine_ticks(),
        }
    }

    /// CPU used between `earlier` and this snapshot, in cores (CPU seconds per second).
    /// Processes that exited in between are missed; ones that started count from zero.
    pub fn since(&self, earlier: &CpuSnapshot) -> CpuSplit {
        let wall = self.at.duration_since(earlier.at).as_secs_f64().max(1e-9);
        let mut used: HashMap<Who, u64> = HashMap::new();
        for (pid, (who, t)) in &self.ticks {
            let before = earlier.ticks.get(pid).map_or(0, |(_, b)| *b);
            *used.entry(*who).or_default() += t.saturating_sub(before);
        }
        let cores = |w: Who| used.get(&w).copied().unwrap_or(0) as f64 / TICKS_PER_SECOND / wall;
        let (machine_busy, steal) = machine_fractions(earlier.machine, self.machine);
        let (postgres, server, client) =
            (cores(Who::Postgres), cores(Who::Server), cores(Who::Client));
        let other = (machine_busy * nproc() as f64 - postgres - server - client).max(0.0);
        CpuSplit {
            postgres,
            server,
            client,
            other,
            other_processes: cores(Who::Other),
            machine_busy,
            steal,
        }
    }
}

/// Average CPU use over a measurement, in cores.
#[derive(Debug, Clone, Copy)]
pub struct CpuSplit {
    pub postgres: f64,
    pub server: f64,
    pub client: f64,
    /// Everything else busy on the machine (other processes, kernel threads, interrupts):
    /// the machine's busy time less the three above.
    pub other: f64,
    /// The CPU time of every other process (kernel threads and interrupts not included).
    pub other_processes: f64,
    /// Fraction of all the machine's CPU time that was busy (any process).
    pub machine_busy: f64,
    /// Fraction the hypervisor gave to other guests.
    pub steal: f64,
}

impl std::fmt::Display for CpuSplit {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(
            f,
            "postgres {:.2} cores, server {:.2}, load generator {:.2}, other {:.2}; machine {:.0}% busy, {:.0}% stolen",
            self.postgres,
            self.server,
            self.client,
            self.other,
            self.machine_busy * 100.0,
            self.steal * 100.0
        )
    }
}

/// A `kB` field of `/proc/<pid>/status` (`VmHWM`, `VmRSS`), in bytes.
pub fn status_bytes(pid: u32, field: &str) -> Option<u64> {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).ok()?;
    status.lines().find_map(|line| {
        let rest = line.strip_prefix(field)?.strip_prefix(':')?;
        let kb: u64 = rest.trim().trim_end_matches("kB").trim().parse().ok()?;
        Some(kb * 1024)
    })
}

pub fn nproc() -> usize {
    std::thread::available_parallelism().map_or(1, |n| n.get())
}

impl CpuSplit {
    /// Someone else used a noticeable share of the machine during the measurement.
    pub fn contaminated(&self) -> bool {
        self.other > 0.25 || self.steal > 0.05
    }

    /// Cores busy (any process) or stolen by the hypervisor.
    pub fn busy_cores(&self) -> f64 {
        (self.machine_busy + self.steal) * nproc() as f64
    }
}

/// The 1/5/15-minute load averages, as `/proc/loadavg` gives them.
pub fn load_average() -> String {
    std::fs::read_to_string("/proc/loadavg")
        .ok()
        .map(|l| l.split_whitespace().take(3).collect::<Vec<_>>().join(" "))
        .unwrap_or_else(|| "?".into())
}

/// `(busy threshold, longest wait)` of [`wait_until_quiet`].
pub static QUIET: std::sync::OnceLock<(f64, std::time::Duration)> = std::sync::OnceLock::new();

/// Fraction of the machine's CPU busy (or stolen by the hypervisor) over `window`.
pub async fn machine_busy(window: std::time::Duration) -> f64 {
    let before = machine_ticks();
    tokio::time::sleep(window).await;
    let (busy, steal) = machine_fractions(before, machine_ticks());
    if busy.is_nan() { 0.0 } else { busy + steal }
}

/// Waits until the machine is idle (under `threshold` busy for two consecutive seconds),
/// for at most `max_wait`, so that a build or test run of someone else's does not land in
/// a measurement. Says so when it had to wait or gave up.
pub async fn wait_until_quiet() {
    let (threshold, max_wait) = *QUIET.get_or_init(|| (0.15, std::time::Duration::from_secs(120)));
    if max_wait.is_zero() {
        return;
    }
    let started = Instant::now();
    let mut quiet_seconds = 0;
    let mut warned = false;
    while quiet_seconds < 2 {
        let busy = machine_busy(std::time::Duration::from_secs(1)).await;
        if busy < threshold {
            quiet_seconds += 1;
            continue;
        }
        quiet_seconds = 0;
        if started.elapsed() >= max_wait {
            eprintln!(
                "warning: the machine is still {:.0}% busy after {} s; measuring anyway",
                busy * 100.0,
                max_wait.as_secs()
            );
            return;
        }
        if !warned {
            eprintln!(
                "machine {:.0}% busy before the benchmark; waiting for it to go quiet",
                busy * 100.0
            );
            warned = true;
        }
    }
}
