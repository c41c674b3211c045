//! The cluster presence table in Redis: one hash per user, `{p}:presence:{user}`, with one field
//! per connection (`{node instance}:{conn id}`, unique forever since instances are random per
//! process) whose value is the connection's JSON entry, plus one counter field per channel type
//! (`#gen:{channel}`) that numbers registrations. Entries are written at login and removed at
//! logout, never touched on client heartbeats; an entry is live while its node's registry entry
//! (same instance) is, so a dead node's entries vanish from every answer once its registry key
//! expires (and are deleted when met). Every hash has a TTL ([`KEY_TTL`]) that this node's
//! periodic re-registration keeps pushing out, so hashes orphaned by dead nodes do not pile up.

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use dashmap::DashMap;
use fred::prelude::{Client, HashesInterface, Value};
use futures_util::future::join_all;
use serde::{Deserialize, Serialize};

use super::keys::Keys;
use super::scripts::Scripts;
use super::{LocalConnection, LocalNode, PresenceEntry};
use crate::config::{ChannelSettings, DuplicateLoginPolicy};

/// TTL of a presence hash, pushed out by every write and by the periodic re-registration.
pub(crate) const KEY_TTL: Duration = Duration::from_secs(3600);
/// How often a node re-registers all its connections even when nothing went wrong: keeps the
/// hashes' TTL ahead and repairs whatever a lost message or command left inconsistent.
pub(crate) const SWEEP_INTERVAL: Duration = Duration::from_secs(600);
/// Connections per RESTORE script call.
const RESTORE_BATCH: usize = 256;

/// An entry as this node writes it; the script adds `generation` in front.
#[derive(Serialize)]
struct NewEntry<'a> {
    node_id: &'a str,
    node_instance: &'a str,
    conn_id: u64,
    user_id: &'a str,
    channel: &'a str,
    device_id: &'a str,
    transport: &'a str,
    connected_since_ms: u64,
}

/// An entry as stored.
#[derive(Debug, Clone, Deserialize)]
pub(crate) struct StoredEntry {
    pub generation: u64,
    pub node_id: String,
    pub node_instance: String,
    pub conn_id: u64,
    pub user_id: String,
    pub channel: String,
    pub device_id: String,
    pub transport: String,
    pub connected_since_ms: u64,
}

impl From<StoredEntry> for PresenceEntry {
    fn from(e: StoredEntry) -> Self {
        PresenceEntry {
            node_id: e.node_id,
            conn_id: e.conn_id,
            user_id: e.user_id,
            channel: e.channel,
            device_id: e.device_id,
            transport: e.transport,
            connected_since_ms: e.connected_since_ms,
        }
    }
}

/// What registering a connection did.
pub(crate) enum Registration {
    /// Registered with this generation; under `kick_old` these entries were displaced.
    Registered {
        generation: u64,
        displaced: Vec<StoredEntry>,
    },
    Rejected,
    /// The user holds `channels.max_connections_per_user` live connections already.
    TooMany,
}

pub(crate) fn policy_arg(p: DuplicateLoginPolicy) -> &'static str {
    match p {
        DuplicateLoginPolicy::KickOld => "kick_old",
        DuplicateLoginPolicy::RejectNew => "reject_new",
        DuplicateLoginPolicy::AllowMultiple => "allow_multiple",
    }
}

/// This node's side of the presence table.
pub(crate) struct Presence {
    client: Client,
    scripts: Arc<Scripts>,
    keys: Arc<Keys>,
    node_id: String,
    instance: String,
    channels: ChannelSettings,
    /// Connections this node has written (or owes) to the table: conn id → user.
    registered: DashMap<u64, String>,
    /// Removals that could not be sent; retried at the next re-registration.
    unregistered: Mutex<Vec<(String, u64)>>,
    /// Set when a write may be missing; the next maintenance tick re-registers everything.
    dirty: AtomicBool,
    /// One re-registration at a time.
    resync: tokio::sync::Mutex<()>,
}

