//! Sessions for fast reconnect. LOGIN creates one (128 random bits, bound to the user, device
//! and channel type); RESUME presents it on any node, which checks the device and replaces it
//! with a new id (ids are single-use) that keeps the original expiry: a session lives at most
//! `delivery.session_ttl_secs` from its LOGIN, so a token is needed again after that. With
//! Redis a session is `{p}:session:{id}` with a TTL; embedded, an in-process map swept as it is
//! used.
//!
//! A RESUME reads the session first ([`Cluster::check_session`], which changes nothing) and
//! replaces it ([`Cluster::resume_session`]) only once every step that can refuse the login
//! (duplicate-login policy, the message store) has passed: a refused RESUME leaves the session
//! as it was, to be presented again here or on another node.

use std::time::{Duration, Instant};

use fred::prelude::{Expiration, KeysInterface, Value};
use serde::{Deserialize, Serialize};
use tokio::time::timeout;

use super::{Cluster, ClusterError};
use crate::base::unix_millis;

/// The embedded map sweeps out expired sessions once every this many new sessions.
const SWEEP_EVERY: u64 = 4_096;

/// What a session restores.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Session {
    #[serde(rename = "u")]
    pub user: String,
    #[serde(rename = "d")]
    pub device: String,
    #[serde(rename = "c")]
    pub channel: String,
}

/// A session id and when it expires (milliseconds since the Unix epoch).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SessionTicket {
    pub id: String,
    pub expires_at_ms: u64,
}

/// What a session id refers to, as read by [`Cluster::check_session`].
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum SessionCheck {
    /// A live session of the device presented.
    Valid(Session),
    /// No such session: never issued, expired or revoked.
    Unknown,
    /// The session belongs to another device.
    WrongDevice,
}

/// The outcome of replacing a session id.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Resume {
    /// Restored; the presented id is gone and `ticket` replaces it.
    Resumed {
        session: Session,
        ticket: SessionTicket,
    },
    /// No such session: never issued, expired or revoked.
    Unknown,
    /// The session belongs to another device; it is left as it was.
    WrongDevice,
}

/// Moves a session to a new id, with the time it has left, if the device matches. `KEYS`: old
/// key, new key. `ARGV`: device id. Returns `{0}` unknown, `{2}` another device, `{1, record,
/// ms left}` moved.
pub(crate) const SESSION_RESUME: &str = r#"
local rec = redis.call('GET', KEYS[1])
if not rec then return {0} end
local ok, r = pcall(cjson.decode, rec)
if not ok or type(r) ~= 'table' or r.d ~= ARGV[1] then return {2} end
local left = redis.call('PTTL', KEYS[1])
if left <= 0 then return {0} end
redis.call('DEL', KEYS[1])
redis.call('SET', KEYS[2], rec, 'PX', left)
return {1, rec, left}
"#;

fn new_id() -> String {
    format!("{:032x}", rand::random::<u128>())
}

/// A session id as accepted from a client: 32 lowercase hex digits.
fn well_formed(id: &str) -> bool {
    id.len() == 32
        && id
            .bytes()
            .all(|b| b.is_ascii_digit() || (b'a'..=b'f').contains(&b))
}

impl Cluster {
    fn session_ttl(&self) -> Duration {
        self.inner.session_ttl
    }

    fn new_ticket(&self, id: String) -> SessionTicket {
        SessionTicket {
            id,
            expires_at_ms: unix_millis() + self.session_ttl().as_millis() as u64,
        }
    }

    /// Creates a session. With Redis down the ticket is still returned (RESUME with it then
    /// answers SESSION_EXPIRED, and the client logs in again) and the error logged by the caller.
    pub async fn create_session(
        &self,
        session: &Session,
    ) -> (SessionTicket, Result<(), ClusterError>) {
        let inner = &self.inner;
        let ticket = self.new_ticket(new_id());
        let Some(redis) = &inner.redis else {
            let now = Instant::now();
            let created = inner
                .sessions_created
                .fetch_add(1, std::sync::atomic::Ordering::Relaxed);
            if created % SWEEP_EVERY == SWEEP_EVERY - 1 {
                inner.sessions.retain(|_, (_, expires)| *expires > now);
            }
            inner.sessions.insert(
                ticket.id.clone(),
                (session.clone(), now + self.session_ttl()),
            );
            return (ticket, Ok(()));
        };
        let json = serde_json::to_string(session).expect("sessions serialise");
        let set = redis.bus.client.set::<(), _, _>(
            inner.keys.session(&ticket.id),
            json,
            Some(Expiration::PX(self.session_ttl().as_millis() as i64)),
            None,
            false,
        );
        let result = match timeout(inner.request_timeout, set).await {
            Ok(r) => r.map_err(ClusterError::redis),
            Err(_) => Err(ClusterError::Unavailable),
        };
        (ticket, result)
    }

