//! The soak's users: each is an [`imgate_shared::client::Client`] (reconnects, resumes and resends
//! by itself), sends numbered messages one at a time to random other users, and records what it is
//! handed. The [`Ledger`] holds both sides; [`Ledger::verdict`] compares them.

use crate::lock;
use std::collections::{BTreeMap, HashMap, HashSet};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use imgate_shared::client::{Backoff, Client, ClientConfig, ClientError, Event};
use imgate_shared::connection::Endpoint;
use imgate_shared::protocol::Body;
use imgate_shared::SendStatus;
use rand::Rng;
use serde::{Deserialize, Serialize};
use tokio::sync::mpsc;
use tokio::task::JoinHandle;
use tokio::time::Instant;
use tokio_util::sync::CancellationToken;

/// A message is (sender index, the sender's number for it).
type MsgKey = (u32, u64);

#[derive(Serialize, Deserialize)]
struct Numbered {
    s: u32,
    n: u64,
}

/// What was sent and what arrived, shared by every user's tasks.
#[derive(Default)]
pub struct Ledger {
    sent: u64,
    receipts: BTreeMap<String, u64>,
    refused: BTreeMap<String, u64>,
    /// Sends without a receipt within the client's send timeout.
    timeouts: u64,
    /// Receipt `stored` or `delivered`: the recipient must get it exactly once.
    promised: HashMap<MsgKey, u32>,
    refused_keys: HashSet<MsgKey>,
    /// Per message, how many times it was handed to the application, and to whom.
    received: HashMap<MsgKey, (u32, u32)>,
    /// Per (recipient, sender), the sender's numbers in the order they were handed over.
    arrival: HashMap<(u32, u32), Vec<u64>>,
    /// Client events by kind (`connected`, `resumed`, `disconnected`, `kicked:…`, …).
    pub events: BTreeMap<String, u64>,
}

#[derive(Debug, Clone, Default, Serialize)]
pub struct Verdict {
    pub sent: u64,
    pub receipts: BTreeMap<String, u64>,
    pub refused_by_reason: BTreeMap<String, u64>,
    pub unanswered: u64,
    /// Messages whose receipt said `stored` or `delivered`.
    pub promised: u64,
    /// Distinct messages handed to an application.
    pub received: u64,
    /// Promised and never handed over.
    pub lost: u64,
    /// Extra copies handed to an application.
    pub duplicates: u64,
    /// Promised messages of one sender handed to one recipient out of the order they were sent.
    pub out_of_order: u64,
    /// Handed to another user than the one it was sent to.
    pub misdelivered: u64,
    /// Refused, yet handed over.
    pub refused_but_received: u64,
    /// Handed over without a receipt (the send timed out).
    pub received_unanswered: u64,
    pub client_events: BTreeMap<String, u64>,
}

impl Verdict {
    /// Nothing lost, doubled, reordered or misdelivered, and no client gave up.
    pub fn clean(&self) -> bool {
        self.lost == 0
            && self.duplicates == 0
            && self.out_of_order == 0
            && self.misdelivered == 0
            && self.refused_but_received == 0
            && self.fatal_client_events() == 0
    }

    /// Events after which a client stops or a message is gone for good.
    pub fn fatal_client_events(&self) -> u64 {
        self.client_events
            .iter()
            .filter(|(k, _)| {
                k.starts_with("login_failed") || *k == "expired" || *k == "kicked:duplicate_login"
            })
            .map(|(_, v)| v)
            .sum()
    }
}

impl Ledger {
    pub fn unreceived(&self) -> usize {
        self.promised
            .keys()
            .filter(|k| !self.received.contains_key(k))
            .count()
    }

    pub fn progress(&self) -> (u64, usize, usize) {
        (self.sent, self.promised.len(), self.received.len())
    }

    pub fn verdict(&self) -> Verdict {
        let mut v = Verdict {
            sent: self.sent,
            receipts: self.receipts.clone(),
            refused_by_reason: self.refused.clone(),
            unanswered: self.timeouts,
            promised: self.promised.len() as u64,
            received: self.received.len() as u64,
            client_events: self.events.clone(),
            ..Verdict::default()
        };
        v.lost = self.unreceived() as u64;
        for (key, (count, to)) in &self.received {
            v.duplicates += u64::from(count - 1);
            match self.promised.get(key) {
                Some(expected) if expected != to => v.misdelivered += 1,
                Some(_) => {}
                None if self.refused_keys.contains(key) => v.refused_but_received += 1,
                None => v.received_unanswered += 1,
            }
        }
        for ((_, from), numbers) in &self.arrival {
            let promised: Vec<u64> = numbers
                .iter()
                .copied()
                .filter(|n| self.promised.contains_key(&(*from, *n)))
                .collect();
            v.out_of_order += promised.windows(2).filter(|w| w[1] < w[0]).count() as u64;
        }
        v
    }
}

pub struct UserSpec {
    pub users: u32,
    /// Messages per second over all users.
    pub rate: f64,
    /// Node endpoints; user `u` starts with node `u % len` and uses WebSocket when `u` is odd.
    pub nodes: Vec<(Endpoint, Endpoint)>,
    pub tokens: Vec<String>,
}

pub struct Users {
    clients: Vec<Client>,
    senders: Vec<JoinHandle<()>>,
    receivers: Vec<JoinHandle<()>>,
}

