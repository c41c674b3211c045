//! Tests of the client against an in-process fake server.

use std::time::Duration;

use tokio::net::TcpStream;
use tokio::sync::mpsc;
use tokio::time::Instant;

use super::inbox::*;
use super::session::*;
use super::*;
use crate::codec::{frame_codec, DEFAULT_MAX_FRAME_LEN};
use crate::connection::Endpoint;
use crate::protocol::{Body, ErrorCode, KickReason, MessageId, SendStatus};
use crate::{ClientFrame, ServerFrame};
use futures_util::{SinkExt, StreamExt};
use tokio::net::TcpListener;
use tokio_util::codec::{Framed, LengthDelimitedCodec};

#[test]
fn backoff_grows_caps_and_jitters() {
    let b = Backoff {
        initial: Duration::from_millis(100),
        max: Duration::from_secs(2),
        jitter: 0.5,
    };
    let mut rng = 12345;
    for attempt in 0..10 {
        let d = backoff_delay(&b, attempt, &mut rng).as_secs_f64();
        let nominal = (0.1 * 2f64.powi(attempt as i32)).min(2.0);
        assert!(
            d >= nominal * 0.5 - 1e-9 && d <= nominal * 1.5 + 1e-9,
            "{attempt}: {d}"
        );
    }
    let no_jitter = Backoff { jitter: 0.0, ..b };
    assert_eq!(
        backoff_delay(&no_jitter, 3, &mut rng),
        Duration::from_millis(800)
    );
}

#[test]
fn seen_ids_drop_duplicates_and_stay_bounded() {
    let mut seen = SeenIds::new(3);
    assert!(seen.first_time(MessageId(1)));
    assert!(!seen.first_time(MessageId(1)));
    for i in 2..10 {
        assert!(seen.first_time(MessageId(i)));
    }
    assert_eq!(seen.set.len(), 3);
    assert!(seen.first_time(MessageId(1)), "forgotten after the cap");
}

/// Runs one push through the inbox as the session does; `true` if it reached the application.
fn receive(inbox: &mut Inbox, id: u64, seq: Option<u64>) -> bool {
    receive_sent(inbox, id, seq, None)
}

fn receive_sent(
    inbox: &mut Inbox,
    id: u64,
    seq: Option<u64>,
    sent_as: Option<(&str, &str)>,
) -> bool {
    let new = inbox.is_new(MessageId(id), seq, sent_as);
    if new {
        inbox.delivered(MessageId(id), seq, sent_as);
    }
    new
}

/// A message pushed before its commit whose node then crashed is resent by its sender
/// and stored under a new id and position: the application gets it once, and the second
/// position is acknowledged all the same.
#[test]
fn a_resent_message_under_a_new_id_and_position_is_handed_over_once() {
    let mut inbox = Inbox::new(0, 100);
    inbox.connected(0);
    assert!(receive_sent(&mut inbox, 1, Some(1), Some(("alice", "m-1"))));
    assert!(receive_sent(&mut inbox, 2, Some(2), Some(("alice", "m-2"))));
    assert!(!receive_sent(
        &mut inbox,
        9,
        Some(5),
        Some(("alice", "m-1"))
    ));
    assert_eq!(
        inbox.take_ack(),
        Some(5),
        "its position is taken and acknowledged"
    );
    // Same client message id from someone else, or with no sender: a message of its own.
    assert!(receive_sent(&mut inbox, 10, Some(6), Some(("bob", "m-1"))));
    assert!(receive_sent(&mut inbox, 11, Some(7), None));
}

