//! Login: the first frame must be a valid LOGIN within the timeout; every failure gets an ERROR
//! with its documented code, then the connection is closed.

mod common;

use std::time::{Duration, SystemTime, UNIX_EPOCH};

use bytes::Bytes;
use common::{Client, TestNode, SECRET};
use imgate_shared::claims::Claims;
use imgate_shared::{ClientFrame, ErrorCode, ServerFrame};
use jsonwebtoken::{Algorithm, EncodingKey, Header};

fn now() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .unwrap()
        .as_secs()
}

fn sign(claims: &Claims, secret: &str) -> String {
    jsonwebtoken::encode(
        &Header::new(Algorithm::HS256),
        claims,
        &EncodingKey::from_secret(secret.as_bytes()),
    )
    .unwrap()
}

fn claims(sub: &str) -> Claims {
    Claims {
        sub: sub.into(),
        exp: now() + 600,
        nbf: None,
        iat: Some(now()),
        iss: None,
        aud: None,
    }
}

/// Asserts that the connection gets ERROR `code` and is then closed.
async fn expect_error_then_close(client: &mut Client, code: ErrorCode) {
    match client.recv().await {
        Some(ServerFrame::Error { error, code: n, .. }) => {
            assert_eq!(error, code);
            assert_eq!(n, code.code());
        }
        other => panic!("expected ERROR {code}, got {other:?}"),
    }
    assert!(
        client.recv().await.is_none(),
        "connection closed after the error"
    );
}

#[tokio::test]
async fn login_succeeds_over_tcp_and_websocket() {
    let node = TestNode::start().await;
    for endpoint in [node.tcp(), node.ws()] {
        let mut c = Client::connect(&endpoint).await;
        match c.login(&node.token("alice"), "app", None).await {
            ServerFrame::LoginResult {
                session_id,
                heartbeat_ms,
                node_id,
                user_id,
                server_time_ms,
                protocol,
                idle_timeout_ms,
                session_expires_at_ms,
                resumed,
                cursor,
            } => {
                assert_eq!(session_id.len(), 32, "128 bits in hex");
                assert!(!resumed);
                assert_eq!(cursor, 0, "a new device has received nothing");
                let ttl = node.settings.delivery.session_ttl_secs * 1000;
                assert!(session_expires_at_ms >= server_time_ms + ttl - 5_000);
                assert!(session_expires_at_ms <= server_time_ms + ttl + 5_000);
                assert_eq!(heartbeat_ms, node.settings.heartbeat.default_ms);
                assert_eq!(
                    idle_timeout_ms,
                    heartbeat_ms * u64::from(node.settings.heartbeat.missed)
                );
                assert_eq!(node_id, "node-1");
                assert_eq!(user_id, "alice");
                assert!(server_time_ms / 1000 >= now() - 5);
                assert_eq!(protocol, 1);
            }
            other => panic!("{other:?}"),
        }
    }
    node.stop().await;
}

async fn login_error(node: &TestNode, token: String, channel: &str) -> ErrorCode {
    let mut c = Client::connect(&node.tcp()).await;
    c.send(ClientFrame::Login {
        token,
        device_id: "d".into(),
        channel: channel.into(),
        client_version: None,
        heartbeat: None,
        last_seq: None,
    })
    .await;
    let code = match c.recv().await {
        Some(ServerFrame::Error { error, .. }) => error,
        other => panic!("expected an error, got {other:?}"),
    };
    assert!(c.recv().await.is_none(), "closed after the error");
    code
}

#[tokio::test]
async fn bad_signature_is_refused_over_both_transports() {
    let node = TestNode::start().await;
    for endpoint in [node.tcp(), node.ws()] {
        let mut c = Client::connect(&endpoint).await;
        let reply = c
            .login(&sign(&claims("alice"), "not-the-secret"), "app", None)
            .await;
        assert!(
            matches!(
                reply,
                ServerFrame::Error {
                    error: ErrorCode::TokenInvalid,
                    ..
                }
            ),
            "{reply:?}"
        );
        assert!(c.recv().await.is_none(), "closed after the error");
    }
    node.stop().await;
}

