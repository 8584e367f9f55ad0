//! Finished jobs waiting to be told to the server. They ride on the next claim (version 2
//! of the claim), so that a busy agent makes one request per cycle rather than one per
//! job; the reporter sends those that no claim took within a short linger.

use std::collections::VecDeque;
use std::sync::Mutex;

use backvault_domain::agent::MAX_CLAIM_REPORTS;
use backvault_domain::agent::protocol::{ClaimV2Request, JobCompletion, JobFailure};
use serde::Serialize;
use tokio::sync::Notify;

use crate::running::Registration;

/// The reports of one request stay well under the server's 2 MiB body limit (a single
/// result may take up to 1 MiB).
const MAX_BATCH_BYTES: usize = 1536 * 1024;

pub enum Report {
    Completed(JobCompletion),
    Failed(JobFailure),
}

#[derive(Default)]
pub struct Outbox {
    /// Each report with its size as JSON, in the order the jobs finished, and its job's
    /// registration: the agent's heartbeats keep the lease alive until the report is
    /// answered.
    pending: Mutex<VecDeque<(Report, usize, Option<Registration>)>>,
    posted: Notify,
}

/// Reports taken from the outbox for one request.
#[derive(Default)]
pub struct Batch {
    pub completions: Vec<JobCompletion>,
    pub failures: Vec<JobFailure>,
    held: Vec<Registration>,
}

impl Batch {
    pub fn is_empty(&self) -> bool {
        self.completions.is_empty() && self.failures.is_empty()
    }

    /// The request, and the jobs' registrations to drop once it is answered.
    pub fn into_request(
        self,
        max_jobs: u32,
        wait_seconds: u32,
    ) -> (ClaimV2Request, Vec<Registration>) {
        let request = ClaimV2Request {
            max_jobs,
            wait_seconds,
            completions: self.completions,
            failures: self.failures,
        };
        (request, self.held)
    }
}

fn json_len(value: &impl Serialize) -> usize {
    serde_json::to_vec(value).map_or(0, |bytes| bytes.len())
}

impl Outbox {
    pub fn post(&self, report: Report, registration: Option<Registration>) {
        let size = match &report {
            Report::Completed(c) => json_len(c),
            Report::Failed(f) => json_len(f),
        };
        self.pending
            .lock()
            .expect("outbox")
            .push_back((report, size, registration));
        self.posted.notify_one();
    }

    /// Resolves once a report was posted since the last time it resolved.
    pub async fn posted(&self) {
        self.posted.notified().await;
    }

    /// The oldest reports that fit one request: at most [`MAX_CLAIM_REPORTS`], and at most
    /// [`MAX_BATCH_BYTES`] unless a single report is larger on its own.
    pub fn take_batch(&self) -> Batch {
        let mut pending = self.pending.lock().expect("outbox");
        let mut batch = Batch::default();
        let mut count = 0;
        let mut bytes = 0usize;
        while let Some((_, size, _)) = pending.front() {
            let full = count == MAX_CLAIM_REPORTS
                || (count > 0 && bytes.saturating_add(*size) > MAX_BATCH_BYTES);
            if full {
                break;
            }
            let Some((report, size, registration)) = pending.pop_front() else {
                break;
            };
            batch.held.extend(registration);
            count += 1;
            bytes = bytes.saturating_add(size);
            match report {
                Report::Completed(c) => batch.completions.push(c),
                Report::Failed(f) => batch.failures.push(f),
            }
        }
        batch
    }
}

#[cfg(test)]
mod tests {
    use backvault_domain::agent::JobResult;
    use uuid::Uuid;

    use super::*;

    fn completion() -> Report {
        Report::Completed(JobCompletion {
            job_id: Uuid::new_v4(),
            lease: 1,
            result: JobResult::ConfigureProtection {},
            warnings: Vec::new(),
        })
    }

    fn failure(message_len: usize) -> Report {
        Report::Failed(JobFailure {
            job_id: Uuid::new_v4(),
            lease: 1,
            code: "UserErrorX".into(),
            message: "m".repeat(message_len),
            retryable: true,
        })
    }

    #[test]
    fn a_batch_holds_at_most_the_protocol_s_count_in_finishing_order() {
        let outbox = Outbox::default();
        for _ in 0..MAX_CLAIM_REPORTS + 5 {
            outbox.post(completion(), None);
        }
        outbox.post(failure(10), None);
        let first = outbox.take_batch();
        assert_eq!(first.completions.len(), MAX_CLAIM_REPORTS);
        assert!(first.failures.is_empty());
        let second = outbox.take_batch();
        assert_eq!((second.completions.len(), second.failures.len()), (5, 1));
        assert!(outbox.take_batch().is_empty());
    }

    #[test]
    fn a_batch_stays_under_the_body_limit_but_a_large_report_still_goes() {
        let outbox = Outbox::default();
        let big = MAX_BATCH_BYTES / 2 + 1;
        for _ in 0..3 {
            outbox.post(failure(big), None);
        }
        outbox.post(failure(MAX_BATCH_BYTES * 2), None);
        assert_eq!(outbox.take_batch().failures.len(), 1);
        assert_eq!(outbox.take_batch().failures.len(), 1);
        assert_eq!(outbox.take_batch().failures.len(), 1);
        // Larger than a batch on its own: sent alone rather than never.
        assert_eq!(outbox.take_batch().failures.len(), 1);
        assert!(outbox.take_batch().is_empty());
    }
}