#[test]
fn inbox_delivers_increasing_positions_once_and_acks_cumulatively() {
    let mut inbox = Inbox::new(0, 100);
    inbox.connected(0);
    assert_eq!(inbox.take_ack(), None, "nothing to acknowledge yet");
    assert!(receive(&mut inbox, 1, Some(1)));
    assert!(receive(&mut inbox, 2, Some(2)));
    // A jump (a message for another channel type, a hole the server gave up) is accepted.
    assert!(receive(&mut inbox, 5, Some(5)));
    assert_eq!(inbox.last_seq, 5);
    assert_eq!(
        inbox.take_ack(),
        Some(5),
        "one cumulative ack covers all three"
    );
    assert_eq!(inbox.take_ack(), None);

    // Retransmissions and replay overlaps are dropped but acknowledged again, at the highest
    // position held, even though that was acknowledged before.
    assert!(!receive(&mut inbox, 2, Some(2)));
    assert!(!receive(&mut inbox, 5, Some(5)));
    assert_eq!(inbox.take_ack(), Some(5));
    assert_eq!(inbox.last_seq, 5);

    // An older position arriving late is a duplicate as well: order is never broken.
    assert!(receive(&mut inbox, 9, Some(9)));
    assert!(!receive(&mut inbox, 7, Some(7)));
    assert_eq!(inbox.take_ack(), Some(9));
}

#[test]
fn inbox_acks_every_32_messages_at_the_latest() {
    let mut inbox = Inbox::new(0, 100);
    for seq in 1..ACK_EVERY as u64 {
        assert!(receive(&mut inbox, seq, Some(seq)));
        assert!(inbox.ack_due());
        assert!(!inbox.ack_now(), "{seq}: may still wait for a pause");
    }
    assert!(receive(&mut inbox, 32, Some(32)));
    assert!(inbox.ack_now());
    assert_eq!(inbox.take_ack(), Some(32));
    assert!(
        !inbox.ack_due() && !inbox.ack_now(),
        "the count starts again"
    );
    assert!(receive(&mut inbox, 33, Some(33)));
    assert!(!inbox.ack_now());
}

#[test]
fn inbox_follows_the_cursor_and_expired_ranges_without_acking_them() {
    let mut inbox = Inbox::new(3, 100);
    assert!(receive(&mut inbox, 4, Some(4)));
    // The connection drops before the ack; the next one presents last_seq = 4, and the server
    // counts it received: no ack is owed on the new connection.
    inbox.connected(4);
    assert!(!inbox.ack_due());
    assert_eq!(inbox.last_seq, 4);
    // The server's own record is ahead (another run of this device acknowledged more).
    inbox.connected(10);
    assert_eq!(inbox.last_seq, 10);
    assert!(!receive(&mut inbox, 8, Some(8)), "before the cursor");
    assert_eq!(inbox.take_ack(), Some(10));
    // A cursor behind what the client holds never moves it back.
    inbox.connected(2);
    assert_eq!(inbox.last_seq, 10);

    inbox.expired(15);
    assert_eq!(inbox.last_seq, 15);
    assert!(
        !inbox.ack_due(),
        "the server moved past expired positions itself"
    );
    assert!(!receive(&mut inbox, 14, Some(14)));
    assert!(receive(&mut inbox, 16, Some(16)));
    inbox.expired(12);
    assert_eq!(inbox.last_seq, 16, "an older range changes nothing");
    assert_eq!(inbox.take_ack(), Some(16));
}

#[test]
fn inbox_dedups_broadcasts_by_id_without_acks_and_stays_bounded() {
    let mut inbox = Inbox::new(0, 2);
    assert!(receive(&mut inbox, 100, None));
    assert!(!receive(&mut inbox, 100, None));
    assert!(!inbox.ack_due(), "broadcasts are not acknowledged");
    assert_eq!(inbox.last_seq, 0, "broadcasts are not part of the stream");
    assert!(receive(&mut inbox, 101, None));
    assert!(receive(&mut inbox, 102, None));
    assert!(
        receive(&mut inbox, 100, None),
        "the oldest id was forgotten"
    );
    assert!(inbox.seen.set.len() <= 2);
    // A stream message never counts as a broadcast duplicate, whatever its id.
    assert!(receive(&mut inbox, 102, Some(1)));
    assert_eq!(inbox.take_ack(), Some(1));
}

