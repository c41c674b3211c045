//! The admin API: every route, bearer auth, JSON errors, and the documents that describe it.

mod common;

use std::collections::BTreeSet;

use common::{metric_value, TestNode, ADMIN_TOKEN};
use imgate::api::ROUTES;
use imgate_shared::{KickReason, ServerFrame};
use reqwest::Method;
use serde_json::{json, Value};

#[tokio::test]
async fn health_readiness_and_metrics_need_no_token() {
    let node = TestNode::start().await;
    for (path, expect) in [("/healthz", "ok"), ("/readyz", "ready")] {
        let resp = node.http.get(node.url(path)).send().await.unwrap();
        assert_eq!(resp.status(), 200);
        assert_eq!(resp.json::<Value>().await.unwrap()["status"], expect);
    }
    let text = node.metrics().await;
    assert!(text.contains("# TYPE imgate_connections gauge"), "{text}");
    node.stop().await;
}

#[tokio::test]
async fn protected_routes_refuse_missing_or_wrong_tokens() {
    let node = TestNode::start().await;
    let protected = [
        (Method::POST, "/api/v1/messages"),
        (Method::POST, "/api/v1/broadcast"),
        (Method::DELETE, "/api/v1/users/alice/connections"),
        (Method::GET, "/api/v1/users/alice/presence"),
        (Method::GET, "/api/v1/stats"),
    ];
    for (method, path) in protected {
        for auth in [None, Some("wrong"), Some("")] {
            let mut req = node
                .http
                .request(method.clone(), node.url(path))
                .json(&json!({"to": "a", "body": 1}));
            if let Some(token) = auth {
                req = req.bearer_auth(token);
            }
            let resp = req.send().await.unwrap();
            assert_eq!(resp.status(), 401, "{method} {path} with {auth:?}");
            assert_eq!(resp.headers()["www-authenticate"], "Bearer");
            assert_eq!(resp.json::<Value>().await.unwrap()["error"], "unauthorized");
        }
    }
    let text = node.metrics().await;
    assert_eq!(
        metric_value(
            &text,
            "imgate_admin_requests_total",
            &["route=\"/api/v1/stats\"", "status=\"401\""]
        ),
        3.0
    );
    node.stop().await;
}

#[tokio::test]
async fn send_reaches_online_users_and_reports_each_recipient() {
    let node = TestNode::start().await;
    let mut bob = node.login(&node.ws(), "bob", "web").await;
    let mut carol = node.login(&node.tcp(), "carol", "app").await;
    let (status, reply) = node
        .admin_json(
            Method::POST,
            "/api/v1/messages",
            Some(
                json!({"to": ["bob", "carol", "dave", "bob"], "body": {"text": "from the system"}}),
            ),
        )
        .await;
    assert_eq!(status, 200, "{reply}");
    let results: Vec<(String, String, u64)> = reply["results"]
        .as_array()
        .unwrap()
        .iter()
        .map(|r| {
            (
                r["user_id"].as_str().unwrap().into(),
                r["status"].as_str().unwrap().into(),
                r["connections"].as_u64().unwrap(),
            )
        })
        .collect();
    assert_eq!(
        results,
        vec![
            ("bob".into(), "delivered".into(), 1),
            ("carol".into(), "delivered".into(), 1),
            ("dave".into(), "stored".into(), 0)
        ]
    );
    let ids: Vec<String> = reply["results"]
        .as_array()
        .unwrap()
        .iter()
        .map(|r| r["id"].as_str().unwrap().to_owned())
        .collect();
    assert_eq!(
        ids.iter().collect::<std::collections::HashSet<_>>().len(),
        3,
        "one id per recipient"
    );
    for (c, id) in [(&mut bob, &ids[0]), (&mut carol, &ids[1])] {
        match c.recv().await {
            Some(ServerFrame::Push {
                id: pushed,
                from,
                body,
                ..
            }) => {
                assert_eq!(&pushed.to_string(), id);
                assert_eq!(from, None, "a system message has no sender");
                assert_eq!(
                    body.parse::<Value>().unwrap(),
                    json!({"text": "from the system"})
                );
            }
            other => panic!("{other:?}"),
        }
    }
    // On behalf of a user, to one channel type.
    let (status, reply) = node
        .admin_json(
            Method::POST,
            "/api/v1/messages",
            Some(json!({"to": "bob", "from": "alice", "channel": "web", "body": "hi"})),
        )
        .await;
    assert_eq!(
        (status, reply["results"][0]["status"].as_str()),
        (200, Some("delivered"))
    );
    let (from, _, body) = bob.recv_push().await;
    assert_eq!((from.as_deref(), body), (Some("alice"), json!("hi")));
    node.stop().await;
}

