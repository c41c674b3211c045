//! Per-user streams: every message to a user takes the next position (`seq`) in that user's
//! stream, cluster-wide. With Redis the counter is `{p}:seq:{user}`, advanced by a Lua script;
//! embedded, an in-process map. Either way a counter that does not exist yet (a new user, an
//! idle one whose key expired, a Redis that lost its data) starts from the highest position
//! the database holds, which the caller supplies.
//!
//! Positions are taken after the message has its place in the store's write queue, so a taken
//! position is written unless the node crashes before the commit (a "hole", which the
//! receiving connections skip after `delivery.hole_timeout_ms`).

use std::future::Future;
use std::time::Duration;

use fred::prelude::{KeysInterface, Value};
use tokio::time::timeout;

use super::{Cluster, ClusterError};

/// A counter's lifetime after its last use. A counter that expired restarts from the database,
/// which by then holds every position it handed out.
pub(crate) const SEQ_TTL: Duration = Duration::from_secs(30 * 24 * 3600);

/// Advances a stream counter. `KEYS[1]` the counter. `ARGV`: TTL in ms, the floor (highest
/// stored position) or `''` when the caller has not read it. Returns the new position, or -1
/// when the counter does not exist and no floor was given (the caller reads the floor and calls
/// again). Two nodes racing to create a counter both end up incrementing the same one.
pub(crate) const SEQ_NEXT: &str = r#"
if redis.call('EXISTS', KEYS[1]) == 0 then
  if ARGV[2] == '' then return -1 end
  redis.call('SET', KEYS[1], ARGV[2])
end
local v = redis.call('INCR', KEYS[1])
redis.call('PEXPIRE', KEYS[1], ARGV[1])
return v
"#;

impl Cluster {
    /// The next position in `user`'s stream. `floor` reads the highest stored position; it is
    /// called only when the user's counter does not exist.
    pub async fn next_seq<F, Fut>(&self, user: &str, floor: F) -> Result<u64, ClusterError>
    where
        F: FnOnce() -> Fut,
        Fut: Future<Output = Result<u64, ClusterError>>,
    {
        let inner = &self.inner;
        let Some(redis) = &inner.redis else {
            if let Some(mut seq) = inner.seqs.get_mut(user) {
                *seq += 1;
                return Ok(*seq);
            }
            let floor = floor().await?;
            let mut seq = inner.seqs.entry(user.into()).or_insert(floor);
            *seq += 1;
            return Ok(*seq);
        };
        if !redis.bus.commands_up() {
            tracing::debug!("stream counter: Redis commands are down");
            return Err(ClusterError::Unavailable);
        }
        let key = inner.keys.seq(user);
        let ttl = SEQ_TTL.as_millis().to_string();
        let run = |floor: String| {
            let (key, ttl) = (key.clone(), ttl.clone());
            async move {
                let reply = timeout(
                    inner.request_timeout,
                    redis
                        .scripts
                        .seq_next
                        .run(&redis.bus.client, vec![key], vec![ttl, floor]),
                )
                .await
                .map_err(|_| {
                    tracing::debug!("stream counter: no answer within the request timeout");
                    ClusterError::Unavailable
                })?
                .map_err(|e| {
                    tracing::debug!(error = %e, kind = ?e.kind(), "stream counter failed");
                    ClusterError::redis(e)
                })?;
                match reply {
                    Value::Integer(n) => Ok(n),
                    other => Err(ClusterError::Redis(format!(
                        "unexpected reply to the stream counter: {other:?}"
                    ))),
                }
            }
        };
        match run(String::new()).await? {
            -1 => {
                let floor = floor().await?;
                let n = run(floor.to_string()).await?;
                u64::try_from(n).map_err(|_| ClusterError::Redis("negative position".into()))
            }
            n => u64::try_from(n).map_err(|_| ClusterError::Redis("negative position".into())),
        }
    }

    /// Embedded: starts `user`'s counter at `floor` (the highest stored position) unless it
    /// exists, so that messages to a connected user never wait for the database. With Redis the
    /// counter starts from the database when first used.
    pub fn prime_seq(&self, user: &str, floor: u64) {
        if self.inner.redis.is_none() {
            self.inner.seqs.entry(user.into()).or_insert(floor);
        }
    }

    /// The last position handed out in `user`'s stream, if this node can tell (`None`: the
    /// counter does not exist; the database's highest position is then the head).
    pub async fn stream_head(&self, user: &str) -> Result<Option<u64>, ClusterError> {
        let inner = &self.inner;
        let Some(redis) = &inner.redis else {
            return Ok(inner.seqs.get(user).map(|s| *s));
        };
        if !redis.bus.commands_up() {
            return Err(ClusterError::Unavailable);
        }
        let head: Option<i64> = timeout(
            inner.request_timeout,
            redis.bus.client.get(inner.keys.seq(user)),
        )
        .await
        .map_err(|_| ClusterError::Unavailable)?
        .map_err(ClusterError::redis)?;
        Ok(head.and_then(|h| u64::try_from(h).ok()))
    }
}