const WAIT: Duration = Duration::from_secs(5);

/// A scripted server: accepts the client's connections one by one over TCP.
struct FakeServer {
    listener: TcpListener,
}

struct Peer {
    framed: Framed<TcpStream, LengthDelimitedCodec>,
}

impl FakeServer {
    async fn start() -> (FakeServer, Endpoint) {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let endpoint = Endpoint::tcp(listener.local_addr().unwrap());
        (FakeServer { listener }, endpoint)
    }

    async fn accept(&self) -> Peer {
        let (stream, _) = tokio::time::timeout(WAIT, self.listener.accept())
            .await
            .expect("a connection in time")
            .unwrap();
        Peer {
            framed: Framed::new(stream, frame_codec(DEFAULT_MAX_FRAME_LEN)),
        }
    }
}

impl Peer {
    /// The client's next frame other than a heartbeat.
    async fn recv(&mut self) -> ClientFrame {
        next_frame(&mut self.framed).await
    }

    async fn ack(&mut self) -> u64 {
        next_ack(&mut self.framed).await
    }

    async fn acks_up_to(&mut self, seq: u64) {
        acks_up_to(&mut self.framed, seq).await
    }

    async fn send(&mut self, frame: ServerFrame) {
        self.framed.send(frame.encode()).await.unwrap();
    }

    async fn push(&mut self, id: u64, seq: Option<u64>) {
        self.send(push_frame(id, seq)).await;
    }
}

type Frames = dyn futures_util::Stream<Item = Result<bytes::BytesMut, std::io::Error>> + Unpin;

/// The client's next frame other than a heartbeat.
async fn next_frame(frames: &mut Frames) -> ClientFrame {
    loop {
        let bytes = tokio::time::timeout(WAIT, frames.next())
            .await
            .expect("a frame in time")
            .expect("connection open")
            .unwrap();
        match ClientFrame::decode(&bytes).unwrap() {
            ClientFrame::Heartbeat {} => continue,
            frame => return frame,
        }
    }
}

/// The position of the client's next frame, which must be a cumulative ack.
async fn next_ack(frames: &mut Frames) -> u64 {
    match next_frame(frames).await {
        ClientFrame::Ack {
            seq: Some(seq),
            id: None,
        } => seq,
        other => panic!("expected an ack, got {other:?}"),
    }
}

/// Reads acks until one reaches `seq`; they must not decrease nor pass it.
async fn acks_up_to(frames: &mut Frames, seq: u64) {
    let mut last = 0;
    loop {
        let ack = next_ack(frames).await;
        assert!(
            ack >= last && ack <= seq,
            "ack {ack} after {last}, up to {seq}"
        );
        if ack == seq {
            return;
        }
        last = ack;
    }
}

fn push_frame(id: u64, seq: Option<u64>) -> ServerFrame {
    ServerFrame::Push {
        id: MessageId(id),
        seq,
        from: Some("bob".into()),
        to: if seq.is_some() { "alice" } else { "*" }.into(),
        channel: None,
        client_msg_id: None,
        body: Body::from_json(id.to_string()).unwrap(),
        ts: 1,
    }
}

fn login_result(session: &str, resumed: bool, cursor: u64) -> ServerFrame {
    ServerFrame::LoginResult {
        session_id: session.into(),
        session_expires_at_ms: 0,
        resumed,
        cursor,
        heartbeat_ms: 60_000,
        idle_timeout_ms: 180_000,
        node_id: "node-1".into(),
        user_id: "alice".into(),
        server_time_ms: 0,
        protocol: 1,
    }
}

async fn next_event(events: &mut mpsc::Receiver<Event>) -> Event {
    tokio::time::timeout(WAIT, events.recv())
        .await
        .expect("an event in time")
        .expect("client running")
}

