//! A TCP proxy between test clients and a node, which can cut every connection passing through
//! it at once (a network failure as the client and the node see it: the socket just closes),
//! while it keeps accepting new connections; or block it (cut, and close every new connection at
//! once), like a server that went away.

use std::net::SocketAddr;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};

use imgate_shared::connection::Endpoint;
use tokio::net::{TcpListener, TcpStream};
use tokio::task::{AbortHandle, JoinHandle};

pub struct Proxy {
    pub addr: SocketAddr,
    /// The forwarding tasks of the connections accepted since the last cut.
    links: Arc<Mutex<Vec<AbortHandle>>>,
    accepted: Arc<AtomicUsize>,
    blocked: Arc<AtomicBool>,
    acceptor: JoinHandle<()>,
}

impl Proxy {
    /// Listens on a free loopback port and forwards each connection to `target`.
    pub async fn start(target: SocketAddr) -> Proxy {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let links = Arc::new(Mutex::new(Vec::new()));
        let accepted = Arc::new(AtomicUsize::new(0));
        let blocked = Arc::new(AtomicBool::new(false));
        let acceptor = tokio::spawn(accept_loop(
            listener,
            target,
            links.clone(),
            accepted.clone(),
            blocked.clone(),
        ));
        Proxy {
            addr,
            links,
            accepted,
            blocked,
            acceptor,
        }
    }

    /// A TCP endpoint that goes through the proxy.
    pub fn endpoint(&self) -> Endpoint {
        Endpoint::tcp(self.addr)
    }

    /// Connections accepted so far.
    pub fn accepted(&self) -> usize {
        self.accepted.load(Ordering::SeqCst)
    }

    /// Closes every connection open through the proxy (both of its sockets); returns how many
    /// were open. New connections are accepted as before.
    pub fn cut(&self) -> usize {
        let links = std::mem::take(&mut *lock(&self.links));
        let open = links.iter().filter(|l| !l.is_finished()).count();
        for link in links {
            // Dropping the task drops both sockets: the client and the node see them close.
            link.abort();
        }
        open
    }
}

impl Proxy {
    /// Cuts every connection and closes each new one at once, until [`unblock`](Self::unblock).
    pub fn block(&self) {
        self.blocked.store(true, Ordering::SeqCst);
        self.cut();
    }

    pub fn unblock(&self) {
        self.blocked.store(false, Ordering::SeqCst);
    }
}

impl Drop for Proxy {
    fn drop(&mut self) {
        self.acceptor.abort();
        self.cut();
    }
}

fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|e| e.into_inner())
}

async fn accept_loop(
    listener: TcpListener,
    target: SocketAddr,
    links: Arc<Mutex<Vec<AbortHandle>>>,
    accepted: Arc<AtomicUsize>,
    blocked: Arc<AtomicBool>,
) {
    loop {
        let Ok((client, _)) = listener.accept().await else {
            continue;
        };
        if blocked.load(Ordering::SeqCst) {
            drop(client);
            continue;
        }
        accepted.fetch_add(1, Ordering::SeqCst);
        let task = tokio::spawn(forward(client, target));
        // No await between the accept and this: a cut sees every accepted connection.
        let mut links = lock(&links);
        links.retain(|l| !l.is_finished());
        links.push(task.abort_handle());
    }
}

async fn forward(mut client: TcpStream, target: SocketAddr) {
    let Ok(mut server) = TcpStream::connect(target).await else {
        // The node is gone: the client sees its connection close.
        return;
    };
    let _ = client.set_nodelay(true);
    let _ = server.set_nodelay(true);
    let _ = tokio::io::copy_bidirectional(&mut client, &mut server).await;
}
