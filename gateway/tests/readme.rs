//! The README's "Any WebSocket client" walk-through, played against a node: its client frames are
//! sent as written (with a real token), and each server frame it shows must come, in that order,
//! with the same type and the same fields, of the same JSON types.

mod common;

use bytes::Bytes;
use common::TestNode;
use imgate_shared::connection::ClientConnection;
use serde_json::Value;

/// The JSON frames of the walk-through, in order.
fn walkthrough() -> Vec<Value> {
    let readme = std::fs::read_to_string(concat!(env!("CARGO_MANIFEST_DIR"), "/../README.md"))
        .expect("README.md");
    let start = readme
        .find("### Any WebSocket client")
        .expect("the walk-through's heading");
    let section = &readme[start..];
    let section = &section[..section[4..].find("\n### ").map_or(section.len(), |i| i + 4)];
    section
        .split("```json\n")
        .skip(1)
        .map(|block| {
            let json = &block[..block.find("```").expect("a closed code block")];
            serde_json::from_str(json.trim()).unwrap_or_else(|e| panic!("{json}: {e}"))
        })
        .collect()
}

const CLIENT_TYPES: &[&str] = &["login", "resume", "send", "ack", "heartbeat", "logout"];

/// `{"field": "json type"}` of a frame.
fn shape(frame: &Value) -> Vec<(String, &'static str)> {
    let mut fields: Vec<_> = frame
        .as_object()
        .expect("a frame is an object")
        .iter()
        .map(|(k, v)| {
            let kind = match v {
                Value::Null => "null",
                Value::Bool(_) => "bool",
                Value::Number(_) => "number",
                Value::String(_) => "string",
                Value::Array(_) => "array",
                Value::Object(_) => "object",
            };
            (k.clone(), kind)
        })
        .collect();
    fields.sort();
    fields
}

#[tokio::test]
async fn the_readme_walkthrough_plays_as_written() {
    let frames = walkthrough();
    let types: Vec<&str> = frames.iter().map(|f| f["type"].as_str().unwrap()).collect();
    for expected in [
        "login",
        "login_result",
        "caught_up",
        "push",
        "ack",
        "send",
        "send_result",
    ] {
        assert!(
            types.contains(&expected),
            "the walk-through shows {expected}: {types:?}"
        );
    }
    let node = TestNode::start().await;
    // alice is who carol talks to: connected, so that carol's message is `delivered`.
    let mut alice = node.login(&node.tcp(), "alice", "app").await;
    let mut carol = ClientConnection::connect(&node.ws()).await.unwrap();
    for frame in &frames {
        let kind = frame["type"].as_str().unwrap();
        if CLIENT_TYPES.contains(&kind) {
            let text = frame.to_string().replace("<the JWT>", &node.token("carol"));
            carol.send_raw(Bytes::from(text)).await.unwrap();
            continue;
        }
        if kind == "push" {
            // The message the walk-through shows arriving: alice sends it.
            let text = frame["body"]["text"].as_str().unwrap();
            alice.send_text("carol", text).await;
        }
        let got = tokio::time::timeout(common::WAIT, carol.recv_raw())
            .await
            .expect("the server answers")
            .unwrap()
            .expect("the connection stays open");
        let got: Value = serde_json::from_slice(&got).unwrap();
        assert_eq!(
            shape(&got),
            shape(frame),
            "README shows\n{frame}\nthe server sent\n{got}"
        );
        for field in ["type", "status", "user_id", "resumed", "to", "from"] {
            assert_eq!(got.get(field), frame.get(field), "{field} of\n{got}");
        }
    }
    node.stop().await;
}
