//! Per-user streams: every message to a user takes the next position (`seq`) in that user's
//! stream, cluster-wide. With Redis the counter is `{p}:seq:{user}`, advanced by a Lua script;
//! embedded, an in-process map. Either way a counter that does not exist yet (a new user, an
//! idle one whose key expired, a Redis that lost its data) starts from the highest position
//! the database holds, which the caller supplies.
//!
//! Positions are taken after the message has its place in the store's write queue, so a taken
//! position is written unless the write fails or the node crashes before the commit (a "hole",
//! which the receiving connections skip once no live node holds it: `holds.rs`).

use std::future::Future;
use std::sync::Arc;
use std::time::Duration;

use fred::prelude::{Client, KeysInterface, Value};
use tokio::time::timeout;

use super::batch::{Batcher, Limits};
use super::epochs::EpochCell;
use super::keys::Keys;
use super::scripts::Scripts;
use super::{Cluster, ClusterError};
use crate::config::RoutingMode;

/// A counter's lifetime after its last use. A counter that expired restarts from the database,
/// which by then holds every position it handed out.
pub(crate) const SEQ_TTL: Duration = Duration::from_secs(30 * 24 * 3600);

/// One message's request for a position.
pub(crate) struct Wanted {
    user: String,
    channel: Option<String>,
}

/// The answer of [`POSITIONS`](super::scripts::POSITIONS) for one message: `-1` or the position,
/// and the nodes holding the recipient (routed only).
type Found = Result<(i64, Vec<String>), ClusterError>;

pub(crate) type Positions = Batcher<Wanted, Found>;

/// Concurrent messages share one call of [`POSITIONS`](super::scripts::POSITIONS); a few calls
/// may be outstanding.
const POSITION_LIMITS: Limits = Limits {
    max_items: 128,
    max_weight: 128,
    in_flight: 2,
};

/// Starts the batching of position requests.
pub(crate) fn positions(
    client: Client,
    scripts: Arc<Scripts>,
    keys: Arc<Keys>,
    epoch: Arc<EpochCell>,
    routing: RoutingMode,
    stop: tokio_util::sync::CancellationToken,
) -> Positions {
    Batcher::spawn(
        POSITION_LIMITS,
        |_| 1,
        move |batch: Vec<Wanted>| {
            let n = batch.len();
            let mut key_list = Vec::with_capacity(2 * n);
            let mut args = Vec::with_capacity(5 + n);
            args.push(keys.node_prefix.clone());
            args.push(SEQ_TTL.as_millis().to_string());
            args.push(match routing {
                RoutingMode::Routed => "nodes".to_owned(),
                RoutingMode::Broadcast => String::new(),
            });
            args.push(keys.epoch.clone());
            args.push(epoch.arg());
            for w in batch {
                key_list.push(keys.seq(&w.user));
                key_list.push(keys.presence(&w.user));
                args.push(w.channel.unwrap_or_default());
            }
            let (client, scripts) = (client.clone(), scripts.clone());
            async move {
                let reply = scripts.positions.run(&client, key_list, args).await;
                let items = match reply {
                    Ok(Value::Array(items)) if items.len() == n => items,
                    Ok(other) => {
                        let e = ClusterError::Redis(format!(
                            "unexpected reply to the positions script: {other:?}"
                        ));
                        return vec![Err(e); n];
                    }
                    Err(e) => return vec![Err(ClusterError::redis(e)); n],
                };
                items.into_iter().map(found).collect()
            }
        },
        stop,
    )
}

fn found(item: Value) -> Found {
    let Value::Array(parts) = item else {
        return Err(ClusterError::Redis("a position is not an array".into()));
    };
    let mut parts = parts.into_iter();
    let seq = match parts.next() {
        Some(Value::Integer(n)) => n,
        other => return Err(ClusterError::Redis(format!("bad position: {other:?}"))),
    };
    Ok((seq, parts.filter_map(|v| v.as_string()).collect()))
}

/// A message's position in its recipient's stream, and where to deliver it on other nodes.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Position {
    pub seq: u64,
    pub route: Route,
}

/// The other nodes a message goes to, when they were read with its position (routed routing);
/// otherwise [`deliver_remote`](Cluster::deliver_remote) finds them.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Route(pub(super) Option<Vec<String>>);

impl Route {
    /// Not known yet: looked up at delivery.
    pub const UNKNOWN: Route = Route(None);

