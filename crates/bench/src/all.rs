//! `all`: every benchmark of issue 15 in one sitting, with one Markdown report. The queue
//! benchmarks whose goals are ratios to the pgbench baseline (`queue`, `http`) run in
//! rounds, each round with its own baseline, and are judged on the median of the rounds'
//! ratios; the others run once.

use std::fmt::Write as _;
use std::path::PathBuf;
use std::process::Command;

use clap::Parser;

use crate::baseline::{self, BaselineArgs, BaselineResult};
use crate::http::{self, HttpArgs, HttpResult, Protocol};
use crate::queue::{self, QueueArgs, QueueResult};
use crate::reads::{self, ReadsArgs, ReadsResult};
use crate::scale::{self, ScaleArgs};
use crate::steady::{self, SteadyArgs};
use crate::wakeup::{self, WakeupArgs, WakeupResult, mb};
use crate::{Machine, disturbed, measure, met};
use backvault_bench::{server, workspace_root};

#[derive(Parser)]
pub struct AllArgs {
    /// The `backvault` binary (default: target/release/backvault of this workspace).
    #[arg(long)]
    pub server_bin: Option<PathBuf>,
    /// Where to write the Markdown report too.
    #[arg(long)]
    pub markdown_out: Option<PathBuf>,
    /// Rounds of baseline, queue and http; ratios are judged on their median.
    #[arg(long, default_value_t = 3)]
    pub rounds: usize,
    /// Small sizes everywhere: checks that every benchmark runs, in a few minutes. Its
    /// figures are not the issue's.
    #[arg(long)]
    pub smoke: bool,
    /// Leave out the scheduler tick at 1,000,000 items (the `recovery` binary).
    #[arg(long)]
    pub skip_tick: bool,
}

/// What one round measured.
struct Round {
    baseline: BaselineResult,
    queue: QueueResult,
    http_v2: HttpResult,
    http_v1: HttpResult,
}

fn median(mut values: Vec<f64>) -> f64 {
    values.sort_by(f64::total_cmp);
    match values.len() {
        0 => f64::NAN,
        n if n % 2 == 1 => values[n / 2],
        n => (values[n / 2 - 1] + values[n / 2]) / 2.0,
    }
}

fn runs(values: &[f64], digits: usize) -> String {
    values
        .iter()
        .map(|v| format!("{v:.digits$}"))
        .collect::<Vec<_>>()
        .join(" · ")
}