async fn expect_message(events: &mut mpsc::Receiver<Event>, id: u64, seq: Option<u64>) {
    match next_event(events).await {
        Event::Message(m) => {
            assert_eq!((m.id, m.seq), (MessageId(id), seq));
            assert_eq!(m.body.get(), id.to_string());
        }
        other => panic!("expected message {id}, got {other:?}"),
    }
}

async fn expect_connected(
    events: &mut mpsc::Receiver<Event>,
    session: &str,
    was_resumed: bool,
    at: u64,
) {
    match next_event(events).await {
        Event::Connected {
            session_id,
            resumed,
            cursor,
            node_id,
        } => {
            assert_eq!(
                (session_id.as_str(), resumed, cursor, node_id.as_str()),
                (session, was_resumed, at, "node-1")
            );
        }
        other => panic!("expected connected, got {other:?}"),
    }
}

fn config(endpoint: Endpoint, initial_backoff: Duration) -> ClientConfig {
    let mut config = ClientConfig::new(vec![endpoint], "token-1", "phone-1", "app");
    config.backoff = Backoff {
        initial: initial_backoff,
        max: initial_backoff * 4,
        jitter: 0.0,
    };
    config
}

/// A client logged in to a fake server as session "s1" (10 ms reconnect backoff).
async fn logged_in() -> (FakeServer, Client, mpsc::Receiver<Event>, Peer) {
    let (server, endpoint) = FakeServer::start().await;
    let (client, mut events) = Client::start(config(endpoint, Duration::from_millis(10)));
    let mut peer = server.accept().await;
    assert!(matches!(peer.recv().await, ClientFrame::Login { .. }));
    peer.send(login_result("s1", false, 0)).await;
    expect_connected(&mut events, "s1", false, 0).await;
    (server, client, events, peer)
}

