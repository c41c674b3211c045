//! Fault fixtures shared by the soak scenario and the gateway's tests: a TCP [`proxy`] that cuts,
//! blocks or freezes the links passing through it, and a [`redis`] server of one's own that can be
//! killed and restarted empty.

pub mod proxy;
pub mod redis;

pub use proxy::Proxy;
pub use redis::PrivateRedis;

/// A loopback port that was free a moment ago (bound to port 0, then released).
pub fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .and_then(|l| l.local_addr())
        .map(|a| a.port())
        .expect("a free loopback port")
}
