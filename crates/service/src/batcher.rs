//! Coalesces concurrent requests into shared statements: while one batch runs, the next
//! accumulates, so a busy server does one transaction for many agents' claims or
//! completions instead of one each (group commit).

use std::future::Future;
use std::sync::Arc;

use tokio::sync::{Mutex, mpsc, oneshot};

use crate::error::{Error, Result};

type Envelope<Req, Resp> = (Req, oneshot::Sender<Result<Resp>>);

pub struct Batcher<Req, Resp> {
    tx: mpsc::Sender<Envelope<Req, Resp>>,
}

impl<Req, Resp> Clone for Batcher<Req, Resp> {
    fn clone(&self) -> Self {
        Self {
            tx: self.tx.clone(),
        }
    }
}

impl<Req: Send + 'static, Resp: Send + 'static> Batcher<Req, Resp> {
    /// `run` gets a batch and returns one result per request, in order. `workers` batches
    /// may run at once.
    pub fn spawn<F, Fut>(workers: usize, max_batch: usize, run: F) -> Self
    where
        F: Fn(Vec<Req>) -> Fut + Send + Sync + 'static,
        Fut: Future<Output = Vec<Result<Resp>>> + Send,
    {
        let (tx, rx) = mpsc::channel::<Envelope<Req, Resp>>(max_batch * workers * 4);
        let rx = Arc::new(Mutex::new(rx));
        let run = Arc::new(run);
        for _ in 0..workers {
            let rx = rx.clone();
            let run = run.clone();
            tokio::spawn(async move {
                loop {
                    let mut batch = Vec::with_capacity(max_batch);
                    {
                        let mut rx = rx.lock().await;
                        match rx.recv().await {
                            Some(first) => batch.push(first),
                            None => return,
                        }
                        while batch.len() < max_batch {
                            match rx.try_recv() {
                                Ok(next) => batch.push(next),
                                Err(_) => break,
                            }
                        }
                    }
                    let (requests, replies): (Vec<_>, Vec<_>) = batch.into_iter().unzip();
                    let results = run(requests).await;
                    for (reply, result) in replies.into_iter().zip(results) {
                        let _ = reply.send(result);
                    }
                }
            });
        }
        Self { tx }
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

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::atomic::{AtomicUsize, Ordering};

    #[tokio::test]
    async fn concurrent_calls_share_batches_and_get_their_own_answers() {
        let batches = Arc::new(AtomicUsize::new(0));
        let counter = batches.clone();
        let doubler = Batcher::spawn(1, 64, move |reqs: Vec<u32>| {
            counter.fetch_add(1, Ordering::SeqCst);
            async move {
                tokio::time::sleep(std::time::Duration::from_millis(20)).await;
                reqs.into_iter().map(|r| Ok(r * 2)).collect()
            }
        });
        let calls: Vec<_> = (0..100u32)
            .map(|i| {
                let d = doubler.clone();
                tokio::spawn(async move { (i, d.call(i).await.unwrap()) })
            })
            .collect();
        for c in calls {
            let (i, doubled) = c.await.unwrap();
            assert_eq!(doubled, i * 2);
        }
        assert!(
            batches.load(Ordering::SeqCst) < 100,
            "requests were coalesced"
        );
    }
}
