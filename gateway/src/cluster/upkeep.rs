//! The maintenance loop of a clustered node: every `refresh_interval_ms` it refreshes the node's
//! registration (CAS on its instance), re-registers its presence when something may have been
//! lost (Redis came back or lost its data, this node's registration had expired, a write
//! failed, or every `SWEEP_INTERVAL`), re-sends kicks it owes, checks that its own bus channel
//! still has its subscriber, and updates the live-nodes gauge.

use std::sync::atomic::Ordering;
use std::sync::Arc;

use imgate_shared::KickReason;
use tokio::time::Instant;
use tracing::{debug, error, info, warn};

use super::envelope::Envelope;
use super::metrics::{gauge_nodes, Kind};
use super::nodes::NodeStatus;
use super::presence;
use super::{Inner, Redis};

impl Inner {
    /// Refreshes the registration every `refresh_interval`, re-registers presence when Redis
    /// came back (or lost its data, or periodically), checks this node's own subscription.
    pub(super) async fn maintain(self: Arc<Self>) {
        let Some(redis) = &self.redis else {
            return;
        };
        let mut tick = tokio::time::interval(self.refresh_interval);
        tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        let mut next_sweep = Instant::now() + presence::SWEEP_INTERVAL;
        loop {
            let resync = tokio::select! {
                _ = self.stop.cancelled() => break,
                _ = tick.tick() => false,
                _ = redis.bus.resync.notified() => true,
            };
            self.upkeep_round(redis, resync, &mut next_sweep).await;
        }
        // Stopped by `leave` (already cleaned up) or by dropping the last handle (a crash: the
        // registrations expire on their own).
        redis.bus.close().await;
    }

    async fn upkeep_round(&self, redis: &Redis, resync: bool, next_sweep: &mut Instant) {
        let _one = self.upkeep.lock().await;
        if resync || Instant::now() >= *next_sweep {
            // Kept until a re-registration succeeds.
            redis.presence.mark_dirty();
            *next_sweep = Instant::now() + presence::SWEEP_INTERVAL;
        }
        if self.left.load(Ordering::Acquire) || !redis.bus.commands_up() {
            return;
        }
        let live = match redis.nodes.refresh(self.local.connection_count()).await {
            Ok((status, tag_ok)) => {
                let live = match status {
                    NodeStatus::Refreshed => true,
                    NodeStatus::Created => {
                        warn!("this node's registration was missing (Redis lost its data, or this node stalled past node_ttl_ms); registering its connections again");
                        redis.presence.mark_dirty();
                        true
                    }
                    NodeStatus::Taken => {
                        error!(
                            node = %self.me.node_id,
                            "another node instance holds this node id; this node is not live in the cluster"
                        );
                        false
                    }
                };
                if !tag_ok && !self.tag_lost.swap(true, Ordering::Relaxed) {
                    error!(
                        tag = self.tag,
                        "another node holds this node's message-id tag; message ids may collide"
                    );
                } else if tag_ok {
                    self.tag_lost.store(false, Ordering::Relaxed);
                }
                live
            }
            Err(e) => {
                debug!(error = %crate::logging::esc(&e), "refreshing the registration failed");
                return;
            }
        };
        if live && redis.presence.is_dirty() {
            match redis.presence.restore(&*self.local).await {
                Ok(displaced) => {
                    for c in displaced {
                        info!(user = ?c.user, conn = c.conn_id, "another node registered this user and channel type while this connection's entry was missing; kicking it (duplicate login)");
                        self.local
                            .kick_connection(&c.user, c.conn_id, KickReason::DuplicateLogin);
                    }
                }
                Err(e) => {
                    warn!(error = %crate::logging::esc(&e), "re-registering presence failed; retrying")
                }
            }
        }
        self.send_owed_kicks().await;
        // Is this node still subscribed to its own channel? PUBLISH counts the subscribers.
        if redis.bus.subscriber_up() {
            let ping = Envelope::Ping {
                instance: self.me.instance.as_str().into(),
            }
            .encode();
            if let Ok(0) = self.publish(Kind::Ping, &self.keys.my_channel, ping).await {
                redis.bus.heal_subscriber().await;
            }
        }
        match redis.nodes.list().await {
            Ok(nodes) => gauge_nodes(nodes.len()),
            Err(e) => debug!(error = %crate::logging::esc(&e), "listing nodes failed"),
        }
    }
}