#[tokio::test]
async fn bad_bodies_get_400_with_a_json_error() {
    let node = TestNode::start().await;
    let cases: Vec<(&str, Value)> = vec![
        ("/api/v1/messages", json!({"body": 1})),
        ("/api/v1/messages", json!({"to": "bob"})),
        ("/api/v1/messages", json!({"to": [], "body": 1})),
        ("/api/v1/messages", json!({"to": [""], "body": 1})),
        ("/api/v1/messages", json!({"to": "*", "body": 1})),
        (
            "/api/v1/messages",
            json!({"to": "bob", "body": 1, "channel": "toaster"}),
        ),
        (
            "/api/v1/messages",
            json!({"to": "bob", "body": 1, "from": ""}),
        ),
        (
            "/api/v1/messages",
            json!({"to": "bob", "body": 1, "surprise": true}),
        ),
        ("/api/v1/messages", json!({"to": 42, "body": 1})),
        (
            "/api/v1/broadcast",
            json!({"channel": "toaster", "body": 1}),
        ),
        ("/api/v1/broadcast", json!({})),
    ];
    for (path, body) in cases {
        let (status, reply) = node
            .admin_json(Method::POST, path, Some(body.clone()))
            .await;
        assert!(
            status == 400 || status == 422,
            "{path} {body}: {status} {reply}"
        );
        assert!(
            reply["error"].is_string() && reply["message"].is_string(),
            "{reply}"
        );
    }
    let too_many: Vec<String> = (0..1001).map(|i| format!("u{i}")).collect();
    let (status, _) = node
        .admin_json(
            Method::POST,
            "/api/v1/messages",
            Some(json!({"to": too_many, "body": 1})),
        )
        .await;
    assert_eq!(status, 400);
    // Not JSON at all, and no content type.
    let resp = node
        .admin(Method::POST, "/api/v1/messages")
        .header("content-type", "application/json")
        .body("{nope")
        .send()
        .await
        .unwrap();
    assert_eq!(resp.status(), 400);
    assert!(resp.json::<Value>().await.unwrap()["error"].is_string());
    let resp = node
        .admin(Method::POST, "/api/v1/messages")
        .body("{}")
        .send()
        .await
        .unwrap();
    assert_eq!(resp.status(), 415);
    let (status, reply) = node
        .admin_json(
            Method::DELETE,
            "/api/v1/users/bob/connections?channel=toaster",
            None,
        )
        .await;
    assert_eq!(
        (status, reply["error"].as_str()),
        (400, Some("bad_request"))
    );
    let (status, reply) = node.admin_json(Method::GET, "/api/v1/nope", None).await;
    assert_eq!((status, reply["error"].as_str()), (404, Some("not_found")));
    let (status, reply) = node.admin_json(Method::PUT, "/api/v1/stats", None).await;
    assert_eq!(
        (status, reply["error"].as_str()),
        (405, Some("method_not_allowed"))
    );
    node.stop().await;
}

#[tokio::test]
async fn broadcast_reaches_every_connection_once() {
    let node = TestNode::start().await;
    let mut clients = [
        node.login(&node.tcp(), "a", "app").await,
        node.login(&node.ws(), "a", "web").await,
        node.login(&node.tcp(), "b", "pc").await,
    ];
    let (status, reply) = node
        .admin_json(
            Method::POST,
            "/api/v1/broadcast",
            Some(json!({"body": {"notice": "maintenance"}})),
        )
        .await;
    assert_eq!((status, reply["connections"].as_u64()), (200, Some(3)));
    for c in clients.iter_mut() {
        let (from, to, body) = c.recv_push().await;
        assert_eq!(
            (from, to.as_str(), body),
            (None, "*", json!({"notice": "maintenance"}))
        );
    }
    let (_, reply) = node
        .admin_json(
            Method::POST,
            "/api/v1/broadcast",
            Some(json!({"channel": "web", "body": 2})),
        )
        .await;
    assert_eq!(reply["connections"], 1);
    assert_eq!(clients[1].recv_push().await.2, json!(2));
    let text = node.metrics().await;
    assert_eq!(
        metric_value(&text, "imgate_broadcast_deliveries_total", &[]),
        4.0
    );
    node.stop().await;
}

