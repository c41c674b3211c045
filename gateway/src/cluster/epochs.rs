//! Stream epochs: what keeps positions unique when Redis loses its data.
//!
//! Stream counters live in Redis, and a message takes its position before its row is
//! committed. If Redis loses its data (a restart without persistence, `FLUSHALL`, a new empty
//! primary), a counter that is created again from the database's highest position would hand
//! out positions that messages still in flight (pushed, not yet committed) already have: two
//! messages at one position, and devices drop the second as a duplicate.
//!
//! So every counter belongs to an epoch. `{p}:epoch` holds the cluster's current epoch `E`, and
//! the position scripts refuse to run (`-2`) unless the caller names that epoch: a node learns
//! that Redis lost its data from the first refusal. A counter created in epoch `E` starts at or
//! above `E × 2^32`, so the positions of two epochs never meet. When `{p}:epoch` is missing, the
//! epoch comes from a durable source (the message store's `stream_epoch` row, [`EpochSource`]):
//! the current one while no stream counter was created in it (nodes starting a new cluster
//! together all find none), else the next one. It is set with `SET NX` so that every node adopts
//! the same one. A node records an epoch as used before it creates its first counter in it. The
//! first epoch of a new cluster is 0, so that positions start at 1 as before.
//!
//! Devices see the change as a jump in their stream's positions; the positions skipped are
//! holes like any other: waited for while a node still holds one for writing, then skipped.
//! (2^32 positions per user per epoch, and positions stay below 2^53, which JavaScript clients
//! can hold exactly, for 2^21 epochs.)

use std::future::Future;
use std::pin::Pin;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;

use fred::prelude::{Expiration, KeysInterface, SetOptions};
use tokio::time::timeout;

use super::{Cluster, ClusterError, Inner, Redis};

/// Positions of one epoch: epoch `E` starts above `E << EPOCH_SHIFT`.
pub const EPOCH_SHIFT: u32 = 32;

/// Metric names of stream epochs.
pub mod metric {
    /// The stream epoch this node uses (gauge).
    pub const EPOCH: &str = "imgate_stream_epoch";
    /// Stream epochs this node started, because Redis had lost its data (counter).
    pub const EPOCHS_STARTED: &str = "imgate_stream_epochs_started_total";
}

/// The durable record of stream epochs (the message store's).
pub trait EpochSource: Send + Sync + 'static {
    /// The epoch for a Redis that has none: the current one while no counter was created in
    /// it, else the next one.
    fn epoch_for_redis(&self) -> Pin<Box<dyn Future<Output = Result<u64, String>> + Send + '_>>;
    /// Records that counters are created in `epoch` (before the first one is).
    fn mark_used(
        &self,
        epoch: u64,
    ) -> Pin<Box<dyn Future<Output = Result<(), String>> + Send + '_>>;
}

impl EpochSource for crate::store::Store {
    fn epoch_for_redis(&self) -> Pin<Box<dyn Future<Output = Result<u64, String>> + Send + '_>> {
        Box::pin(async move {
            self.stream_epoch_for_redis()
                .await
                .map_err(|e| e.to_string())
        })
    }

    fn mark_used(
        &self,
        epoch: u64,
    ) -> Pin<Box<dyn Future<Output = Result<(), String>> + Send + '_>> {
        Box::pin(async move {
            self.mark_stream_epoch_used(epoch)
                .await
                .map_err(|e| e.to_string())
        })
    }
}

/// The epoch this node knows, shared with the batcher that builds position calls.
#[derive(Debug)]
pub(crate) struct EpochCell(AtomicU64);

/// Not known yet (before the first position call).
const UNKNOWN: u64 = u64::MAX;

impl Default for EpochCell {
    fn default() -> Self {
        EpochCell(AtomicU64::new(UNKNOWN))
    }
}

impl EpochCell {
    fn get(&self) -> u64 {
        self.0.load(Ordering::Acquire)
    }

