//! The bus between nodes: publish bytes on a named channel; receive what is published on the
//! channels subscribed to. [`LocalBus`] is in-process (the embedded single node); [`RedisBus`] is
//! Redis pub/sub with plain SUBSCRIBE on exact channel names (never PSUBSCRIBE: every pattern
//! subscription taxes every PUBLISH on the server).

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex, RwLock};
use std::time::Duration;

use bytes::Bytes;
use fred::clients::SubscriberClient;
use fred::prelude::{
    Builder, Client, ClientLike, Config, EventInterface, PubsubInterface, ReconnectPolicy, Value,
};
use fred::types::config::UnresponsiveConfig;
use futures_util::future::BoxFuture;
use std::collections::HashMap;
use tokio::sync::{broadcast, mpsc, Notify};
use tokio_util::sync::CancellationToken;
use tracing::{debug, info, warn};

use super::batch::{Batcher, Limits};
use super::metrics::{counter_reconnect, gauge_bus_up, BusMetrics};

/// How many received messages may wait for the node's receive loop.
const SUBSCRIPTION_CAPACITY: usize = 16_384;

/// A channel's messages leave in PUBLISHes of at most this many messages and bytes, one
/// PUBLISH outstanding at a time (so that they leave in the order they were published).
const OUTBOX_LIMITS: Limits = Limits {
    max_items: 256,
    max_weight: 256 * 1024,
    in_flight: 1,
};

type Outbox = Batcher<Bytes, Result<usize, BusError>>;

/// Joins messages into one payload, one per line.
fn join(mut payloads: Vec<Bytes>) -> Bytes {
    if payloads.len() == 1 {
        return payloads.pop().expect("one");
    }
    let len = payloads.iter().map(|p| p.len() + 1).sum();
    let mut joined = bytes::BytesMut::with_capacity(len);
    for p in payloads {
        joined.extend_from_slice(&p);
        joined.extend_from_slice(b"\n");
    }
    joined.freeze()
}

/// The messages of one received payload: the slices of `payload` holding one JSON value each
/// (a payload published by `join` holds several). Stops at the first that is not JSON, after
/// returning the error.
pub fn split(payload: &Bytes) -> impl Iterator<Item = Result<Bytes, serde_json::Error>> + '_ {
    let mut values =
        serde_json::Deserializer::from_slice(payload).into_iter::<serde::de::IgnoredAny>();
    let mut start = 0;
    let mut failed = false;
    std::iter::from_fn(move || {
        if failed {
            return None;
        }
        match values.next()? {
            Ok(_) => {
                let end = values.byte_offset();
                let skipped = payload[start..end]
                    .iter()
                    .take_while(|b| b.is_ascii_whitespace())
                    .count();
                let value = payload.slice(start + skipped..end);
                start = end;
                Some(Ok(value))
            }
            Err(e) => {
                failed = true;
                Some(Err(e))
            }
        }
    })
}

/// One message received from the bus.
#[derive(Debug, Clone)]
pub struct BusMessage {
    pub channel: String,
    pub payload: Bytes,
}

/// What a node reads its bus messages from.
pub type Subscription = mpsc::Receiver<BusMessage>;

#[derive(Debug, Clone, thiserror::Error)]
pub enum BusError {
    #[error("the bus is down")]
    Down,
    #[error("bus error: {0}")]
    Redis(#[from] fred::error::Error),
}

/// Publish/subscribe between nodes.
///
/// A received payload holds one or more bus messages, concatenated (whitespace between them is
/// allowed): [`RedisBus`] publishes the messages queued for one channel while a PUBLISH to it
/// was outstanding as one PUBLISH. Readers split it with [`split`].
pub trait Bus: Send + Sync + 'static {
    /// Publishes `payload` on `channel`; returns how many subscribers received it.
    fn publish<'a>(
        &'a self,
        channel: &'a str,
        payload: Bytes,
    ) -> BoxFuture<'a, Result<usize, BusError>>;

    /// Publishes `payload` on `channel` without waiting for the outcome. `false` when it was
    /// dropped: the bus is down, or more than `backlog` messages wait to be published.
    fn post(&self, channel: &str, payload: Bytes, backlog: usize) -> bool;

    /// Subscribes to `channels` (exact names), once per bus; the subscription lasts as long as
    /// the bus, across reconnections.
    fn subscribe(&self, channels: Vec<String>) -> BoxFuture<'_, Result<Subscription, BusError>>;

    /// Whether publishing and receiving work right now.
    fn is_up(&self) -> bool;
}