#[tokio::test]
async fn kick_presence_and_stats() {
    let node = TestNode::start().await;
    let mut app = node.login(&node.tcp(), "bob", "app").await;
    let mut web = node.login(&node.ws(), "bob", "web").await;

    let (status, p) = node
        .admin_json(Method::GET, "/api/v1/users/bob/presence", None)
        .await;
    assert_eq!(status, 200);
    assert_eq!(p["online"], true);
    let mut seen: Vec<(String, String, String)> = p["connections"]
        .as_array()
        .unwrap()
        .iter()
        .map(|c| {
            (
                c["channel"].as_str().unwrap().into(),
                c["transport"].as_str().unwrap().into(),
                c["node_id"].as_str().unwrap().into(),
            )
        })
        .collect();
    seen.sort();
    assert_eq!(
        seen,
        vec![
            ("app".into(), "tcp".into(), "node-1".into()),
            ("web".into(), "ws".into(), "node-1".into())
        ]
    );
    assert!(p["connections"][0]["connected_since_ms"].as_u64().unwrap() > 1_700_000_000_000);

    let (status, stats) = node.admin_json(Method::GET, "/api/v1/stats", None).await;
    assert_eq!(status, 200);
    assert_eq!(
        (stats["connections"].as_u64(), stats["users"].as_u64()),
        (Some(2), Some(1))
    );
    assert_eq!(
        stats["connections_by_transport"],
        json!({"tcp": 1, "ws": 1})
    );
    assert_eq!(stats["node_id"], "node-1");

    let (status, k) = node
        .admin_json(
            Method::DELETE,
            "/api/v1/users/bob/connections?channel=web",
            None,
        )
        .await;
    assert_eq!((status, k["kicked"].as_u64()), (200, Some(1)));
    let frames = web.until_closed().await;
    assert!(
        matches!(
            frames.as_slice(),
            [ServerFrame::Kick {
                reason: KickReason::Admin,
                ..
            }]
        ),
        "{frames:?}"
    );
    let (_, k) = node
        .admin_json(Method::DELETE, "/api/v1/users/bob/connections", None)
        .await;
    assert_eq!(k["kicked"], 1);
    app.until_closed().await;
    let (_, p) = node
        .admin_json(Method::GET, "/api/v1/users/bob/presence", None)
        .await;
    assert_eq!(
        p,
        json!({"user_id": "bob", "online": false, "connections": []})
    );
    let (_, k) = node
        .admin_json(Method::DELETE, "/api/v1/users/nobody/connections", None)
        .await;
    assert_eq!(k["kicked"], 0);
    node.stop().await;
}

#[tokio::test]
async fn readiness_turns_off_at_shutdown() {
    let node = TestNode::start_with(|s| s.shutdown.grace_ms = 10_000).await;
    // A client that ignores the KICK keeps the node draining, so /readyz can be observed.
    let mut c = node.login(&node.tcp(), "alice", "app").await;
    node.shutdown.cancel();
    assert!(matches!(c.recv().await, Some(ServerFrame::Kick { .. })));
    let resp = node.http.get(node.url("/readyz")).send().await;
    if let Ok(resp) = resp {
        // Still serving while connections drain: it must say not ready.
        assert_eq!(resp.status(), 503);
        assert_eq!(resp.json::<Value>().await.unwrap()["status"], "not_ready");
    }
    drop(c);
    tokio::time::timeout(common::WAIT, node.task)
        .await
        .unwrap()
        .unwrap()
        .unwrap();
}

#[tokio::test]
async fn openapi_document_is_served_and_matches_the_routes() {
    let node = TestNode::start().await;
    let served: Value = node
        .http
        .get(node.url("/api/v1/openapi.json"))
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    let file: Value = serde_json::from_str(
        &std::fs::read_to_string(concat!(env!("CARGO_MANIFEST_DIR"), "/../docs/openapi.json"))
            .unwrap(),
    )
    .unwrap();
    assert_eq!(served, file, "the served document is docs/openapi.json");
    assert!(file["openapi"].as_str().unwrap().starts_with("3."));
    let documented: BTreeSet<(String, String)> = file["paths"]
        .as_object()
        .unwrap()
        .iter()
        .flat_map(|(path, item)| {
            item.as_object()
                .unwrap()
                .keys()
                .filter(|k| ["get", "post", "put", "delete", "patch"].contains(&k.as_str()))
                .map(move |m| (m.clone(), path.clone()))
        })
        .collect();
    let routed: BTreeSet<(String, String)> = ROUTES
        .iter()
        .map(|(m, p)| (m.to_string(), p.to_string()))
        .collect();
    assert_eq!(
        documented, routed,
        "docs/openapi.json and api::ROUTES differ"
    );
    // Every route in ROUTES is really served (not 404/405) by the router.
    for (method, path) in ROUTES {
        let path = path.replace("{id}", "someone");
        let m = Method::from_bytes(method.to_uppercase().as_bytes()).unwrap();
        let resp = node
            .http
            .request(m, node.url(&path))
            .bearer_auth(ADMIN_TOKEN)
            .json(&json!({"to": "x", "body": 1}))
            .send()
            .await
            .unwrap();
        assert!(
            ![404, 405].contains(&resp.status().as_u16()),
            "{method} {path}: {}",
            resp.status()
        );
    }
    node.stop().await;
}