    /// The epoch as the scripts' argument: its decimal value, or `''` when unknown (which
    /// never matches, so the first call learns the epoch).
    pub(crate) fn arg(&self) -> String {
        match self.get() {
            UNKNOWN => String::new(),
            e => e.to_string(),
        }
    }
}

impl Cluster {
    /// Sets where new stream epochs come from (the message store). Without one, a cluster
    /// whose Redis lost its data starts epoch 0 again, which is right only for tests that
    /// have no store.
    pub fn set_epoch_source(&self, source: Arc<dyn EpochSource>) {
        let _ = self.inner.epoch_source.set(source);
    }

    /// The stream epoch this node uses, if it knows it yet.
    pub fn stream_epoch(&self) -> Option<u64> {
        match self.inner.epoch.get() {
            UNKNOWN => None,
            e => Some(e),
        }
    }
}

impl Inner {
    /// Before the first stream counter of the current epoch is created on this node: records
    /// in the store that the epoch is used (so that a Redis found without an epoch later gets
    /// the next one, not this one again).
    pub(super) async fn mark_epoch_used(&self) -> Result<(), ClusterError> {
        let epoch = self.epoch.get();
        if epoch == UNKNOWN || self.epoch_marked.load(Ordering::Acquire) == epoch {
            return Ok(());
        }
        if let Some(source) = self.epoch_source.get() {
            source.mark_used(epoch).await.map_err(|e| {
                tracing::warn!(error = %e, "cannot record the stream epoch as used");
                ClusterError::Unavailable
            })?;
        }
        self.epoch_marked.store(epoch, Ordering::Release);
        Ok(())
    }

    /// After a position script refused the epoch `seen` (the one the call named): learns the
    /// current one from Redis, or starts the next one if Redis has none. Concurrent callers
    /// wait for the first; a caller whose epoch was replaced meanwhile returns at once.
    pub(super) async fn sync_epoch(&self, redis: &Redis, seen: String) -> Result<(), ClusterError> {
        let _one_at_a_time = self.epoch_sync.lock().await;
        if self.epoch.arg() != seen {
            return Ok(());
        }
        let client = &redis.bus.client;
        let key = &self.keys.epoch;
        let read = |what: &'static str| async move {
            let v: Option<String> = timeout(self.request_timeout, client.get(key.as_str()))
                .await
                .map_err(|_| ClusterError::Unavailable)?
                .map_err(ClusterError::redis)?;
            v.map(|v| {
                v.parse::<u64>()
                    .map_err(|_| ClusterError::Redis(format!("{what}: bad stream epoch {v:?}")))
            })
            .transpose()
        };
        let epoch = match read("reading").await? {
            Some(e) => e,
            None => {
                let next = match self.epoch_source.get() {
                    Some(source) => source.epoch_for_redis().await.map_err(|e| {
                        tracing::warn!(error = %e, "cannot start a stream epoch: the store failed");
                        ClusterError::Unavailable
                    })?,
                    None => 0,
                };
                let set: Option<String> = timeout(
                    self.request_timeout,
                    client.set(
                        key.as_str(),
                        next.to_string(),
                        None::<Expiration>,
                        Some(SetOptions::NX),
                        false,
                    ),
                )
                .await
                .map_err(|_| ClusterError::Unavailable)?
                .map_err(ClusterError::redis)?;
                if set.is_some() {
                    metrics::counter!(metric::EPOCHS_STARTED).increment(1);
                    if next > 0 {
                        tracing::warn!(
                            epoch = next,
                            "Redis has no stream epoch: it lost its data. Stream positions continue above epoch {next} x 2^32"
                        );
                    }
                    next
                } else {
                    // Another node set it first.
                    read("re-reading").await?.ok_or(ClusterError::Unavailable)?
                }
            }
        };
        self.epoch.0.store(epoch, Ordering::Release);
        metrics::gauge!(metric::EPOCH).set(epoch as f64);
        Ok(())
    }
}