/// The in-process bus: channels are names in a map, subscribers are bounded queues. A full queue
/// drops the message (the publisher sees it counted as not received).
#[derive(Default)]
pub struct LocalBus {
    subscribers: RwLock<HashMap<String, Vec<mpsc::Sender<BusMessage>>>>,
}

impl LocalBus {
    pub fn new() -> Self {
        Self::default()
    }
}

impl Bus for LocalBus {
    fn publish<'a>(
        &'a self,
        channel: &'a str,
        payload: Bytes,
    ) -> BoxFuture<'a, Result<usize, BusError>> {
        let mut received = 0;
        let mut closed = false;
        if let Some(subs) = self.subscribers.read().expect("not poisoned").get(channel) {
            for s in subs {
                match s.try_send(BusMessage {
                    channel: channel.to_owned(),
                    payload: payload.clone(),
                }) {
                    Ok(()) => received += 1,
                    Err(mpsc::error::TrySendError::Closed(_)) => closed = true,
                    Err(mpsc::error::TrySendError::Full(_)) => {}
                }
            }
        }
        if closed {
            if let Some(subs) = self
                .subscribers
                .write()
                .expect("not poisoned")
                .get_mut(channel)
            {
                subs.retain(|s| !s.is_closed());
            }
        }
        Box::pin(std::future::ready(Ok(received)))
    }

    fn post(&self, channel: &str, payload: Bytes, _backlog: usize) -> bool {
        // Publishing in-process never waits.
        drop(self.publish(channel, payload));
        true
    }

    fn subscribe(&self, channels: Vec<String>) -> BoxFuture<'_, Result<Subscription, BusError>> {
        let (tx, rx) = mpsc::channel(SUBSCRIPTION_CAPACITY);
        let mut subs = self.subscribers.write().expect("not poisoned");
        for c in channels {
            subs.entry(c).or_default().push(tx.clone());
        }
        Box::pin(std::future::ready(Ok(rx)))
    }

    fn is_up(&self) -> bool {
        true
    }
}

/// Connection settings of the Redis clients.
#[derive(Debug, Clone)]
pub(crate) struct RedisOptions {
    pub url: String,
    /// Timeout of every command; callers are never held longer.
    pub command_timeout: Duration,
    /// How long start-up keeps retrying an unreachable Redis.
    pub connect_timeout: Duration,
}

/// Redis pub/sub: one client for commands and PUBLISH (fred pipelines concurrent commands on one
/// connection) and one subscriber connection. Both reconnect forever with exponential backoff;
/// after the subscriber reconnects it subscribes again to its channels (done here rather than by
/// fred's `manage_subscriptions`, whose re-subscription also sends an empty PSUBSCRIBE).
pub struct RedisBus {
    pub(crate) client: Client,
    subscriber: SubscriberClient,
    channels: Mutex<Vec<String>>,
    /// Per channel, the queue its messages are published from.
    outboxes: Mutex<HashMap<String, Arc<Outbox>>>,
    commands_up: Arc<AtomicBool>,
    subscriber_up: Arc<AtomicBool>,
    closed: Arc<AtomicBool>,
    /// Signalled when something may have been missed: the command connection or the subscriber
    /// came back after a disconnection, or the receive loop lost messages. The cluster then
    /// re-registers its presence, which repairs what a lost write or a lost kick left behind.
    pub(crate) resync: Arc<Notify>,
    stop: CancellationToken,
    metrics: BusMetrics,
}