#[test]
fn metrics_catalog_documents_every_metric() {
    let doc = std::fs::read_to_string(concat!(env!("CARGO_MANIFEST_DIR"), "/../docs/metrics.md"))
        .unwrap();
    for (name, kind) in imgate::telemetry::catalog() {
        assert!(
            doc.contains(&format!("`{name}`")),
            "docs/metrics.md lacks {name}"
        );
        assert!(doc.contains(kind), "docs/metrics.md never says {kind}");
    }
}

#[tokio::test]
async fn the_admin_port_says_starting_while_the_node_waits_for_its_services() {
    // Nothing listens on port 1: the node keeps retrying Redis.
    let mut settings = common::test_settings();
    settings.cluster.redis_url = Some(imgate::config::Secret::new("redis://127.0.0.1:1"));
    settings.cluster.connect_timeout_ms = 60_000;
    let client = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let admin = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let admin_addr = admin.local_addr().unwrap();
    let shutdown = tokio_util::sync::CancellationToken::new();
    let task = tokio::spawn(imgate::run(
        settings,
        imgate::Listeners { client, admin },
        shutdown.clone(),
    ));
    let http = reqwest::Client::new();
    let health = http
        .get(format!("http://{admin_addr}/healthz"))
        .send()
        .await
        .unwrap();
    assert_eq!(health.status(), 200);
    let ready = http
        .get(format!("http://{admin_addr}/readyz"))
        .send()
        .await
        .unwrap();
    assert_eq!(ready.status(), 503);
    assert_eq!(ready.json::<Value>().await.unwrap()["reason"], "starting");
    let api = http
        .get(format!("http://{admin_addr}/api/v1/stats"))
        .bearer_auth(ADMIN_TOKEN)
        .send()
        .await
        .unwrap();
    assert_eq!(api.status(), 503);
    // Shutdown while starting ends the node at once.
    shutdown.cancel();
    tokio::time::timeout(common::WAIT, task)
        .await
        .unwrap()
        .unwrap()
        .unwrap();
}

/// User ids and client message ids with control, format or white-space characters get 400 and
/// a message that says what an id may hold, on every route that takes one.
#[tokio::test]
async fn unprintable_ids_get_400_with_the_rule() {
    let node = TestNode::start().await;
    let bodies = [
        json!({"to": "bob\nforged", "body": 1}),
        json!({"to": ["bob", "eve\u{202e}"], "body": 1}),
        json!({"to": "bob", "from": "sys\u{0}", "body": 1}),
        json!({"to": "bob", "client_msg_id": "c\r1", "body": 1}),
        json!({"to": "bob b", "body": 1}),
    ];
    for body in bodies {
        let (status, reply) = node
            .admin_json(Method::POST, "/api/v1/messages", Some(body.clone()))
            .await;
        assert_eq!(status, 400, "{body} {reply}");
        let message = reply["message"].as_str().unwrap();
        assert!(message.contains("without control characters"), "{message}");
    }
    for path in [
        "/api/v1/users/bob%0Aforged/presence",
        "/api/v1/users/bob%E2%80%AE/messages",
        "/api/v1/users/bob/messages?peer=a%1B",
    ] {
        let (status, reply) = node.admin_json(Method::GET, path, None).await;
        assert_eq!(
            (status, reply["error"].as_str()),
            (400, Some("bad_request")),
            "{path}: {reply}"
        );
    }
    let (status, _) = node
        .admin_json(Method::DELETE, "/api/v1/users/bob%00/connections", None)
        .await;
    assert_eq!(status, 400);
    node.stop().await;
}
