//! A TCP proxy in front of a server (a gateway node, Redis, MariaDB) that can fail the links
//! passing through it the ways a network does:
//!
//! - [`cut`](Proxy::cut): every open connection closes at once (both of its sockets), new ones are
//!   accepted as before;
//! - [`block`](Proxy::block): cut, and close each new connection at once, like a server that went
//!   away, until [`unblock`](Proxy::unblock);
//! - [`freeze`](Proxy::freeze): nothing moves either way, in open or new connections, but nothing
//!   closes either, like a stalled link or a server that stopped answering, until
//!   [`thaw`](Proxy::thaw).

use crate::lock;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};

use imgate_shared::connection::Endpoint;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::watch;
use tokio::task::{AbortHandle, JoinHandle};

pub struct Proxy {
    addr: SocketAddr,
    state: Arc<State>,
    acceptor: JoinHandle<()>,
}

struct State {
    target: SocketAddr,
    /// The forwarding tasks of the connections accepted since the last cut.
    links: Mutex<Vec<AbortHandle>>,
    accepted: AtomicUsize,
    blocked: AtomicBool,
    frozen: watch::Sender<bool>,
}

impl Proxy {
    /// Listens on a free loopback port and forwards each connection to `target`.
    pub async fn start(target: SocketAddr) -> Proxy {
        let listener = TcpListener::bind("127.0.0.1:0")
            .await
            .expect("bind a loopback port");
        Proxy::on(listener, target)
    }

    /// Forwards each connection accepted on `listener` to `target`.
    pub fn on(listener: TcpListener, target: SocketAddr) -> Proxy {
        let addr = listener.local_addr().expect("a bound listener");
        let state = Arc::new(State {
            target,
            links: Mutex::new(Vec::new()),
            accepted: AtomicUsize::new(0),
            blocked: AtomicBool::new(false),
            frozen: watch::Sender::new(false),
        });
        let acceptor = tokio::spawn(accept_loop(listener, state.clone()));
        Proxy {
            addr,
            state,
            acceptor,
        }
    }

    pub fn addr(&self) -> SocketAddr {
        self.addr
    }

    /// A TCP endpoint that goes through the proxy.
    pub fn endpoint(&self) -> Endpoint {
        Endpoint::tcp(self.addr)
    }

    /// A WebSocket endpoint (`/ws`) that goes through the proxy.
    pub fn ws_endpoint(&self) -> Endpoint {
        Endpoint::ws(self.addr)
    }

    /// Connections accepted so far.
    pub fn accepted(&self) -> usize {
        self.state.accepted.load(Ordering::SeqCst)
    }

    /// Closes every connection open through the proxy (both of its sockets); returns how many
    /// were open. New connections are accepted as before.
    pub fn cut(&self) -> usize {
        let links = std::mem::take(&mut *lock(&self.state.links));
        let open = links.iter().filter(|l| !l.is_finished()).count();
        for link in links {
            // Dropping the task drops both sockets: the client and the server see them close.
            link.abort();
        }
        open
    }

    /// Cuts every connection and closes each new one at once, until [`unblock`](Self::unblock).
    pub fn block(&self) {
        self.state.blocked.store(true, Ordering::SeqCst);
        self.cut();
    }

    pub fn unblock(&self) {
        self.state.blocked.store(false, Ordering::SeqCst);
    }

    /// Stops every byte in both directions, in open and new connections, until
    /// [`thaw`](Self::thaw). Nothing is closed.
    pub fn freeze(&self) {
        self.state.frozen.send_replace(true);
    }

    pub fn thaw(&self) {
        self.state.frozen.send_replace(false);
    }
}

impl Drop for Proxy {
    fn drop(&mut self) {
        self.acceptor.abort();
        self.cut();
    }
}

async fn accept_loop(listener: TcpListener, state: Arc<State>) {
    loop {
        let Ok((client, _)) = listener.accept().await else {
            continue;
        };
        if state.blocked.load(Ordering::SeqCst) {
            drop(client);
            continue;
        }
        state.accepted.fetch_add(1, Ordering::SeqCst);
        let task = tokio::spawn(forward(client, state.target, state.frozen.subscribe()));
        // No await between the accept and this: a cut sees every accepted connection.
        let mut links = lock(&state.links);
        links.retain(|l| !l.is_finished());
        links.push(task.abort_handle());
    }
}

async fn forward(client: TcpStream, target: SocketAddr, frozen: watch::Receiver<bool>) {
    let Ok(server) = TcpStream::connect(target).await else {
        // The server is gone: the client sees its connection close.
        return;
    };
    let _ = client.set_nodelay(true);
    let _ = server.set_nodelay(true);
    let (client_rx, client_tx) = client.into_split();
    let (server_rx, server_tx) = server.into_split();
    // Either direction ending (a close or an error) ends the link: both sockets drop.
    tokio::select! {
        _ = pump(client_rx, server_tx, frozen.clone()) => {}
        _ = pump(server_rx, client_tx, frozen) => {}
    }
}

/// Copies `from` to `to`, holding each chunk while the link is frozen (the sender then sees a full
/// window, as on a stalled link).
async fn pump(
    mut from: tokio::net::tcp::OwnedReadHalf,
    mut to: tokio::net::tcp::OwnedWriteHalf,
    mut frozen: watch::Receiver<bool>,
) {
    let mut buf = vec![0u8; 16 * 1024];
    loop {
        if frozen.wait_for(|f| !*f).await.is_err() {
            return;
        }
        let n = match from.read(&mut buf).await {
            Ok(0) | Err(_) => return,
            Ok(n) => n,
        };
        if frozen.wait_for(|f| !*f).await.is_err() {
            return;
        }
        if to.write_all(&buf[..n]).await.is_err() {
            return;
        }
    }
}