fn reconnect_policy() -> ReconnectPolicy {
    // Forever; 50 ms doubling up to 1 s (plus fred's jitter).
    ReconnectPolicy::new_exponential(0, 50, 1_000, 2)
}

impl RedisBus {
    /// Connects both clients, retrying with backoff (logging each failure) until
    /// `connect_timeout`; then watches their connection state until `stop` is cancelled.
    pub(crate) async fn connect(
        opts: &RedisOptions,
        stop: CancellationToken,
        metrics: BusMetrics,
    ) -> Result<RedisBus, String> {
        let config = Config::from_url(&opts.url).map_err(|e| format!("invalid redis URL: {e}"))?;
        let mut builder = Builder::from_config(config);
        let attempt_timeout = opts
            .connect_timeout
            .clamp(Duration::from_millis(100), Duration::from_secs(2));
        builder
            .with_connection_config(|c| {
                c.connection_timeout = attempt_timeout;
                c.internal_command_timeout = attempt_timeout;
                // A command in flight when the connection drops fails instead of being replayed
                // late; callers have given up on it by then.
                c.max_command_attempts = 1;
                // A Redis that stops answering (but keeps the socket open) is dropped and
                // reconnected. Only the command client has requests in flight to notice it.
                c.unresponsive = UnresponsiveConfig {
                    max_timeout: Some((opts.command_timeout * 2).max(Duration::from_secs(2))),
                    interval: Duration::from_millis(500),
                };
            })
            .with_performance_config(|p| {
                p.default_command_timeout = opts.command_timeout;
                p.broadcast_channel_capacity = SUBSCRIPTION_CAPACITY;
            })
            .set_policy(reconnect_policy());
        let client = builder.build().map_err(|e| e.to_string())?;
        let subscriber = builder
            .build_subscriber_client()
            .map_err(|e| e.to_string())?;

        let started = tokio::time::Instant::now();
        let mut delay = Duration::from_millis(100);
        let mut attempt = 0u32;
        loop {
            attempt += 1;
            let result = async {
                client.init().await?;
                subscriber.init().await?;
                Ok::<_, fred::error::Error>(())
            }
            .await;
            match result {
                Ok(()) => break,
                Err(e) => {
                    let quit = async {
                        let _ = client.quit().await;
                        let _ = subscriber.quit().await;
                    };
                    let _ = tokio::time::timeout(Duration::from_secs(1), quit).await;
                    let elapsed = started.elapsed();
                    if elapsed >= opts.connect_timeout {
                        return Err(format!(
                            "no connection to Redis after {attempt} attempts in {} ms: {e}",
                            elapsed.as_millis()
                        ));
                    }
                    warn!(attempt, error = %crate::logging::esc(&e), retry_in_ms = delay.as_millis() as u64, "cannot connect to Redis; retrying");
                    tokio::select! {
                        _ = stop.cancelled() => return Err("cancelled".into()),
                        _ = tokio::time::sleep(delay.min(opts.connect_timeout.saturating_sub(elapsed))) => {}
                    }
                    delay = (delay * 2).min(Duration::from_secs(2));
                }
            }
        }

        let bus = RedisBus {
            client,
            subscriber,
            channels: Mutex::new(Vec::new()),
            outboxes: Mutex::new(HashMap::new()),
            commands_up: Arc::new(AtomicBool::new(true)),
            subscriber_up: Arc::new(AtomicBool::new(true)),
            closed: Arc::new(AtomicBool::new(false)),
            resync: Arc::new(Notify::new()),
            stop,
            metrics,
        };
        bus.watch_commands();
        gauge_bus_up(true);
        Ok(bus)
    }