pub async fn run(
    url: &str,
    attempts: usize,
    machine: Machine,
    args: AllArgs,
) -> anyhow::Result<String> {
    // Fail before the long runs if the server binary is missing.
    server::server_bin(args.server_bin.as_deref())?;
    let smoke = args.smoke;
    let b_args = if smoke {
        BaselineArgs {
            rows: 100_000,
            seconds: 5,
            ..BaselineArgs::default()
        }
    } else {
        BaselineArgs::default()
    };
    let q_args = if smoke {
        QueueArgs {
            jobs: 20_000,
            ..QueueArgs::default()
        }
    } else {
        QueueArgs::default()
    };
    let h_args = |protocol| HttpArgs {
        protocol,
        server_bin: args.server_bin.clone(),
        jobs: if smoke {
            20_000
        } else {
            HttpArgs::default().jobs
        },
        ..HttpArgs::default()
    };
    let mut rounds = Vec::new();
    for round in 1..=args.rounds.max(1) {
        eprintln!("all: round {round} of {}", args.rounds.max(1));
        let baseline = measure(
            "baseline",
            attempts,
            |r: &BaselineResult| r.cpu,
            || baseline::run(url, &b_args),
        )
        .await?;
        baseline::save(&baseline);
        println!("{}", baseline.summary());
        let base = Some(baseline.jobs_per_sec);
        let queue = measure(
            "queue",
            attempts,
            |r: &QueueResult| Some(r.cpu),
            || queue::run(url, &q_args),
        )
        .await?;
        println!("{}", queue.summary(base));
        let v2 = h_args(Protocol::V2);
        let http_v2 = measure(
            "http",
            attempts,
            |r: &HttpResult| Some(r.cpu),
            || http::run(url, &v2),
        )
        .await?;
        println!("{}", http_v2.summary(base));
        let v1 = h_args(Protocol::V1);
        let http_v1 = measure(
            "http v1",
            attempts,
            |r: &HttpResult| Some(r.cpu),
            || http::run(url, &v1),
        )
        .await?;
        println!("{}", http_v1.summary(base));
        rounds.push(Round {
            baseline,
            queue,
            http_v2,
            http_v1,
        });
    }
    let w_args = WakeupArgs {
        server_bin: args.server_bin.clone(),
        ..WakeupArgs::default()
    };
    let wakeup = measure(
        "wakeup",
        attempts,
        |r: &WakeupResult| Some(r.cpu),
        || wakeup::run(url, &w_args),
    )
    .await?;
    println!("{}", wakeup.summary());
    let r_args = ReadsArgs {
        server_bin: args.server_bin.clone(),
        rounds: args.rounds.max(1),
        seconds: if smoke {
            2
        } else {
            ReadsArgs::default().seconds
        },
        ..ReadsArgs::default()
    };
    let reads = measure("reads", attempts, ReadsResult::cpu, || {
        reads::run(url, &r_args)
    })
    .await?;
    println!("{}", reads.summary());
    let st_args = SteadyArgs {
        server_bin: args.server_bin.clone(),
        seconds: if smoke {
            40
        } else {
            SteadyArgs::default().seconds
        },
        snapshot_at_seconds: if smoke {
            10
        } else {
            SteadyArgs::default().snapshot_at_seconds
        },
        snapshot_hold_seconds: if smoke {
            10
        } else {
            SteadyArgs::default().snapshot_hold_seconds
        },
        probe_jobs: if smoke {
            5_000
        } else {
            SteadyArgs::default().probe_jobs
        },
        ..SteadyArgs::default()
    };
    backvault_bench::sys::wait_until_quiet().await;
    let steady = steady::run(url, &st_args).await?;
    println!("{}{}", steady.summary(), disturbed(Some(steady.cpu)));
    let s_args = if smoke {
        ScaleArgs {
            server_bin: args.server_bin.clone(),
            items: 20_000,
            vms: 400,
            jobs: 200_000,
            rpo_vault_items: 5_000,
            seconds: 5,
            ..ScaleArgs::default()
        }
    } else {
        ScaleArgs {
            server_bin: args.server_bin.clone(),
            ..ScaleArgs::default()
        }
    };
    backvault_bench::sys::wait_until_quiet().await;
    let scale = scale::run(url, &s_args).await?;
    println!("{}", scale.summary());
    let tick = if args.skip_tick {
        None
    } else {
        Some(tick(url, smoke)?)
    };
    let mut md = report_rounds(&machine, &rounds);
    md.push_str("### API reads against a bare axum + sqlx server\n\n");
    md.push_str(&reads.markdown());
    md.push('\n');
    md.push_str(&report_wakeup(&wakeup));
    md.push_str("### Steady run with a held snapshot\n\n");
    md.push_str(&steady.markdown());
    md.push('\n');
    md.push_str("### Reads at scale\n\n");
    md.push_str(&scale.markdown());
    md.push('\n');
    if let Some(tick) = tick {
        md.push_str(&tick);
    }
    let out = args
        .markdown_out
        .unwrap_or_else(|| workspace_root().join("target/backvault-bench/report.md"));
    if let Some(dir) = out.parent() {
        let _ = std::fs::create_dir_all(dir);
    }
    std::fs::write(&out, &md)?;
    eprintln!("report written to {}", out.display());
    Ok(md)
}