pub const SEND_TIMEOUT: Duration = Duration::from_secs(30);

impl Users {
    /// Starts every user's client and receiver; senders start sending at once and stop when
    /// `stop_sending` is cancelled.
    pub fn start(
        spec: UserSpec,
        ledger: Arc<Mutex<Ledger>>,
        stop_sending: CancellationToken,
    ) -> Users {
        let n = spec.users;
        let mut users = Users {
            clients: Vec::new(),
            senders: Vec::new(),
            receivers: Vec::new(),
        };
        for u in 0..n {
            let k = spec.nodes.len();
            let endpoints = (0..k)
                .map(|j| {
                    let (tcp, ws) = &spec.nodes[(u as usize + j) % k];
                    if u % 2 == 0 {
                        tcp.clone()
                    } else {
                        ws.clone()
                    }
                })
                .collect();
            let mut config = ClientConfig::new(
                endpoints,
                spec.tokens[u as usize].clone(),
                format!("d{u}"),
                "app",
            );
            config.backoff = Backoff {
                initial: Duration::from_millis(100),
                max: Duration::from_secs(2),
                jitter: 0.5,
            };
            config.send_timeout = SEND_TIMEOUT;
            let (client, events) = Client::start(config);
            users
                .receivers
                .push(tokio::spawn(receive(u, events, ledger.clone())));
            let interval = Duration::from_secs_f64(f64::from(n) / spec.rate.max(0.001));
            users.senders.push(tokio::spawn(send(
                u,
                n,
                interval,
                client.clone(),
                ledger.clone(),
                stop_sending.clone(),
            )));
            users.clients.push(client);
        }
        users
    }

    /// Waits until every sender has its last receipt (or timed out).
    pub async fn senders_done(&mut self) {
        for s in self.senders.drain(..) {
            let _ = s.await;
        }
    }

    pub async fn close(self) {
        for c in &self.clients {
            c.close().await;
        }
        for r in self.receivers {
            r.abort();
        }
    }
}

async fn send(
    me: u32,
    users: u32,
    interval: Duration,
    client: Client,
    ledger: Arc<Mutex<Ledger>>,
    stop: CancellationToken,
) {
    let first = rand::rng().random_range(0.0..1.0) * interval.as_secs_f64();
    let mut next = Instant::now() + Duration::from_secs_f64(first);
    let mut n = 0u64;
    loop {
        tokio::select! {
            _ = stop.cancelled() => return,
            _ = tokio::time::sleep_until(next) => {}
        }
        next = (next + interval).max(Instant::now());
        let to = (me + rand::rng().random_range(1..users.max(2))) % users;
        n += 1;
        let body = Body::from_value(&Numbered { s: me, n }).expect("a number serialises");
        lock(&ledger).sent += 1;
        let result = client.send(format!("soak-{to}"), body).await;
        let mut l = lock(&ledger);
        match result {
            Ok(r) => {
                *l.receipts
                    .entry(format!("{:?}", r.status).to_lowercase())
                    .or_default() += 1;
                match r.status {
                    SendStatus::Stored | SendStatus::Delivered => {
                        l.promised.insert((me, n), to);
                    }
                    _ => {
                        let reason = r.reason.map(|c| format!("{c:?}")).unwrap_or_default();
                        *l.refused.entry(reason).or_default() += 1;
                        l.refused_keys.insert((me, n));
                        if let Some(ms) = r.retry_after_ms {
                            next = next.max(Instant::now() + Duration::from_millis(ms));
                        }
                    }
                }
            }
            Err(ClientError::Timeout) => l.timeouts += 1,
            Err(ClientError::Stopped) => {
                *l.events.entry("stopped".into()).or_default() += 1;
                return;
            }
        }
    }
}

async fn receive(me: u32, mut events: mpsc::Receiver<Event>, ledger: Arc<Mutex<Ledger>>) {
    while let Some(event) = events.recv().await {
        let mut l = lock(&ledger);
        let kind = match event {
            Event::Message(m) => {
                let Ok(Numbered { s, n }) = m.body.parse::<Numbered>() else {
                    *l.events.entry("foreign_message".into()).or_default() += 1;
                    continue;
                };
                l.received.entry((s, n)).or_insert((0, me)).0 += 1;
                l.arrival.entry((me, s)).or_default().push(n);
                continue;
            }
            Event::Connected { resumed: true, .. } => "resumed".to_owned(),
            Event::Connected { .. } => "connected".to_owned(),
            Event::Disconnected { .. } => "disconnected".to_owned(),
            Event::Kicked { reason } => format!("kicked:{}", snake(&format!("{reason:?}"))),
            Event::LoginFailed { code, .. } => format!("login_failed:{code:?}"),
            Event::Expired { .. } => "expired".to_owned(),
            Event::CaughtUp { .. } => continue,
            Event::ServerError { code, .. } => format!("server_error:{code:?}"),
        };
        *l.events.entry(kind).or_default() += 1;
    }
}

/// `DuplicateLogin` → `duplicate_login`.
fn snake(name: &str) -> String {
    let mut out = String::new();
    for (i, c) in name.chars().enumerate() {
        if c.is_uppercase() && i > 0 {
            out.push('_');
        }
        out.extend(c.to_lowercase());
    }
    out
}