    /// Whether commands (presence, registry) can be sent.
    pub(crate) fn commands_up(&self) -> bool {
        self.commands_up.load(Ordering::Acquire) && !self.closed.load(Ordering::Acquire)
    }

    /// The queue of `channel`, created on first use.
    fn outbox(&self, channel: &str) -> Arc<Outbox> {
        let mut outboxes = self.outboxes.lock().expect("not poisoned");
        if let Some(o) = outboxes.get(channel) {
            return o.clone();
        }
        let (client, channel_name) = (self.client.clone(), channel.to_owned());
        let (up, closed) = (self.commands_up.clone(), self.closed.clone());
        let publishes = self.metrics.publishes.clone();
        let outbox = Arc::new(Batcher::spawn(
            OUTBOX_LIMITS,
            Bytes::len,
            move |payloads: Vec<Bytes>| {
                let n = payloads.len();
                let (client, channel) = (client.clone(), channel_name.clone());
                let ready = up.load(Ordering::Acquire) && !closed.load(Ordering::Acquire);
                if ready {
                    publishes.increment(1);
                }
                async move {
                    let result = if ready {
                        client
                            .publish::<i64, _, _>(channel, join(payloads))
                            .await
                            .map(|n| n.max(0) as usize)
                            .map_err(BusError::Redis)
                    } else {
                        Err(BusError::Down)
                    };
                    (0..n).map(|_| result.clone()).collect()
                }
            },
            self.stop.clone(),
        ));
        outboxes.insert(channel.to_owned(), outbox.clone());
        outbox
    }

    /// Follows the command connection: down on an error event, up again once reconnected.
    fn watch_commands(&self) {
        let client = self.client.clone();
        let up = self.commands_up.clone();
        let other = self.subscriber_up.clone();
        let resync = self.resync.clone();
        let stop = self.stop.clone();
        let mut errors = client.error_rx();
        let mut reconnects = client.reconnect_rx();
        tokio::spawn(async move {
            loop {
                tokio::select! {
                    biased;
                    _ = stop.cancelled() => return,
                    e = errors.recv() => match e {
                        Ok((e, _)) => {
                            if up.swap(false, Ordering::AcqRel) {
                                warn!(error = %crate::logging::esc(&e), "Redis command connection lost");
                                gauge_bus_up(false);
                            }
                        }
                        Err(broadcast::error::RecvError::Lagged(_)) => up.store(false, Ordering::Release),
                        Err(broadcast::error::RecvError::Closed) => return,
                    },
                    r = reconnects.recv() => match r {
                        Ok(_) | Err(broadcast::error::RecvError::Lagged(_)) => {
                            counter_reconnect("commands");
                            // The event comes before fred marks the client connected; commands
                            // sent before that would be refused.
                            let deadline = tokio::time::Instant::now() + Duration::from_secs(5);
                            while !client.is_connected() && tokio::time::Instant::now() < deadline {
                                tokio::time::sleep(Duration::from_millis(5)).await;
                            }
                            up.store(true, Ordering::Release);
                            info!("Redis command connection re-established");
                            gauge_bus_up(other.load(Ordering::Acquire));
                            resync.notify_one();
                        }
                        Err(broadcast::error::RecvError::Closed) => return,
                    },
                }
            }
        });
    }

