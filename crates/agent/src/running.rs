//! The jobs this agent is working on: their leases and progress, for heartbeats, and a way
//! to tell each one to stop.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};

use backvault_domain::agent::JobProgress;
use backvault_domain::agent::protocol::JobLease;
use tokio::sync::watch;
use uuid::Uuid;

/// Why a job must stop before it is done.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Stop {
    /// Another agent (or a later attempt) holds the job now: report nothing.
    Lost,
    /// A user cancelled it: report it failed with `JobCancelled`.
    Cancelled,
    /// The agent is exiting and the job outlasted the grace period: hand it back.
    Shutdown,
}

struct Entry {
    lease: i64,
    progress: Option<JobProgress>,
    stop: watch::Sender<Option<Stop>>,
    /// The job's outcome is decided and on its way to the server: nothing stops it now.
    reporting: bool,
}

#[derive(Default)]
pub struct Running {
    jobs: Mutex<HashMap<Uuid, Entry>>,
}

/// Keeps a job registered until dropped, even if its task panics.
pub struct Registration {
    running: Arc<Running>,
    job_id: Uuid,
    stop: watch::Receiver<Option<Stop>>,
}

impl Running {
    pub fn start(self: &Arc<Self>, job_id: Uuid, lease: i64) -> Registration {
        let (stop, receiver) = watch::channel(None);
        let entry = Entry {
            lease,
            progress: None,
            stop,
            reporting: false,
        };
        self.jobs.lock().expect("running").insert(job_id, entry);
        Registration {
            running: Arc::clone(self),
            job_id,
            stop: receiver,
        }
    }

    /// The lease of every running job, for the agent heartbeat.
    pub fn leases(&self) -> Vec<JobLease> {
        let jobs = self.jobs.lock().expect("running");
        jobs.iter()
            .map(|(job_id, entry)| JobLease {
                job_id: *job_id,
                lease: entry.lease,
                progress: entry.progress.clone(),
            })
            .collect()
    }

    pub fn progress(&self, job_id: Uuid) -> Option<JobProgress> {
        let jobs = self.jobs.lock().expect("running");
        jobs.get(&job_id).and_then(|entry| entry.progress.clone())
    }

    pub fn set_progress(&self, job_id: Uuid, progress: JobProgress) {
        if let Some(entry) = self.jobs.lock().expect("running").get_mut(&job_id) {
            entry.progress = Some(progress);
        }
    }

    /// A lost lease overrides any earlier reason: nobody wants a report from us any more.
    /// Otherwise the first reason wins. Returns whether the job is still at work, so that
    /// `why` applies to it: false once it is reporting its outcome or gone.
    pub fn stop(&self, job_id: Uuid, why: Stop) -> bool {
        let jobs = self.jobs.lock().expect("running");
        let Some(entry) = jobs.get(&job_id).filter(|entry| !entry.reporting) else {
            return false;
        };
        entry.stop.send_if_modified(|current| {
            let replace = current.is_none() || why == Stop::Lost && *current != Some(why);
            if replace {
                *current = Some(why);
            }
            replace
        });
        true
    }

    pub fn stop_all(&self, why: Stop) {
        let ids: Vec<Uuid> = self.jobs.lock().expect("running").keys().copied().collect();
        for job_id in ids {
            self.stop(job_id, why);
        }
    }
}

impl Registration {
    /// The job's outcome is decided: from now on its lease ends with its report, whatever
    /// a heartbeat answered while the report was under way.
    pub fn reporting(&self) {
        if let Some(entry) = self
            .running
            .jobs
            .lock()
            .expect("running")
            .get_mut(&self.job_id)
        {
            entry.reporting = true;
        }
    }

    /// Resolves once the job must stop, with why.
    pub async fn stopped(&mut self) -> Stop {
        let why = self.stop.wait_for(Option::is_some).await.map(|why| *why);
        match why {
            Ok(why) => why.expect("waited for Some"),
            // The sender lives as long as this registration; never happens.
            Err(_) => std::future::pending().await,
        }
    }
}

impl Drop for Registration {
    fn drop(&mut self) {
        self.running
            .jobs
            .lock()
            .expect("running")
            .remove(&self.job_id);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn percent(p: u8) -> JobProgress {
        JobProgress {
            percent: Some(p),
            message: None,
        }
    }

    #[tokio::test]
    async fn tracks_leases_and_stop_reasons() {
        let running = Arc::new(Running::default());
        let (a, b) = (Uuid::new_v4(), Uuid::new_v4());
        let mut job_a = running.start(a, 7);
        let job_b = running.start(b, 9);
        running.set_progress(a, percent(50));
        let mut leases = running.leases();
        leases.sort_by_key(|l| l.lease);
        assert_eq!(leases.len(), 2);
        assert_eq!(leases[0].progress, Some(percent(50)));

        running.stop(a, Stop::Cancelled);
        running.stop(a, Stop::Shutdown);
        assert_eq!(job_a.stopped().await, Stop::Cancelled);
        running.stop(a, Stop::Lost);
        assert_eq!(job_a.stopped().await, Stop::Lost);

        drop(job_b);
        assert_eq!(running.leases().len(), 1);
        assert!(!running.stop(b, Stop::Lost), "b is gone");
    }

    #[tokio::test]
    async fn a_reporting_job_is_not_stopped() {
        let running = Arc::new(Running::default());
        let id = Uuid::new_v4();
        let mut job = running.start(id, 1);
        assert!(running.stop(id, Stop::Cancelled));
        assert_eq!(job.stopped().await, Stop::Cancelled);

        job.reporting();
        assert!(!running.stop(id, Stop::Lost));
        assert_eq!(job.stopped().await, Stop::Cancelled, "unchanged");
        assert_eq!(
            running.leases().len(),
            1,
            "its lease is kept alive meanwhile"
        );
    }
}
