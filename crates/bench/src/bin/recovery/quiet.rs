//! Waiting until no other benchmark runs before a measurement, and the conditions (load,
//! compilers running) noted beside each result.

use std::process::Command;
use std::time::{Duration, Instant};

use backvault_bench::sys::load_average;

use crate::Ctx;

/// Our own process and its ancestors (the cargo and shell that started us match too).
fn ancestors() -> Vec<u32> {
    let mut pids = vec![std::process::id()];
    let mut pid = std::process::id();
    for _ in 0..32 {
        let Ok(stat) = std::fs::read_to_string(format!("/proc/{pid}/stat")) else {
            break;
        };
        let Some(rest) = stat.rfind(')').map(|i| &stat[i + 1..]) else {
            break;
        };
        let Some(ppid) = rest
            .split_whitespace()
            .nth(1)
            .and_then(|p| p.parse::<u32>().ok())
        else {
            break;
        };
        if ppid <= 1 {
            break;
        }
        pids.push(ppid);
        pid = ppid;
    }
    pids
}

/// Other benchmarks running now, as `pid command` lines.
fn other_benchmarks() -> Vec<String> {
    let mine = ancestors();
    let mut found = Vec::new();
    for pattern in ["backvault-bench", "pgbench"] {
        let Ok(out) = Command::new("pgrep").args(["-a", "-f", pattern]).output() else {
            continue;
        };
        for line in String::from_utf8_lossy(&out.stdout).lines() {
            let pid: u32 = line
                .split_whitespace()
                .next()
                .and_then(|p| p.parse().ok())
                .unwrap_or(0);
            if pid != 0 && !mine.contains(&pid) {
                found.push(line.chars().take(120).collect());
            }
        }
    }
    found
}

/// Compilers running now (they compete for the two cores; noted, not waited for).
fn compilers_running() -> usize {
    ["rustc", "clippy-driver"]
        .iter()
        .filter_map(|name| Command::new("pgrep").args(["-x", name]).output().ok())
        .map(|o| String::from_utf8_lossy(&o.stdout).lines().count())
        .sum()
}

/// Waits (polling every 10 s, at most an hour) until no other benchmark runs; returns the
/// conditions to note next to the result.
pub async fn wait_quiet(ctx: &Ctx, what: &str) -> String {
    if ctx.wait {
        let started = Instant::now();
        let mut said = false;
        loop {
            let others = other_benchmarks();
            if others.is_empty() {
                break;
            }
            if started.elapsed() > Duration::from_secs(3600) {
                eprintln!("{what}: other benchmarks still running after an hour; measuring anyway");
                break;
            }
            if !said {
                eprintln!(
                    "{what}: waiting for other benchmarks to finish: {}",
                    others.join(" | ")
                );
                said = true;
            }
            tokio::time::sleep(Duration::from_secs(10)).await;
        }
        if said {
            eprintln!(
                "{what}: quiet after {:.0} s",
                started.elapsed().as_secs_f64()
            );
        }
    }
    format!(
        "load {} (compilers running: {})",
        load_average(),
        compilers_running()
    )
}
