//! Agents' reports (their heartbeats) are written in batches: a report
//! waits until a transaction holding it has committed — durable as before
//! — but one commit carries every report that arrived while the previous
//! one was being written. With thousands of agents a commit (an fsync) per
//! report was the server's limit (BENCHMARKS.md, scale).

use std::sync::Arc;

use drover_store::{Observations, Store, StoreError};
use tokio::sync::{mpsc, oneshot};

/// A batch that takes this long is logged.
const SLOW: std::time::Duration = std::time::Duration::from_millis(500);

/// Reports taken into one transaction at most.
const MAX_BATCH: usize = 1024;

type Done = oneshot::Sender<Result<(), StoreError>>;

/// The writer's inbox.
#[derive(Clone)]
pub struct Heartbeats {
    tx: mpsc::UnboundedSender<(Observations, Done)>,
}

impl Heartbeats {
    /// Starts the writer task (it ends when every sender is gone).
    /// `written` is called after a batch that observed some instance (a
    /// batch of bare heartbeats changes nothing the engine plans with but
    /// leases, which its own ticks watch).
    pub fn spawn(store: Arc<dyn Store>, written: impl Fn() + Send + 'static) -> Heartbeats {
        let (tx, mut rx) = mpsc::unbounded_channel::<(Observations, Done)>();
        tokio::spawn(async move {
            let mut batch = Vec::new();
            while let Some(first) = rx.recv().await {
                batch.push(first);
                while batch.len() < MAX_BATCH {
                    match rx.try_recv() {
                        Ok(more) => batch.push(more),
                        Err(_) => break,
                    }
                }
                let (items, dones): (Vec<Observations>, Vec<Done>) = batch.drain(..).unzip();
                let observed = items.iter().any(|o| !o.observed.is_empty());
                let started = std::time::Instant::now();
                let result = store.record_observations_batch(&items).await;
                let took = started.elapsed();
                if took >= SLOW {
                    tracing::warn!(
                        reports = items.len(),
                        took_ms = took.as_millis() as u64,
                        "writing agents' reports is slow (the store's disk?)"
                    );
                }
                match result {
                    Ok(results) => {
                        for (done, r) in dones.into_iter().zip(results) {
                            let _ = done.send(r);
                        }
                    }
                    Err(e) => {
                        for done in dones {
                            let _ = done.send(Err(StoreError::Db(e.to_string())));
                        }
                    }
                }
                if observed {
                    written();
                }
            }
        });
        Heartbeats { tx }
    }

    /// Records one report; returns once it is committed.
    pub async fn record(&self, o: Observations) -> Result<(), StoreError> {
        let (done, wait) = oneshot::channel();
        self.tx
            .send((o, done))
            .map_err(|_| StoreError::Db("the heartbeat writer has stopped".into()))?;
        wait.await
            .map_err(|_| StoreError::Db("the heartbeat writer has stopped".into()))?
    }
}