#[tokio::test]
async fn expired_future_and_malformed_tokens_are_refused() {
    let node = TestNode::start().await;
    let mut expired = claims("alice");
    expired.exp = now() - 3600;
    assert_eq!(
        login_error(&node, sign(&expired, SECRET), "app").await,
        ErrorCode::TokenExpired
    );
    let mut future = claims("alice");
    future.nbf = Some(now() + 3600);
    assert_eq!(
        login_error(&node, sign(&future, SECRET), "app").await,
        ErrorCode::TokenNotYetValid
    );
    assert_eq!(
        login_error(&node, "not.a.jwt".into(), "app").await,
        ErrorCode::TokenInvalid
    );
    let mut empty_sub = claims("");
    empty_sub.sub = String::new();
    assert_eq!(
        login_error(&node, sign(&empty_sub, SECRET), "app").await,
        ErrorCode::TokenInvalid
    );
    node.stop().await;
}

#[tokio::test]
async fn alg_none_is_refused() {
    use base64_url as b64;
    let node = TestNode::start().await;
    let header = b64(br#"{"alg":"none","typ":"JWT"}"#);
    let payload = b64(serde_json::to_string(&claims("mallory"))
        .unwrap()
        .as_bytes());
    for token in [
        format!("{header}.{payload}."),
        format!("{header}.{payload}"),
    ] {
        assert_eq!(
            login_error(&node, token, "app").await,
            ErrorCode::TokenInvalid
        );
    }
    node.stop().await;
}

/// Unpadded base64url, enough for forging a test token.
fn base64_url(input: &[u8]) -> String {
    const ALPHABET: &[u8] = b"ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789-_";
    let mut out = String::new();
    for chunk in input.chunks(3) {
        let b = [
            chunk[0],
            *chunk.get(1).unwrap_or(&0),
            *chunk.get(2).unwrap_or(&0),
        ];
        let n = (u32::from(b[0]) << 16) | (u32::from(b[1]) << 8) | u32::from(b[2]);
        for i in 0..=chunk.len() {
            out.push(ALPHABET[((n >> (18 - 6 * i)) & 63) as usize] as char);
        }
    }
    out
}

#[tokio::test]
async fn unknown_channel_type_is_refused() {
    let node = TestNode::start().await;
    assert_eq!(
        login_error(&node, node.token("alice"), "toaster").await,
        ErrorCode::UnknownChannel
    );
    node.stop().await;
}

#[tokio::test]
async fn a_frame_before_login_is_refused() {
    let node = TestNode::start().await;
    let mut c = Client::connect(&node.tcp()).await;
    c.send(ClientFrame::Heartbeat {}).await;
    expect_error_then_close(&mut c, ErrorCode::LoginRequired).await;
    let mut c = Client::connect(&node.ws()).await;
    c.conn
        .send_raw(Bytes::from_static(b"{not json"))
        .await
        .unwrap();
    expect_error_then_close(&mut c, ErrorCode::BadFrame).await;
    node.stop().await;
}

#[tokio::test]
async fn no_login_within_the_timeout_closes_the_connection() {
    let node = TestNode::start().await;
    // The node starts on the real clock (its store does real I/O); the test then runs on
    // paused time, which jumps ahead whenever everything waits.
    tokio::time::pause();
    let timeout = Duration::from_millis(node.settings.client.login_timeout_ms);
    for endpoint in [node.tcp(), node.ws()] {
        let started = tokio::time::Instant::now();
        let mut c = Client::connect(&endpoint).await;
        expect_error_then_close(&mut c, ErrorCode::LoginTimeout).await;
        assert!(
            started.elapsed() >= timeout,
            "not before the timeout: {:?}",
            started.elapsed()
        );
    }
    tokio::time::resume();
    node.stop().await;
}

#[tokio::test]
async fn login_twice_on_one_connection_is_an_error_but_keeps_it_open() {
    let node = TestNode::start().await;
    let mut c = node.login(&node.tcp(), "alice", "app").await;
    c.send(ClientFrame::Login {
        token: node.token("alice"),
        device_id: "d".into(),
        channel: "app".into(),
        client_version: None,
        heartbeat: None,
        last_seq: None,
    })
    .await;
    assert!(matches!(
        c.recv().await,
        Some(ServerFrame::Error {
            error: ErrorCode::AlreadyLoggedIn,
            ..
        })
    ));
    c.send(ClientFrame::Heartbeat {}).await;
    assert!(matches!(
        c.recv().await,
        Some(ServerFrame::HeartbeatAck { .. })
    ));
    node.stop().await;
}

/// The error a LOGIN with `token` and `device_id` gets: (code, message).
async fn login_refusal(node: &TestNode, token: String, device_id: &str) -> (ErrorCode, String) {
    let mut c = Client::connect(&node.tcp()).await;
    c.send(ClientFrame::Login {
        token,
        device_id: device_id.into(),
        channel: "app".into(),
        client_version: None,
        heartbeat: None,
        last_seq: None,
    })
    .await;
    let refusal = match c.recv().await {
        Some(ServerFrame::Error { error, message, .. }) => (error, message),
        other => panic!("expected an error, got {other:?}"),
    };
    assert!(c.recv().await.is_none(), "closed after the error");
    refusal
}

/// User ids (the token's `sub`) and device ids are printable: control characters (NUL, CR/LF,
/// ESC), format characters (bidi overrides, zero-width) and white space are refused.
#[tokio::test]
async fn ids_with_control_format_or_space_characters_are_refused_at_login() {
    let node = TestNode::start().await;
    let bad = [
        "eve\n2026-01-01T00:00:00Z  INFO admin logged in",
        "eve\r",
        "nul\0",
        "\u{1b}[2Jeve",
        "evil\u{202e}nimda",
        "zero\u{200b}width",
        "two words",
    ];
    for id in bad {
        let (code, message) = login_refusal(&node, sign(&claims(id), SECRET), "d").await;
        assert_eq!(code, ErrorCode::TokenInvalid, "sub {id:?}");
        assert!(message.contains("control characters"), "{message}");
        let (code, message) = login_refusal(&node, node.token("alice"), id).await;
        assert_eq!(code, ErrorCode::InvalidField, "device_id {id:?}");
        assert!(message.starts_with("device_id must be"), "{message}");
    }
    // Printable non-ASCII ids are fine.
    let mut c = Client::connect(&node.tcp()).await;
    c.send(ClientFrame::Login {
        token: sign(&claims("用户-ü"), SECRET),
        device_id: "手机".into(),
        channel: "app".into(),
        client_version: None,
        heartbeat: None,
        last_seq: None,
    })
    .await;
    match c.recv().await {
        Some(ServerFrame::LoginResult { user_id, .. }) => assert_eq!(user_id, "用户-ü"),
        other => panic!("{other:?}"),
    }
    node.stop().await;
}

/// With `auth.max_token_lifetime_secs`, a token that lives longer is refused with TOKEN_INVALID
/// and a message naming the maximum: measured from `iat`, and from now (so that a token without
/// `iat`, or with a late one, cannot pass).
#[tokio::test]
async fn tokens_longer_than_the_maximum_lifetime_are_refused() {
    let node = TestNode::start_with(|s| s.auth.max_token_lifetime_secs = Some(3600)).await;
    let t = now();
    let token = |iat: Option<u64>, exp: u64| {
        let mut c = claims("alice");
        c.iat = iat;
        c.exp = exp;
        sign(&c, SECRET)
    };
    for (iat, exp, what) in [
        (Some(t), t + 7200, "exp two hours after iat"),
        (None, t + 7200, "no iat, two hours left"),
        (Some(t + 5000), t + 7200, "a late iat"),
        (Some(t - 3600), t + 100, "issued 3700 s before its exp"),
    ] {
        let (code, message) = login_refusal(&node, token(iat, exp), "d").await;
        assert_eq!(code, ErrorCode::TokenInvalid, "{what}");
        assert!(message.contains("maximum of 3600 s"), "{what}: {message}");
    }
    for (iat, exp) in [
        (Some(t), t + 3600),
        (None, t + 600),
        (Some(t - 60), t + 3000),
    ] {
        let mut c = Client::connect(&node.tcp()).await;
        let reply = c.login(&token(iat, exp), "app", None).await;
        assert!(
            matches!(reply, ServerFrame::LoginResult { .. }),
            "{iat:?} {exp}: {reply:?}"
        );
    }
    node.stop().await;
}