#[tokio::test]
async fn resumes_replays_in_order_and_falls_back_to_login() {
    let (server, endpoint) = FakeServer::start().await;
    let (client, mut events) = Client::start(config(endpoint, Duration::from_millis(800)));

    // A fresh client logs in with its token and no position.
    let mut peer = server.accept().await;
    match peer.recv().await {
        ClientFrame::Login {
            token,
            device_id,
            channel,
            last_seq,
            ..
        } => assert_eq!(
            (
                token.as_str(),
                device_id.as_str(),
                channel.as_str(),
                last_seq
            ),
            ("token-1", "phone-1", "app", None)
        ),
        other => panic!("{other:?}"),
    }
    peer.send(login_result("s1", false, 0)).await;
    expect_connected(&mut events, "s1", false, 0).await;
    peer.push(101, Some(1)).await;
    peer.push(102, Some(2)).await;
    peer.send(ServerFrame::CaughtUp { seq: 2 }).await;
    expect_message(&mut events, 101, Some(1)).await;
    expect_message(&mut events, 102, Some(2)).await;
    assert!(matches!(
        next_event(&mut events).await,
        Event::CaughtUp { seq: 2 }
    ));
    peer.acks_up_to(2).await;
    assert_eq!(client.last_seq(), 2);
    assert_eq!(client.session_id().as_deref(), Some("s1"));

    // A retransmission is not handed over again, but acknowledged again.
    peer.push(102, Some(2)).await;
    assert_eq!(peer.ack().await, 2);
    // A broadcast twice reaches the application once and is not acknowledged.
    peer.push(900, None).await;
    peer.push(900, None).await;
    peer.push(103, Some(3)).await;
    expect_message(&mut events, 900, None).await;
    expect_message(&mut events, 103, Some(3)).await;
    assert_eq!(peer.ack().await, 3);

    // The node shuts down: the client comes back soon and resumes with what it holds.
    peer.send(ServerFrame::kick(KickReason::Shutdown)).await;
    drop(peer);
    assert!(matches!(
        next_event(&mut events).await,
        Event::Kicked {
            reason: KickReason::Shutdown
        }
    ));
    assert!(matches!(
        next_event(&mut events).await,
        Event::Disconnected { .. }
    ));
    let mut peer = server.accept().await;
    match peer.recv().await {
        ClientFrame::Resume {
            session_id,
            device_id,
            last_seq,
            ..
        } => assert_eq!(
            (session_id.as_str(), device_id.as_str(), last_seq),
            ("s1", "phone-1", Some(3))
        ),
        other => panic!("{other:?}"),
    }
    peer.send(login_result("s2", true, 3)).await;
    expect_connected(&mut events, "s2", true, 3).await;
    assert_eq!(client.session_id().as_deref(), Some("s2"), "rotated");
    peer.push(105, Some(5)).await;
    peer.send(ServerFrame::CaughtUp { seq: 5 }).await;
    expect_message(&mut events, 105, Some(5)).await;
    assert!(matches!(
        next_event(&mut events).await,
        Event::CaughtUp { seq: 5 }
    ));
    assert_eq!(peer.ack().await, 5);

    // Kicked for missing acks: resume with the rotated id, which the server no longer knows.
    peer.send(ServerFrame::kick(KickReason::AckTimeout)).await;
    drop(peer);
    assert!(matches!(
        next_event(&mut events).await,
        Event::Kicked {
            reason: KickReason::AckTimeout
        }
    ));
    assert!(matches!(
        next_event(&mut events).await,
        Event::Disconnected { .. }
    ));
    let mut peer = server.accept().await;
    match peer.recv().await {
        ClientFrame::Resume {
            session_id,
            last_seq,
            ..
        } => assert_eq!((session_id.as_str(), last_seq), ("s2", Some(5))),
        other => panic!("{other:?}"),
    }
    peer.send(ServerFrame::error(
        ErrorCode::SessionExpired,
        "no such session",
    ))
    .await;
    drop(peer);
    // At once (the backoff would be 1.6 s now), with the token and the position.
    let refused = Instant::now();
    let mut peer = server.accept().await;
    assert!(refused.elapsed() < Duration::from_millis(500));
    match peer.recv().await {
        ClientFrame::Login {
            token, last_seq, ..
        } => assert_eq!((token.as_str(), last_seq), ("token-1", Some(5))),
        other => panic!("{other:?}"),
    }
    // The server's record of the device is ahead; some positions expired meanwhile.
    peer.send(login_result("s3", false, 9)).await;
    expect_connected(&mut events, "s3", false, 9).await;
    assert_eq!(client.last_seq(), 9);
    peer.send(ServerFrame::Expired {
        from_seq: 10,
        to_seq: 12,
    })
    .await;
    peer.push(113, Some(13)).await;
    peer.push(111, Some(11)).await;
    peer.send(ServerFrame::CaughtUp { seq: 13 }).await;
    assert!(matches!(
        next_event(&mut events).await,
        Event::Expired {
            from_seq: 10,
            to_seq: 12
        }
    ));
    expect_message(&mut events, 113, Some(13)).await;
    assert!(matches!(
        next_event(&mut events).await,
        Event::CaughtUp { seq: 13 }
    ));
    // Acked once for 13, then again for the stale 11 (perhaps coalesced into one).
    assert_eq!(peer.ack().await, 13);
    assert_eq!(client.last_seq(), 13);

    // Another login of the user took over: the session is revoked and the client stops.
    peer.send(ServerFrame::kick(KickReason::DuplicateLogin))
        .await;
    assert!(matches!(
        next_event(&mut events).await,
        Event::Kicked {
            reason: KickReason::DuplicateLogin
        }
    ));
    assert!(tokio::time::timeout(WAIT, events.recv())
        .await
        .unwrap()
        .is_none());
    assert_eq!(client.session_id(), None);
}