    /// Subscribes again to every channel after the subscriber reconnected; down meanwhile.
    fn watch_subscriber(
        &self,
        mut errors: broadcast::Receiver<(fred::error::Error, Option<fred::types::config::Server>)>,
        mut reconnects: broadcast::Receiver<fred::types::config::Server>,
    ) {
        let subscriber = self.subscriber.clone();
        let up = self.subscriber_up.clone();
        let other = self.commands_up.clone();
        let stop = self.stop.clone();
        let resync = self.resync.clone();
        let channels = self.channels.lock().expect("not poisoned").clone();
        tokio::spawn(async move {
            loop {
                tokio::select! {
                    biased;
                    _ = stop.cancelled() => return,
                    e = errors.recv() => match e {
                        Ok((e, _)) => {
                            if up.swap(false, Ordering::AcqRel) {
                                warn!(error = %crate::logging::esc(&e), "Redis subscriber connection lost");
                                gauge_bus_up(false);
                            }
                        }
                        Err(broadcast::error::RecvError::Lagged(_)) => up.store(false, Ordering::Release),
                        Err(broadcast::error::RecvError::Closed) => return,
                    },
                    r = reconnects.recv() => match r {
                        Ok(_) | Err(broadcast::error::RecvError::Lagged(_)) => {
                            counter_reconnect("subscriber");
                            let subscribed = async {
                                subscriber.subscribe(channels.clone()).await?;
                                subscriber.ping::<Value>(None).await.map(|_| ())
                            };
                            match subscribed.await {
                                Ok(()) => {
                                    up.store(true, Ordering::Release);
                                    info!("Redis subscriber re-established and re-subscribed");
                                    gauge_bus_up(other.load(Ordering::Acquire));
                                    // Kicks sent meanwhile were lost.
                                    resync.notify_one();
                                }
                                Err(e) => {
                                    // Stay down; a forced reconnection brings another attempt.
                                    warn!(error = %crate::logging::esc(&e), "re-subscribing failed; reconnecting");
                                    let _ = subscriber.force_reconnection().await;
                                }
                            }
                        }
                        Err(broadcast::error::RecvError::Closed) => return,
                    },
                }
            }
        });
    }

    /// Called when this node's own channel had no subscriber although the subscriber looked up:
    /// its connection or subscription is gone without fred noticing. Reconnects it.
    pub(crate) async fn heal_subscriber(&self) {
        if self.subscriber_up.swap(false, Ordering::AcqRel) {
            warn!("this node's bus channel has no subscriber; reconnecting the subscriber");
            gauge_bus_up(false);
            if let Err(e) = self.subscriber.force_reconnection().await {
                debug!(error = %crate::logging::esc(&e), "forced subscriber reconnection failed");
            }
        }
    }

    pub(crate) fn subscriber_up(&self) -> bool {
        self.subscriber_up.load(Ordering::Acquire)
    }

    /// Closes both connections; the bus stays down.
    pub(crate) async fn close(&self) {
        if self.closed.swap(true, Ordering::AcqRel) {
            return;
        }
        let quit = async {
            let _ = self.subscriber.quit().await;
            let _ = self.client.quit().await;
        };
        let _ = tokio::time::timeout(Duration::from_secs(2), quit).await;
    }
}

