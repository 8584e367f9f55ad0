//! Coalesces concurrent requests into shared statements: while one batch runs, the next
//! accumulates, so a busy server does one transaction for many agents' claims or
//! completions instead of one each (group commit).

use std::future::Future;
use std::ops::Range;
use std::panic::AssertUnwindSafe;
use std::pin::Pin;
use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};

use futures_util::FutureExt;
use tokio::sync::{Mutex, mpsc, oneshot};

use crate::error::{Error, ErrorKind, Result};
use crate::metrics::{Metrics, TaskLabels};

type Envelope<Req, Resp> = (Req, oneshot::Sender<Result<Resp>>);

/// One run of a batch's shared statement: `Err` when the statement failed as a whole,
/// else one result per request, in order.
pub type BatchRun<'a, Resp> = Pin<Box<dyn Future<Output = Result<Vec<Result<Resp>>>> + Send + 'a>>;

pub struct Batcher<Req, Resp> {
    tx: mpsc::Sender<Envelope<Req, Resp>>,
    live_workers: Arc<AtomicUsize>,
}

impl<Req, Resp> Clone for Batcher<Req, Resp> {
    fn clone(&self) -> Self {
        Self {
            tx: self.tx.clone(),
            live_workers: self.live_workers.clone(),
        }
    }
}

/// What a batcher is called and how it names a request in its logs.
pub struct BatcherSpec<Req> {
    pub name: &'static str,
    pub workers: usize,
    pub max_batch: usize,
    pub describe: fn(&Req) -> String,
}

/// Counts a worker out when it ends, however it ends.
struct LiveWorker(Arc<AtomicUsize>);

impl Drop for LiveWorker {
    fn drop(&mut self) {
        self.0.fetch_sub(1, Ordering::SeqCst);
    }
}

impl<Req: Send + Sync + 'static, Resp: Send + 'static> Batcher<Req, Resp> {
    /// `run` executes a batch's shared statement. When it fails as a whole (or panics),
    /// the batch is split in halves and each half run again, down to the single request
    /// that fails: only that request gets the error, the others commit. A database that is
    /// unavailable fails the whole batch at once, since splitting would only wait longer.
    pub fn spawn<F>(spec: BatcherSpec<Req>, metrics: Arc<Metrics>, run: F) -> Self
    where
        F: for<'a> Fn(&'a [Req]) -> BatchRun<'a, Resp> + Send + Sync + 'static,
    {
        let capacity = spec
            .max_batch
            .saturating_mul(spec.workers)
            .saturating_mul(4)
            .max(1);
        let (tx, rx) = mpsc::channel::<Envelope<Req, Resp>>(capacity);
        let rx = Arc::new(Mutex::new(rx));
        let run = Arc::new(run);
        let spec = Arc::new(spec);
        let live_workers = Arc::new(AtomicUsize::new(0));
        for _ in 0..spec.workers {
            let rx = rx.clone();
            let run = run.clone();
            let spec = spec.clone();
            let metrics = metrics.clone();
            live_workers.fetch_add(1, Ordering::SeqCst);
            let live = LiveWorker(live_workers.clone());
            tokio::spawn(async move {
                let _live = live;
                loop {
                    let mut batch = Vec::with_capacity(spec.max_batch);
                    {
                        let mut rx = rx.lock().await;
                        match rx.recv().await {
                            Some(first) => batch.push(first),
                            None => return,
                        }
                        while batch.len() < spec.max_batch {
                            match rx.try_recv() {
                                Ok(next) => batch.push(next),
                                Err(_) => break,
                            }
                        }
                    }
                    let (requests, replies): (Vec<_>, Vec<_>) = batch.into_iter().unzip();
                    let results = settle(&spec, &metrics, run.as_ref(), &requests).await;
                    for (reply, result) in replies.into_iter().zip(results) {
                        let _ = reply.send(result);
                    }
                }
            });
        }
        Self { tx, live_workers }
    }

    /// False once every worker has ended; `/readyz` reports it.
    pub fn is_running(&self) -> bool {
        self.live_workers.load(Ordering::SeqCst) > 0 && !self.tx.is_closed()
    }

    pub async fn call(&self, request: Req) -> Result<Resp> {
        let (reply, response) = oneshot::channel();
        self.tx
            .send((request, reply))
            .await
            .map_err(|_| Error::internal("batcher stopped"))?;
        response
            .await
            .map_err(|_| Error::internal("batch dropped the request"))?
    }
}

/// The text of a caught panic.
pub fn panic_message(panic: &(dyn std::any::Any + Send)) -> String {
    panic
        .downcast_ref::<&str>()
        .map(|s| (*s).to_owned())
        .or_else(|| panic.downcast_ref::<String>().cloned())
        .unwrap_or_else(|| "a panic without a message".to_owned())
}