#[tokio::test]
async fn without_resume_every_connection_logs_in_with_its_position() {
    let (server, endpoint) = FakeServer::start().await;
    let mut config = config(endpoint, Duration::from_millis(10));
    config.resume = false;
    let (client, mut events) = Client::start(config);
    let mut peer = server.accept().await;
    assert!(matches!(
        peer.recv().await,
        ClientFrame::Login { last_seq: None, .. }
    ));
    peer.send(login_result("s1", false, 0)).await;
    expect_connected(&mut events, "s1", false, 0).await;
    peer.push(104, Some(4)).await;
    expect_message(&mut events, 104, Some(4)).await;
    assert_eq!(peer.ack().await, 4);
    drop(peer);
    assert!(matches!(
        next_event(&mut events).await,
        Event::Disconnected { .. }
    ));
    let mut peer = server.accept().await;
    assert!(matches!(
        peer.recv().await,
        ClientFrame::Login {
            last_seq: Some(4),
            ..
        }
    ));
    // Kicked by an operator: the session is revoked.
    peer.send(login_result("s2", false, 4)).await;
    expect_connected(&mut events, "s2", false, 4).await;
    peer.send(ServerFrame::kick(KickReason::Admin)).await;
    drop(peer);
    assert!(matches!(
        next_event(&mut events).await,
        Event::Kicked {
            reason: KickReason::Admin
        }
    ));
    assert!(matches!(
        next_event(&mut events).await,
        Event::Disconnected { .. }
    ));
    let mut peer = server.accept().await;
    assert!(matches!(peer.recv().await, ClientFrame::Login { .. }));
    assert_eq!(client.session_id(), None);
    // Logging out sends what is owed, then `logout`.
    peer.send(login_result("s3", false, 4)).await;
    expect_connected(&mut events, "s3", false, 4).await;
    assert_eq!(client.session_id().as_deref(), Some("s3"));
    client.close().await;
    assert!(matches!(peer.recv().await, ClientFrame::Logout {}));
    assert_eq!(client.session_id(), None);
}

#[tokio::test]
async fn admin_kick_revokes_the_session_so_the_next_connection_logs_in() {
    let (server, client, mut events, mut peer) = logged_in().await;
    peer.push(101, Some(1)).await;
    expect_message(&mut events, 101, Some(1)).await;
    assert_eq!(peer.ack().await, 1);
    peer.send(ServerFrame::kick(KickReason::Admin)).await;
    drop(peer);
    let mut peer = server.accept().await;
    assert!(matches!(
        peer.recv().await,
        ClientFrame::Login {
            last_seq: Some(1),
            ..
        }
    ));
    assert_eq!(client.session_id(), None);
}

#[tokio::test]
async fn another_devices_session_falls_back_to_login_and_server_errors_retry() {
    let (server, client, mut events, peer) = logged_in().await;
    drop(peer);
    assert!(matches!(
        next_event(&mut events).await,
        Event::Disconnected { .. }
    ));
    let mut peer = server.accept().await;
    assert!(matches!(peer.recv().await, ClientFrame::Resume { .. }));
    peer.send(ServerFrame::error(ErrorCode::InvalidDevice, "other device"))
        .await;
    drop(peer);
    // A transient server error while logging in is retried, not taken as a refusal.
    let mut peer = server.accept().await;
    assert!(matches!(peer.recv().await, ClientFrame::Login { .. }));
    assert_eq!(client.session_id(), None);
    peer.send(ServerFrame::error(ErrorCode::Internal, "oops"))
        .await;
    drop(peer);
    assert!(matches!(
        next_event(&mut events).await,
        Event::Disconnected { .. }
    ));
    let mut peer = server.accept().await;
    assert!(matches!(peer.recv().await, ClientFrame::Login { .. }));
    peer.send(login_result("s2", false, 0)).await;
    expect_connected(&mut events, "s2", false, 0).await;
}