    /// To these nodes (no node: nobody else holds the user).
    pub fn to(nodes: &[&str]) -> Route {
        Route(Some(nodes.iter().map(|n| (*n).to_owned()).collect()))
    }
}

impl Cluster {
    /// The next position in `user`'s stream and, under routed routing, the other nodes holding
    /// `user` (of `channel`), read together (and with concurrent messages' in one Redis call).
    /// `floor` reads the highest stored position; it is called only when the counter does not
    /// exist.
    pub async fn next_position<F, Fut>(
        &self,
        user: &str,
        channel: Option<&str>,
        floor: F,
    ) -> Result<Position, ClusterError>
    where
        F: FnOnce() -> Fut,
        Fut: Future<Output = Result<u64, ClusterError>>,
    {
        let inner = &self.inner;
        let (Some(redis), Some(positions)) = (&inner.redis, &inner.positions) else {
            let seq = self.next_seq(user, floor).await?;
            return Ok(Position {
                seq,
                route: Route::UNKNOWN,
            });
        };
        if !redis.bus.commands_up() {
            return Err(ClusterError::Unavailable);
        }
        let call = || {
            let wanted = Wanted {
                user: user.to_owned(),
                channel: channel.map(str::to_owned),
            };
            let seen = inner.epoch.arg();
            async move {
                let found = timeout(inner.request_timeout, positions.call(wanted))
                    .await
                    .map_err(|_| {
                        tracing::debug!("stream position: no answer within the request timeout");
                        ClusterError::Unavailable
                    })?
                    .ok_or(ClusterError::Unavailable)??;
                Ok::<_, ClusterError>((found, seen))
            }
        };
        let ((mut seq, mut nodes), seen) = call().await?;
        if seq == -2 {
            // Not the current stream epoch (or not known yet): learn it, and ask again.
            inner.sync_epoch(redis, seen).await?;
            (seq, nodes) = call().await?.0;
            if seq == -2 {
                return Err(ClusterError::Unavailable);
            }
        }
        if seq < 0 {
            // A new (or expired) counter: start it from the database.
            let seq = self.next_seq(user, floor).await?;
            return Ok(Position {
                seq,
                route: Route::UNKNOWN,
            });
        }
        let route = match inner.routing {
            RoutingMode::Routed => {
                inner.metrics.lookups_route.increment(1);
                let me = &inner.me.node_id;
                Route(Some(nodes.into_iter().filter(|n| n != me).collect()))
            }
            RoutingMode::Broadcast => Route::UNKNOWN,
        };
        Ok(Position {
            seq: u64::try_from(seq).map_err(|_| ClusterError::Redis("negative position".into()))?,
            route,
        })
    }

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
        let keys = vec![inner.keys.seq(user), inner.keys.epoch.clone()];
        let ttl = SEQ_TTL.as_millis().to_string();
        let run = |floor: String| {
            let (keys, ttl, epoch) = (keys.clone(), ttl.clone(), inner.epoch.arg());
            async move {
                let reply = timeout(
                    inner.request_timeout,
                    redis
                        .scripts
                        .seq_next
                        .run(&redis.bus.client, keys, vec![ttl, floor, epoch]),
                )
                .await
                .map_err(|_| {
                    tracing::debug!("stream counter: no answer within the request timeout");
                    ClusterError::Unavailable
                })?
                .map_err(|e| {
                    tracing::debug!(error = %crate::logging::esc(&e), kind = ?e.kind(), "stream counter failed");
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
        // Each refusal of the epoch is followed by learning it; a second one in a row means
        // that the epoch is changing under us: give up for now.
        let mut floor = Some(floor);
        let mut arg = String::new();
        let mut refusals = 0;
        loop {
            if !arg.is_empty() {
                // The call may create the counter: the epoch must be recorded as used first.
                inner.mark_epoch_used().await?;
            }
            let seen = inner.epoch.arg();
            match run(arg.clone()).await? {
                -2 if refusals == 0 => {
                    refusals += 1;
                    inner.sync_epoch(redis, seen).await?;
                }
                -1 if arg.is_empty() => match floor.take() {
                    Some(read) => arg = read().await?.to_string(),
                    None => return Err(ClusterError::Unavailable),
                },
                n => {
                    return u64::try_from(n)
                        .map_err(|_| ClusterError::Redis(format!("bad position {n}")))
                }
            }
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