impl Presence {
    pub(crate) fn new(
        client: Client,
        scripts: Arc<Scripts>,
        keys: Arc<Keys>,
        node_id: String,
        instance: String,
        channels: ChannelSettings,
    ) -> Self {
        Presence {
            client,
            scripts,
            keys,
            node_id,
            instance,
            channels,
            registered: DashMap::new(),
            unregistered: Mutex::new(Vec::new()),
            dirty: AtomicBool::new(false),
            resync: tokio::sync::Mutex::new(()),
        }
    }

    fn field(&self, conn_id: u64) -> String {
        format!("{}:{conn_id}", self.instance)
    }

    fn entry_json(&self, c: &LocalConnection) -> String {
        serde_json::to_string(&NewEntry {
            node_id: &self.node_id,
            node_instance: &self.instance,
            conn_id: c.conn_id,
            user_id: &c.user,
            channel: &c.channel,
            device_id: &c.device_id,
            transport: &c.transport,
            connected_since_ms: c.connected_since_ms,
        })
        .expect("an entry always serialises")
    }

    pub(crate) fn mark_dirty(&self) {
        self.dirty.store(true, Ordering::Release);
    }

    pub(crate) fn is_dirty(&self) -> bool {
        self.dirty.load(Ordering::Acquire)
    }

    /// Remembers `conn` as this node's without writing it (Redis is down): the next
    /// re-registration writes it.
    pub(crate) fn owe(&self, conn: &LocalConnection) {
        self.registered.insert(conn.conn_id, conn.user.clone());
        self.mark_dirty();
    }

    /// Runs the REGISTER script for `conn`.
    pub(crate) async fn register(
        &self,
        conn: &LocalConnection,
        policy: DuplicateLoginPolicy,
    ) -> Result<Registration, fred::error::Error> {
        let keys = vec![self.keys.presence(&conn.user)];
        let args = vec![
            self.keys.node_prefix.clone(),
            self.field(conn.conn_id),
            self.entry_json(conn),
            conn.channel.clone(),
            policy_arg(policy).to_owned(),
            KEY_TTL.as_millis().to_string(),
            self.instance.clone(),
            self.channels.max_connections_per_user.to_string(),
        ];
        let reply = self.scripts.register.run(&self.client, keys, args).await?;
        let mut items = into_array(reply).into_iter();
        let generation = items.next().and_then(|v| v.as_i64()).unwrap_or(0);
        if generation == -2 {
            return Ok(Registration::TooMany);
        }
        if generation < 0 {
            return Ok(Registration::Rejected);
        }
        self.registered.insert(conn.conn_id, conn.user.clone());
        let displaced = items.filter_map(|v| parse_entry(&v)).collect();
        Ok(Registration::Registered {
            generation: generation as u64,
            displaced,
        })
    }

    /// Removes `conn_id`'s entry; when it cannot be sent now it is retried later.
    pub(crate) async fn unregister(&self, user: &str, conn_id: u64, send: bool) {
        if self.registered.remove(&conn_id).is_none() {
            return; // never written (refused), or already removed
        }
        if !send || self.hdel(user, conn_id).await.is_err() {
            self.unregistered
                .lock()
                .expect("not poisoned")
                .push((user.to_owned(), conn_id));
            self.mark_dirty();
        }
    }

    async fn hdel(&self, user: &str, conn_id: u64) -> Result<(), fred::error::Error> {
        self.client
            .hdel::<i64, _, _>(self.keys.presence(user), self.field(conn_id))
            .await
            .map(|_| ())
    }

    /// The live entries of `user`.
    pub(crate) async fn entries(&self, user: &str) -> Result<Vec<StoredEntry>, fred::error::Error> {
        let reply = self
            .scripts
            .read
            .run(
                &self.client,
                vec![self.keys.presence(user)],
                vec![
                    self.keys.node_prefix.clone(),
                    String::new(),
                    "entries".into(),
                ],
            )
            .await?;
        Ok(into_array(reply).iter().filter_map(parse_entry).collect())
    }

    /// The ids of the live nodes holding a connection of `user` (of `channel` if set).
    pub(crate) async fn nodes_of(
        &self,
        user: &str,
        channel: Option<&str>,
    ) -> Result<Vec<String>, fred::error::Error> {
        let reply = self
            .scripts
            .read
            .run(
                &self.client,
                vec![self.keys.presence(user)],
                vec![
                    self.keys.node_prefix.clone(),
                    channel.unwrap_or("").to_owned(),
                    "nodes".into(),
                ],
            )
            .await?;
        Ok(into_array(reply)
            .into_iter()
            .filter_map(|v| v.as_string())
            .collect())
    }