/// The scheduler tick at 1,000,000 items, by the `recovery` binary built beside this one;
/// its summary goes into the report as printed.
fn tick(url: &str, smoke: bool) -> anyhow::Result<String> {
    let bin = std::env::current_exe()?.with_file_name("recovery");
    let items = if smoke { "10000" } else { "1000000" };
    eprintln!("all: scheduler tick at {items} items ({})", bin.display());
    let output = Command::new(&bin)
        .args(["--database-url", url, "tick", "--items", items])
        .output()
        .map_err(|e| anyhow::anyhow!("running {}: {e}", bin.display()))?;
    let stdout = String::from_utf8_lossy(&output.stdout);
    print!("{stdout}");
    if !output.status.success() {
        anyhow::bail!(
            "recovery tick failed: {}",
            String::from_utf8_lossy(&output.stderr)
        );
    }
    let mut s = String::new();
    let _ = writeln!(
        s,
        "\n### Scheduler tick at {items} items (`recovery tick --items {items}`)\n\nGoal: within 2× its lower bound.\n\n```text\n{}\n```",
        stdout.trim_end()
    );
    Ok(s)
}

fn report_rounds(m: &Machine, rounds: &[Round]) -> String {
    let mut s = String::new();
    let _ = writeln!(s, "## Results\n");
    let _ = writeln!(
        s,
        "Run {} on {} cores (`nproc` = {}, {}), Linux {}, {}. Load generator, server and Postgres share the machine. {} rounds; each ratio is to the same round's baseline, and the goal is judged on the median ratio.\n",
        m.date,
        m.nproc,
        m.nproc,
        m.cpu_model,
        m.kernel,
        m.postgres,
        rounds.len()
    );
    let per = |f: &dyn Fn(&Round) -> f64| rounds.iter().map(f).collect::<Vec<f64>>();
    let base = per(&|r| r.baseline.jobs_per_sec);
    let queue = per(&|r| r.queue.jobs_per_sec);
    let queue_ratio = per(&|r| r.queue.jobs_per_sec / r.baseline.jobs_per_sec);
    let v2 = per(&|r| r.http_v2.jobs_per_sec);
    let v2_ratio = per(&|r| r.http_v2.jobs_per_sec / r.baseline.jobs_per_sec);
    let v1 = per(&|r| r.http_v1.jobs_per_sec);
    let v1_ratio = per(&|r| r.http_v1.jobs_per_sec / r.baseline.jobs_per_sec);
    let disturbances: String = rounds
        .iter()
        .flat_map(|r| {
            [
                disturbed(r.baseline.cpu),
                disturbed(Some(r.queue.cpu)),
                disturbed(Some(r.http_v2.cpu)),
                disturbed(Some(r.http_v1.cpu)),
            ]
        })
        .filter(|d| !d.is_empty())
        .collect::<Vec<_>>()
        .join("; ");
    let _ = writeln!(
        s,
        "| Benchmark | Runs (jobs/s) | Median | Ratios to baseline | Median ratio | Goal | Status |"
    );
    let _ = writeln!(s, "| --- | --- | --- | --- | --- | --- | --- |");
    let first = &rounds[0];
    let _ = writeln!(
        s,
        "| `baseline`: pgbench, naive single-row queue, {} clients, {} s | {} | **{:.0}** | — | — | reference | — |",
        first.baseline.clients,
        first.baseline.seconds,
        runs(&base, 0),
        median(base.clone())
    );
    let qm = median(queue_ratio.clone());
    let _ = writeln!(
        s,
        "| `queue`: store layer, {} jobs / {} VMs, {} workers | {} | **{:.0}** | {} | **{:.2}×** | ≥ 4× | {} |",
        first.queue.completed,
        first.queue.args.vms,
        first.queue.args.workers,
        runs(&queue, 0),
        median(queue),
        runs(&queue_ratio, 2),
        qm,
        met(qm >= 4.0)
    );
    let hm = median(v2_ratio.clone());
    let _ = writeln!(
        s,
        "| `http`: agent protocol v2 (completions ride on claims), {} agents, {} jobs, claim max {} | {} | **{:.0}** | {} | **{:.2}×** | ≥ 3× | {} |",
        first.http_v2.args.agents,
        first.http_v2.completed,
        first.http_v2.args.max_jobs,
        runs(&v2, 0),
        median(v2),
        runs(&v2_ratio, 2),
        hm,
        met(hm >= 3.0)
    );
    let _ = writeln!(
        s,
        "| `http --protocol v1`: one completion request per job (agents that predate v2) | {} | **{:.0}** | {} | **{:.2}×** | — | — |",
        runs(&v1, 0),
        median(v1),
        runs(&v1_ratio, 2),
        median(v1_ratio)
    );
    if !disturbances.is_empty() {
        let _ = writeln!(s, "\nDisturbed runs: {disturbances}.");
    }
    let _ = writeln!(s, "\n### Details per round\n");
    for (i, r) in rounds.iter().enumerate() {
        let _ = writeln!(s, "Round {}:\n", i + 1);
        let _ = writeln!(s, "- {}", r.baseline.summary());
        let _ = writeln!(
            s,
            "- {}; the backlog was enqueued at {:.0} jobs/s (not part of the result)",
            r.queue.summary(Some(r.baseline.jobs_per_sec)),
            r.queue.enqueue_jobs_per_sec
        );
        for h in [&r.http_v2, &r.http_v1] {
            let _ = writeln!(
                s,
                "- {}; server peak RSS {}{}",
                h.summary(Some(r.baseline.jobs_per_sec)),
                mb(h.server_peak_rss),
                h.first_error
                    .as_ref()
                    .map(|e| format!("; first error: {e}"))
                    .unwrap_or_default()
            );
        }
        let _ = writeln!(s);
    }
    s
}

