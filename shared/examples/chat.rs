//! Two users chatting through an imgate node (or cluster) with the async client.
//!
//! ```sh
//! cargo run --release -p imgate                          # a gateway (another terminal)
//! ALICE=$(cargo run -q -p imgate -- token --user alice)
//! BOB=$(cargo run -q -p imgate -- token --user bob)
//! cargo run -p imgate-shared --example chat -- tcp://127.0.0.1:7400 ws://127.0.0.1:7400/ws "$ALICE" "$BOB"
//! ```
//!
//! Alice connects to the first endpoint and Bob to the second (they may be different nodes of a
//! cluster); they exchange a few messages and print what they receive and the receipts. Each
//! message shows its position in the recipient's stream (`#seq`). After connecting, each client
//! first receives what was sent to its user while its device was away (for example through the
//! admin API between two runs), then `caught up`. If a connection drops, the client resumes its
//! session and goes on where it stopped.

use imgate_shared::client::{Client, ClientConfig, Event};
use imgate_shared::connection::Endpoint;
use imgate_shared::protocol::Body;
use tokio::sync::mpsc;

/// Prints one event; `true` for a message.
fn show(name: &str, event: Event) -> bool {
    match event {
        Event::Connected {
            node_id,
            resumed,
            cursor,
            ..
        } => {
            let how = if resumed {
                "resumed on"
            } else {
                "connected to"
            };
            println!("{name}: {how} {node_id}, replaying after #{cursor}");
        }
        Event::Message(m) => {
            let seq = m.seq.map_or("broadcast".to_owned(), |s| format!("#{s}"));
            println!(
                "{name} <- {} ({seq}): {}",
                m.from.as_deref().unwrap_or("system"),
                m.body.get()
            );
            return true;
        }
        Event::Expired { from_seq, to_seq } => {
            println!("{name}: #{from_seq} to #{to_seq} expired before delivery")
        }
        Event::CaughtUp { seq } => println!("{name}: caught up at #{seq}"),
        Event::LoginFailed { code, message } => panic!("{name}: login failed: {code}: {message}"),
        other => println!("{name}: {other:?}"),
    }
    false
}

async fn wait_caught_up(name: &str, events: &mut mpsc::Receiver<Event>) {
    while let Some(event) = events.recv().await {
        let caught_up = matches!(event, Event::CaughtUp { .. });
        show(name, event);
        if caught_up {
            return;
        }
    }
}

async fn next_message(name: &str, events: &mut mpsc::Receiver<Event>) {
    while let Some(event) = events.recv().await {
        if show(name, event) {
            return;
        }
    }
}

#[tokio::main]
async fn main() -> Result<(), Box<dyn std::error::Error>> {
    let args: Vec<String> = std::env::args().skip(1).collect();
    let [alice_at, bob_at, alice_token, bob_token] = args.as_slice() else {
        eprintln!("usage: chat <alice endpoint> <bob endpoint> <alice token> <bob token>");
        std::process::exit(2);
    };
    let (alice, mut alice_events) = Client::start(ClientConfig::new(
        vec![alice_at.parse::<Endpoint>()?],
        alice_token.clone(),
        "alice-laptop",
        "pc",
    ));
    let (bob, mut bob_events) = Client::start(ClientConfig::new(
        vec![bob_at.parse::<Endpoint>()?],
        bob_token.clone(),
        "bob-phone",
        "app",
    ));
    wait_caught_up("alice", &mut alice_events).await;
    wait_caught_up("bob", &mut bob_events).await;

    for (i, text) in ["hi bob", "how are you?", "see you"]
        .into_iter()
        .enumerate()
    {
        let receipt = alice
            .send(
                "bob",
                Body::from_value(&serde_json::json!({ "text": text }))?,
            )
            .await?;
        println!(
            "alice -> bob: {text:?}: {:?} (id {:?})",
            receipt.status, receipt.id
        );
        next_message("bob", &mut bob_events).await;
        let reply = format!("reply {}", i + 1);
        let receipt = bob
            .send(
                "alice",
                Body::from_value(&serde_json::json!({ "text": reply }))?,
            )
            .await?;
        println!("bob -> alice: {reply:?}: {:?}", receipt.status);
        next_message("alice", &mut alice_events).await;
    }
    alice.close().await;
    bob.close().await;
    Ok(())
}