    /// Re-registers every connection of this node that was registered (or owed), and sends the
    /// removals that failed. Returns the connections found displaced by a newer login, for the
    /// caller to kick.
    pub(crate) async fn restore(
        &self,
        local: &dyn LocalNode,
    ) -> Result<Vec<LocalConnection>, fred::error::Error> {
        let _one = self.resync.lock().await;
        self.dirty.store(false, Ordering::Release);
        let result = self.restore_locked(local).await;
        if result.is_err() {
            self.mark_dirty();
        }
        result
    }

    async fn restore_locked(
        &self,
        local: &dyn LocalNode,
    ) -> Result<Vec<LocalConnection>, fred::error::Error> {
        let owed = std::mem::take(&mut *self.unregistered.lock().expect("not poisoned"));
        let results = join_all(owed.iter().map(|(u, id)| self.hdel(u, *id))).await;
        let mut failed = false;
        for ((user, id), r) in owed.into_iter().zip(results) {
            if r.is_err() {
                failed = true;
                self.unregistered
                    .lock()
                    .expect("not poisoned")
                    .push((user, id));
            }
        }
        if failed {
            self.mark_dirty();
        }

        let conns: Vec<LocalConnection> = local
            .local_connections()
            .into_iter()
            .filter(|c| self.registered.contains_key(&c.conn_id))
            .collect();
        let mut displaced = Vec::new();
        for batch in conns.chunks(RESTORE_BATCH) {
            let mut keys = Vec::with_capacity(batch.len());
            let mut args = Vec::with_capacity(3 + 4 * batch.len());
            args.push(self.keys.node_prefix.clone());
            args.push(KEY_TTL.as_millis().to_string());
            args.push(self.instance.clone());
            for c in batch {
                keys.push(self.keys.presence(&c.user));
                args.push(self.field(c.conn_id));
                args.push(self.entry_json(c));
                args.push(c.channel.clone());
                args.push(policy_arg(self.channels.policy(&c.channel)).to_owned());
            }
            let reply = self.scripts.restore.run(&self.client, keys, args).await?;
            for (c, status) in batch.iter().zip(into_array(reply)) {
                if status.as_i64() == Some(1) {
                    displaced.push(c.clone());
                }
            }
        }
        // A connection that left while its entry was being rewritten: remove it again (its own
        // removal may have run before the rewrite).
        let gone: Vec<&LocalConnection> = conns
            .iter()
            .filter(|c| !self.registered.contains_key(&c.conn_id))
            .collect();
        for c in gone {
            if self.hdel(&c.user, c.conn_id).await.is_err() {
                self.unregistered
                    .lock()
                    .expect("not poisoned")
                    .push((c.user.clone(), c.conn_id));
                self.mark_dirty();
            }
        }
        Ok(displaced)
    }

    /// Removes every entry of this node (graceful leave).
    pub(crate) async fn remove_all(&self) {
        let mine: Vec<(String, u64)> = self
            .registered
            .iter()
            .map(|e| (e.value().clone(), *e.key()))
            .collect();
        self.registered.clear();
        let owed = std::mem::take(&mut *self.unregistered.lock().expect("not poisoned"));
        let all: Vec<(String, u64)> = mine.into_iter().chain(owed).collect();
        for chunk in all.chunks(1_000) {
            let _ = join_all(chunk.iter().map(|(u, id)| self.hdel(u, *id))).await;
        }
    }
}

fn into_array(v: Value) -> Vec<Value> {
    match v {
        Value::Array(items) => items,
        Value::Null => Vec::new(),
        other => vec![other],
    }
}

fn parse_entry(v: &Value) -> Option<StoredEntry> {
    let bytes = v.as_bytes()?;
    match serde_json::from_slice(bytes) {
        Ok(e) => Some(e),
        Err(e) => {
            tracing::warn!(error = %crate::logging::esc(&e), "undecodable presence entry");
            None
        }
    }
}