impl Bus for RedisBus {
    fn publish<'a>(
        &'a self,
        channel: &'a str,
        payload: Bytes,
    ) -> BoxFuture<'a, Result<usize, BusError>> {
        Box::pin(async move {
            if !self.commands_up() {
                return Err(BusError::Down);
            }
            self.outbox(channel)
                .call(payload)
                .await
                .unwrap_or(Err(BusError::Down))
        })
    }

    fn post(&self, channel: &str, payload: Bytes, backlog: usize) -> bool {
        self.commands_up() && self.outbox(channel).post(payload, backlog)
    }

    fn subscribe(&self, channels: Vec<String>) -> BoxFuture<'_, Result<Subscription, BusError>> {
        Box::pin(async move {
            let (tx, rx) = mpsc::channel(SUBSCRIPTION_CAPACITY);
            // Listen before subscribing so that nothing published after SUBSCRIBE is missed.
            let mut messages = self.subscriber.message_rx();
            let lagged = self.metrics.lagged.clone();
            let resync = self.resync.clone();
            let stop = self.stop.clone();
            tokio::spawn(async move {
                loop {
                    let m = tokio::select! {
                        _ = stop.cancelled() => return,
                        m = messages.recv() => m,
                    };
                    match m {
                        Ok(m) => {
                            let Some(payload) = m.value.into_bytes() else {
                                continue;
                            };
                            let msg = BusMessage {
                                channel: m.channel.to_string(),
                                payload,
                            };
                            if tx.send(msg).await.is_err() {
                                return;
                            }
                        }
                        Err(broadcast::error::RecvError::Lagged(n)) => {
                            warn!(lost = n, "bus receive loop fell behind; messages lost");
                            lagged.increment(n);
                            resync.notify_one();
                        }
                        Err(broadcast::error::RecvError::Closed) => return,
                    }
                }
            });
            {
                let mut mine = self.channels.lock().expect("not poisoned");
                mine.extend(channels.iter().cloned());
            }
            // Connection events from now on, so that a drop right after SUBSCRIBE is not missed.
            let (errors, reconnects) = (self.subscriber.error_rx(), self.subscriber.reconnect_rx());
            self.subscriber.subscribe(channels).await?;
            // SUBSCRIBE resolves once written (it is answered out of band); a PING on the same
            // connection is answered after the server has processed it, so from here on other
            // nodes' PUBLISH counts this node.
            self.subscriber.ping::<Value>(None).await?;
            self.watch_subscriber(errors, reconnects);
            Ok(rx)
        })
    }

    fn is_up(&self) -> bool {
        self.commands_up() && self.subscriber_up.load(Ordering::Acquire)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn joined_messages_split_back_into_slices_of_the_payload() {
        let one = Bytes::from_static(br#"{"a":"x\ny","b":[1, 2]}"#);
        let two = Bytes::from_static(b" {\"c\":\n {}}");
        let three = Bytes::from_static(b"[3]");
        assert_eq!(
            join(vec![one.clone()]),
            one,
            "a lone message is sent as it is"
        );
        let joined = join(vec![one.clone(), two.clone(), three.clone()]);
        let parts: Vec<Bytes> = split(&joined).map(Result::unwrap).collect();
        assert_eq!(parts, vec![one, two.slice(1..), three]);
        let base = joined.as_ptr() as usize;
        assert!(parts
            .iter()
            .all(|p| (base..base + joined.len()).contains(&(p.as_ptr() as usize))));

        let broken = Bytes::from_static(b"{\"a\":1}\n{nope}\n{\"b\":2}");
        let parts: Vec<_> = split(&broken).collect();
        assert_eq!(parts.len(), 2, "stops after the first error");
        assert_eq!(
            parts[0].as_ref().unwrap(),
            &Bytes::from_static(b"{\"a\":1}")
        );
        assert!(parts[1].is_err());
        assert_eq!(split(&Bytes::new()).count(), 0);
    }

    #[tokio::test]
    async fn local_bus_delivers_to_subscribers_of_the_channel_only() {
        let bus = LocalBus::new();
        let mut a = bus.subscribe(vec!["all".into(), "a".into()]).await.unwrap();
        let mut b = bus.subscribe(vec!["all".into(), "b".into()]).await.unwrap();
        assert_eq!(
            bus.publish("all", Bytes::from_static(b"1")).await.unwrap(),
            2
        );
        assert_eq!(bus.publish("b", Bytes::from_static(b"2")).await.unwrap(), 1);
        assert_eq!(
            bus.publish("nobody", Bytes::from_static(b"3"))
                .await
                .unwrap(),
            0
        );
        assert_eq!(a.recv().await.unwrap().payload, "1");
        assert_eq!(b.recv().await.unwrap().payload, "1");
        let m = b.recv().await.unwrap();
        assert_eq!((m.channel.as_str(), &m.payload[..]), ("b", &b"2"[..]));
        assert!(a.try_recv().is_err());
        drop(a);
        assert_eq!(
            bus.publish("all", Bytes::from_static(b"4")).await.unwrap(),
            1
        );
        assert!(bus.is_up());
    }
}