#[tokio::test]
async fn a_send_without_receipt_is_sent_again_as_a_retry_after_reconnecting() {
    let (server, client, _events, mut peer) = logged_in().await;
    let sending = tokio::spawn({
        let client = client.clone();
        async move {
            client
                .send("bob", Body::from_json("1".to_owned()).unwrap())
                .await
        }
    });
    let first_id = match peer.recv().await {
        ClientFrame::Send {
            client_msg_id,
            retry,
            ..
        } => {
            assert!(!retry, "a first attempt is not a retry");
            client_msg_id
        }
        other => panic!("expected a send, got {other:?}"),
    };
    // The connection drops before the receipt.
    drop(peer);
    let mut peer = server.accept().await;
    assert!(matches!(peer.recv().await, ClientFrame::Resume { .. }));
    peer.send(login_result("s2", true, 0)).await;
    match peer.recv().await {
        ClientFrame::Send {
            client_msg_id,
            retry,
            ..
        } => assert_eq!((client_msg_id.as_str(), retry), (first_id.as_str(), true)),
        other => panic!("expected the send again, got {other:?}"),
    }
    peer.send(ServerFrame::SendResult {
        client_msg_id: first_id,
        id: Some(MessageId(7)),
        status: SendStatus::Delivered,
        connections: 0,
        reason: None,
        retry_after_ms: None,
    })
    .await;
    let receipt = tokio::time::timeout(WAIT, sending)
        .await
        .expect("a receipt in time")
        .unwrap()
        .unwrap();
    assert_eq!(receipt.id, Some(MessageId(7)));
}

#[tokio::test]
async fn a_burst_is_acknowledged_at_least_every_32_messages() {
    let (server, endpoint) = FakeServer::start().await;
    let (_client, mut events) = Client::start(config(endpoint, Duration::from_millis(10)));
    let mut peer = server.accept().await;
    peer.recv().await;
    peer.send(login_result("s1", false, 0)).await;
    expect_connected(&mut events, "s1", false, 0).await;
    // Written in one go, so that most of them wait in the client's buffer together.
    for seq in 1..=200u64 {
        let frame = push_frame(1000 + seq, Some(seq)).encode();
        peer.framed.feed(frame).await.unwrap();
    }
    SinkExt::<bytes::Bytes>::flush(&mut peer.framed)
        .await
        .unwrap();
    let reader = tokio::spawn(async move {
        for seq in 1..=200u64 {
            match next_event(&mut events).await {
                Event::Message(m) => {
                    assert_eq!((m.id, m.seq), (MessageId(1000 + seq), Some(seq)))
                }
                other => panic!("{other:?}"),
            }
        }
    });
    let mut last = 0;
    while last < 200 {
        let ack = peer.ack().await;
        assert!(
            ack > last && ack - last <= u64::from(ACK_EVERY),
            "{last} → {ack}"
        );
        last = ack;
    }
    reader.await.unwrap();
}

#[tokio::test]
async fn a_slow_application_does_not_hold_back_acks_of_what_it_was_given() {
    let (server, endpoint) = FakeServer::start().await;
    let (_client, mut events) = Client::start(config(endpoint, Duration::from_millis(10)));
    let mut peer = server.accept().await;
    peer.recv().await;
    peer.send(login_result("s1", false, 0)).await;
    // Nobody reads events: `connected` and 1023 messages fill the stream (1024), the 1024th
    // message waits. The last handed-over one, 1023, is not a multiple of 32, so only the
    // ack before waiting can acknowledge it.
    let total = 1100u64;
    let (mut sink, mut stream) = peer.framed.split();
    let writer = tokio::spawn(async move {
        for seq in 1..=total {
            sink.send(push_frame(seq, Some(seq)).encode())
                .await
                .unwrap();
        }
        sink
    });
    acks_up_to(&mut stream, 1023).await;
    // Once the application reads again, the rest follows.
    expect_connected(&mut events, "s1", false, 0).await;
    for seq in 1..=total {
        expect_message(&mut events, seq, Some(seq)).await;
    }
    acks_up_to(&mut stream, total).await;
    let _sink = writer.await.unwrap();
}
