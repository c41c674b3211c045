//! The node registry: each node's record `{p}:node:{id}` (JSON, TTL `node_ttl_ms`, refreshed every
//! `refresh_interval_ms` by a compare-and-set on the node instance), the `{p}:nodes` sorted set
//! that lists them, and the node's message-id tag `{p}:tag:{n}`. A record that stops being
//! refreshed expires: that is what "live" means for nodes and, through them, for presence.

use std::sync::Arc;
use std::sync::OnceLock;
use std::time::Duration;

use fred::prelude::{Client, Expiration, KeysInterface, SetOptions, Value};
use serde::Serialize;
use tokio::time::Instant;
use tracing::warn;

use super::keys::Keys;
use super::scripts::Scripts;
use super::{ClusterError, NodeInfo};
use crate::base::unix_millis;

/// Message-id tags are 10 bits.
const TAGS: u16 = 1024;

/// Who this node is.
pub(crate) struct Identity {
    pub node_id: String,
    /// Random per process: tells a restarted node from its predecessor.
    pub instance: String,
    pub client_addr: String,
    pub ws_url: String,
    pub started_at_ms: u64,
}

#[derive(Serialize)]
struct Record<'a> {
    id: &'a str,
    instance: &'a str,
    client_addr: &'a str,
    ws_url: &'a str,
    connections: usize,
    started_at_ms: u64,
    last_seen_ms: u64,
    #[serde(skip_serializing_if = "Option::is_none")]
    tag: Option<u16>,
}

/// What a refresh found.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum NodeStatus {
    /// The id is held by another live instance: nothing was written.
    Taken,
    Refreshed,
    /// The record was absent (first claim, Redis lost its data, or this node stalled past its TTL)
    /// and has been written again.
    Created,
}

pub(crate) struct NodeRegistry {
    client: Client,
    scripts: Arc<Scripts>,
    keys: Arc<Keys>,
    pub(crate) me: Arc<Identity>,
    ttl: Duration,
    tag: OnceLock<u16>,
}

impl NodeRegistry {
    pub(crate) fn new(
        client: Client,
        scripts: Arc<Scripts>,
        keys: Arc<Keys>,
        me: Arc<Identity>,
        ttl: Duration,
    ) -> Self {
        NodeRegistry {
            client,
            scripts,
            keys,
            me,
            ttl,
            tag: OnceLock::new(),
        }
    }

    /// Writes this node's record (and its tag, once claimed) unless another instance holds the
    /// id. Returns the record's status and whether the tag is still this node's.
    pub(crate) async fn refresh(
        &self,
        connections: usize,
    ) -> Result<(NodeStatus, bool), fred::error::Error> {
        let me = &self.me;
        let tag = self.tag.get().copied();
        let record = serde_json::to_string(&Record {
            id: &me.node_id,
            instance: &me.instance,
            client_addr: &me.client_addr,
            ws_url: &me.ws_url,
            connections,
            started_at_ms: me.started_at_ms,
            last_seen_ms: unix_millis(),
            tag,
        })
        .expect("a record always serialises");
        let mut keys = vec![self.keys.node(&me.node_id), self.keys.nodes.clone()];
        if let Some(t) = tag {
            keys.push(self.keys.tag(t));
        }
        let args = vec![
            record,
            me.instance.clone(),
            self.ttl.as_millis().to_string(),
            me.node_id.clone(),
            me.started_at_ms.to_string(),
            (self.ttl * 3).as_millis().to_string(),
        ];
        let reply = self
            .scripts
            .node_refresh
            .run(&self.client, keys, args)
            .await?;
        let (node, tag) = match reply {
            Value::Array(v) if v.len() == 2 => (v[0].as_i64(), v[1].as_i64()),
            _ => (None, None),
        };
        let status = match node {
            Some(0) => NodeStatus::Taken,
            Some(1) => NodeStatus::Refreshed,
            Some(2) => NodeStatus::Created,
            _ => {
                return Err(fred::error::Error::new(
                    fred::error::ErrorKind::Parse,
                    "unexpected reply from the node refresh script",
                ))
            }
        };
        Ok((status, tag != Some(0)))
    }

    /// Claims the node id, waiting for a predecessor's record to expire until `deadline`.
    pub(crate) async fn claim(
        &self,
        connections: usize,
        deadline: Instant,
    ) -> Result<(), ClusterError> {
        let mut warned = false;
        loop {
            let failure = match self.refresh(connections).await {
                Ok((NodeStatus::Taken, _)) => {
                    if !warned {
                        warn!(node = %self.me.node_id, "node id is held by another live node; waiting for its registration to expire");
                        warned = true;
                    }
                    ClusterError::NodeIdTaken(self.me.node_id.clone())
                }
                Ok(_) => return Ok(()),
                Err(e) => {
                    warn!(error = %crate::logging::esc(&e), "claiming the node id failed; retrying");
                    ClusterError::redis(e)
                }
            };
            if Instant::now() >= deadline {
                return Err(failure);
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    }

    /// Claims a message-id tag: `wanted` exactly (waiting for a predecessor's claim to expire until
    /// `deadline`), or the first free one from `derived` upward.
    pub(crate) async fn claim_tag(
        &self,
        wanted: Option<u16>,
        derived: u16,
        deadline: Instant,
    ) -> Result<u16, ClusterError> {
        if let Some(t) = wanted {
            loop {
                if self.try_tag(t).await? {
                    let _ = self.tag.set(t);
                    return Ok(t);
                }
                if Instant::now() >= deadline {
                    return Err(ClusterError::TagTaken(t));
                }
                tokio::time::sleep(Duration::from_millis(100)).await;
            }
        }
        for i in 0..TAGS {
            let t = (derived + i) % TAGS;
            if self.try_tag(t).await? {
                let _ = self.tag.set(t);
                return Ok(t);
            }
        }
        Err(ClusterError::NoFreeTag)
    }

    async fn try_tag(&self, t: u16) -> Result<bool, ClusterError> {
        let set: Option<String> = self
            .client
            .set(
                self.keys.tag(t),
                self.me.instance.as_str(),
                Some(Expiration::PX(self.ttl.as_millis() as i64)),
                Some(SetOptions::NX),
                false,
            )
            .await
            .map_err(ClusterError::redis)?;
        Ok(set.is_some())
    }

    /// The live nodes, in start order.
    pub(crate) async fn list(&self) -> Result<Vec<NodeInfo>, fred::error::Error> {
        let reply = self
            .scripts
            .nodes
            .run(
                &self.client,
                vec![self.keys.nodes.clone()],
                vec![self.keys.node_prefix.clone()],
            )
            .await?;
        let items = match reply {
            Value::Array(v) => v,
            _ => Vec::new(),
        };
        Ok(items
            .iter()
            .filter_map(|v| v.as_bytes())
            .filter_map(|b| match serde_json::from_slice(b) {
                Ok(n) => Some(n),
                Err(e) => {
                    warn!(error = %crate::logging::esc(&e), "undecodable node record");
                    None
                }
            })
            .collect())
    }

    /// Removes this node's record and tag (only this instance's).
    pub(crate) async fn leave(&self) -> Result<(), fred::error::Error> {
        let tag_key = match self.tag.get() {
            Some(t) => self.keys.tag(*t),
            None => format!("{}-no-tag", self.keys.node(&self.me.node_id)),
        };
        self.scripts
            .node_leave
            .run(
                &self.client,
                vec![
                    self.keys.node(&self.me.node_id),
                    self.keys.nodes.clone(),
                    tag_key,
                ],
                vec![self.me.instance.clone(), self.me.node_id.clone()],
            )
            .await
            .map(|_| ())
    }
}