/// Runs `requests` through `run`, bisecting failed runs until each failure is pinned on
/// the request that causes it. Never panics: a panic in `run` counts as a failure.
async fn settle<Req, Resp, F>(
    spec: &BatcherSpec<Req>,
    metrics: &Metrics,
    run: &F,
    requests: &[Req],
) -> Vec<Result<Resp>>
where
    F: for<'a> Fn(&'a [Req]) -> BatchRun<'a, Resp>,
{
    let labels = TaskLabels { task: spec.name };
    let mut results: Vec<Option<Result<Resp>>> = requests.iter().map(|_| None).collect();
    let mut pending: Vec<Range<usize>> = Vec::with_capacity(16);
    pending.push(0..requests.len());
    while let Some(range) = pending.pop() {
        let slice = &requests[range.clone()];
        let outcome = match std::panic::catch_unwind(AssertUnwindSafe(|| run(slice))) {
            Ok(future) => AssertUnwindSafe(future).catch_unwind().await,
            Err(panic) => Err(panic),
        };
        let failure = match outcome {
            Ok(Ok(answers)) if answers.len() == slice.len() => {
                for (slot, answer) in results[range].iter_mut().zip(answers) {
                    *slot = Some(answer);
                }
                continue;
            }
            Ok(Ok(_)) => Error::internal(format!(
                "batcher {} answered a different number of requests than it got",
                spec.name
            )),
            Ok(Err(e)) => e,
            Err(panic) => {
                let message = panic_message(panic.as_ref());
                if slice.len() == 1 {
                    metrics.task_panics.get_or_create(&labels).inc();
                    tracing::error!(
                        batcher = spec.name,
                        request = %(spec.describe)(&slice[0]),
                        panic = %message,
                        "a request panicked in a shared batch; it alone fails"
                    );
                }
                Error::internal(format!("the request could not be processed ({message})"))
            }
        };
        if slice.len() == 1 || failure.kind == ErrorKind::Unavailable {
            if slice.len() == 1 && failure.kind == ErrorKind::Internal {
                tracing::warn!(
                    batcher = spec.name,
                    request = %(spec.describe)(&slice[0]),
                    error = %failure,
                    "a request failed in a shared batch; it alone fails"
                );
            }
            for slot in &mut results[range] {
                *slot = Some(Err(failure.for_each_request()));
            }
            continue;
        }
        metrics.batch_splits.get_or_create(&labels).inc();
        // slice.len() >= 2 here, so both halves are non-empty.
        let middle = range.start.saturating_add(slice.len().div_ceil(2));
        pending.push(middle..range.end);
        pending.push(range.start..middle);
    }
    results
        .into_iter()
        .map(|r| r.unwrap_or_else(|| Err(Error::internal("a batched request got no answer"))))
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn spec(workers: usize) -> BatcherSpec<u32> {
        BatcherSpec {
            name: "test",
            workers,
            max_batch: 64,
            describe: |r| format!("request {r}"),
        }
    }

    /// A statement over `reqs` that fails as a whole when it holds a 13, panics when it
    /// holds a 666, and reports the database down when it holds a 503.
    fn fragile(reqs: &[u32]) -> BatchRun<'_, u32> {
        Box::pin(async move {
            tokio::time::sleep(std::time::Duration::from_millis(5)).await;
            if reqs.contains(&666) {
                panic!("poisoned request");
            }
            if reqs.contains(&503) {
                return Err(Error::new(
                    ErrorKind::Unavailable,
                    "database_unavailable",
                    "down",
                ));
            }
            if reqs.contains(&13) {
                return Err(Error::internal("statement failed"));
            }
            Ok(reqs.iter().map(|r| Ok(r + 1)).collect())
        })
    }

    async fn call_all(batcher: &Batcher<u32, u32>, requests: &[u32]) -> Vec<Result<u32>> {
        let calls: Vec<_> = requests
            .iter()
            .map(|&r| {
                let b = batcher.clone();
                tokio::spawn(async move { b.call(r).await })
            })
            .collect();
        let mut out = Vec::new();
        for c in calls {
            out.push(c.await.unwrap());
        }
        out
    }

    #[tokio::test]
    async fn a_failing_request_fails_alone_and_the_rest_of_its_batch_commits() {
        let metrics = Arc::new(Metrics::default());
        let batcher = Batcher::spawn(spec(1), metrics.clone(), fragile);
        let requests: Vec<u32> = (0..40).chain([13, 666]).chain(40..80).collect();
        let results = call_all(&batcher, &requests).await;
        for (r, result) in requests.iter().zip(&results) {
            match r {
                13 => assert_eq!(result.as_ref().unwrap_err().code, "internal"),
                666 => assert!(
                    result
                        .as_ref()
                        .unwrap_err()
                        .to_string()
                        .contains("poisoned")
                ),
                _ => assert_eq!(result.as_ref().unwrap(), &(r + 1)),
            }
        }
        let labels = TaskLabels { task: "test" };
        assert!(metrics.task_panics.get_or_create(&labels).get() >= 1);
        assert!(batcher.is_running(), "the worker survived the panic");
        // The batcher still serves after the panic.
        assert_eq!(batcher.call(7).await.unwrap(), 8);
    }

    #[tokio::test]
    async fn an_unavailable_database_fails_the_batch_without_splitting() {
        static RUNS: AtomicUsize = AtomicUsize::new(0);
        fn counted(reqs: &[u32]) -> BatchRun<'_, u32> {
            RUNS.fetch_add(1, Ordering::SeqCst);
            fragile(reqs)
        }
        let metrics = Metrics::default();
        let results = settle(&spec(1), &metrics, &counted, &[1, 503, 2, 3]).await;
        assert_eq!(RUNS.load(Ordering::SeqCst), 1, "no split");
        assert!(
            results
                .iter()
                .all(|r| r.as_ref().unwrap_err().code == "database_unavailable")
        );
    }

    #[tokio::test]
    async fn bisection_runs_logarithmically_many_statements_for_one_bad_request() {
        static RUNS: AtomicUsize = AtomicUsize::new(0);
        fn counted(reqs: &[u32]) -> BatchRun<'_, u32> {
            RUNS.fetch_add(1, Ordering::SeqCst);
            fragile(reqs)
        }
        let requests: Vec<u32> = (100..356).chain([13]).collect();
        let results = settle(&spec(1), &Metrics::default(), &counted, &requests).await;
        assert_eq!(results.iter().filter(|r| r.is_err()).count(), 1);
        // 257 requests: two runs per level of the bisection (nine levels) and the first.
        let runs = RUNS.load(Ordering::SeqCst);
        assert!(runs <= 2 * 9 + 1, "{runs} runs");
    }
}