    /// Reads session `id` as presented by `device`, changing nothing.
    pub async fn check_session(
        &self,
        id: &str,
        device: &str,
    ) -> Result<SessionCheck, ClusterError> {
        if !well_formed(id) {
            return Ok(SessionCheck::Unknown);
        }
        let inner = &self.inner;
        let Some(redis) = &inner.redis else {
            let Some(entry) = inner.sessions.get(id) else {
                return Ok(SessionCheck::Unknown);
            };
            let (session, expires) = entry.value().clone();
            drop(entry);
            return Ok(if expires <= Instant::now() {
                SessionCheck::Unknown
            } else if session.device != device {
                SessionCheck::WrongDevice
            } else {
                SessionCheck::Valid(session)
            });
        };
        if !redis.bus.commands_up() {
            return Err(ClusterError::Unavailable);
        }
        let get = redis
            .bus
            .client
            .get::<Option<String>, _>(inner.keys.session(id));
        let rec = timeout(inner.request_timeout, get)
            .await
            .map_err(|_| ClusterError::Unavailable)?
            .map_err(ClusterError::redis)?;
        let Some(rec) = rec else {
            return Ok(SessionCheck::Unknown);
        };
        // A record that does not parse is refused like the script refuses it: as another device's.
        Ok(match serde_json::from_str::<Session>(&rec) {
            Ok(session) if session.device == device => SessionCheck::Valid(session),
            _ => SessionCheck::WrongDevice,
        })
    }

    /// Replaces session `id` of `device` with a new id that keeps its expiry: the presented id
    /// is used up. Call it once the login cannot be refused any more; `Unknown` if the session
    /// went meanwhile (another RESUME took it, or it was revoked or expired).
    pub async fn resume_session(&self, id: &str, device: &str) -> Result<Resume, ClusterError> {
        if !well_formed(id) {
            return Ok(Resume::Unknown);
        }
        self.move_session(id, new_id(), device).await
    }

    /// Gives session `id` back after a resume that replaced it with `ticket` could not tell the
    /// client (the `login_result` was not written): the client still holds `id`. Best effort.
    pub async fn unresume_session(&self, ticket: &SessionTicket, id: &str, device: &str) {
        if let Err(e) = self.move_session(&ticket.id, id.to_owned(), device).await {
            tracing::debug!(error = %crate::logging::esc(&e), "session not given back");
        }
    }

    /// Moves session `id` of `device` to id `new`.
    async fn move_session(
        &self,
        id: &str,
        new: String,
        device: &str,
    ) -> Result<Resume, ClusterError> {
        let inner = &self.inner;
        let Some(redis) = &inner.redis else {
            let now = Instant::now();
            let Some(entry) = inner.sessions.get(id) else {
                return Ok(Resume::Unknown);
            };
            let (session, expires) = entry.value().clone();
            drop(entry);
            if expires <= now {
                inner.sessions.remove(id);
                return Ok(Resume::Unknown);
            }
            if session.device != device {
                return Ok(Resume::WrongDevice);
            }
            if inner.sessions.remove(id).is_none() {
                // Another resume took it first.
                return Ok(Resume::Unknown);
            }
            let ticket = SessionTicket {
                id: new,
                expires_at_ms: unix_millis() + (expires - now).as_millis() as u64,
            };
            inner
                .sessions
                .insert(ticket.id.clone(), (session.clone(), expires));
            return Ok(Resume::Resumed { session, ticket });
        };
        if !redis.bus.commands_up() {
            return Err(ClusterError::Unavailable);
        }
        let run = redis.scripts.session_resume.run(
            &redis.bus.client,
            vec![inner.keys.session(id), inner.keys.session(&new)],
            vec![device.to_owned()],
        );
        let reply = timeout(inner.request_timeout, run)
            .await
            .map_err(|_| ClusterError::Unavailable)?
            .map_err(ClusterError::redis)?;
        let Value::Array(parts) = reply else {
            return Err(ClusterError::Redis(format!(
                "unexpected reply to a session resume: {reply:?}"
            )));
        };
        match parts.as_slice() {
            [Value::Integer(0)] => Ok(Resume::Unknown),
            [Value::Integer(2)] => Ok(Resume::WrongDevice),
            [Value::Integer(1), rec, Value::Integer(left)] => {
                let rec = rec
                    .as_str()
                    .ok_or_else(|| ClusterError::Redis("session record is not text".into()))?;
                let session: Session = serde_json::from_str(&rec)
                    .map_err(|e| ClusterError::Redis(format!("bad session record: {e}")))?;
                let ticket = SessionTicket {
                    id: new,
                    expires_at_ms: unix_millis() + (*left).max(0) as u64,
                };
                Ok(Resume::Resumed { session, ticket })
            }
            other => Err(ClusterError::Redis(format!(
                "unexpected reply to a session resume: {other:?}"
            ))),
        }
    }

    /// Revokes session `id` (LOGOUT, duplicate-login and admin kicks). Best effort: with Redis
    /// down the session lives until its TTL.
    pub async fn revoke_session(&self, id: &str) {
        let inner = &self.inner;
        let Some(redis) = &inner.redis else {
            inner.sessions.remove(id);
            return;
        };
        if !redis.bus.commands_up() {
            return;
        }
        let del = redis.bus.client.del::<i64, _>(inner.keys.session(id));
        if let Ok(Err(e)) = timeout(inner.request_timeout, del).await {
            tracing::debug!(error = %crate::logging::esc(&e), "session not revoked");
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn session_ids_are_128_random_bits_in_hex() {
        let a = new_id();
        assert!(well_formed(&a), "{a}");
        assert_ne!(a, new_id());
        assert!(!well_formed("ABCDEF0123456789abcdef0123456789"));
        assert!(!well_formed("abc"));
        assert!(!well_formed(&format!("{a}0")));
    }
}