fn report_wakeup(w: &WakeupResult) -> String {
    let rss_mb = w.peak_rss.map(|r| r as f64 / 1024.0 / 1024.0);
    let mut s = String::new();
    let _ = writeln!(s, "### Long-poll wake-up and memory\n");
    let _ = writeln!(s, "| Benchmark | Result | Goal | Status |");
    let _ = writeln!(s, "| --- | --- | --- | --- |");
    let _ = writeln!(
        s,
        "| `wakeup`: enqueue commit → claim response, {} waiting agents, {} jobs at {:.0}/s | p50 {:.1} ms, p95 {:.1} ms, **p99 {:.1} ms**, max {:.1} ms | p99 < 100 ms | {}{} |",
        w.waiting_before,
        w.args.jobs,
        w.achieved_rate,
        w.p50_ms,
        w.p95_ms,
        w.p99_ms,
        w.max_ms,
        met(w.p99_ms < 100.0 && w.missing == 0),
        disturbed(Some(w.cpu))
    );
    let _ = writeln!(
        s,
        "| `wakeup`: server peak RSS (`VmHWM`) with {} agents | **{}** | < 150 MB | {} |\n",
        w.args.agents,
        mb(w.peak_rss),
        met(rss_mb.is_some_and(|r| r < 150.0))
    );
    let _ = writeln!(
        s,
        "- {}; {} jobs measured, mean {:.1} ms{}\n",
        w.summary(),
        w.measured,
        w.mean_ms,
        w.first_error
            .as_ref()
            .map(|e| format!("; first error: {e}"))
            .unwrap_or_default()
    );
    s
}

#[cfg(test)]
mod tests {
    use super::median;

    #[test]
    fn median_of_odd_and_even_counts() {
        assert_eq!(median(vec![3.0, 1.0, 2.0]), 2.0);
        assert_eq!(median(vec![4.0, 1.0, 3.0, 2.0]), 2.5);
        assert!(median(Vec::new()).is_nan());
    }
}
