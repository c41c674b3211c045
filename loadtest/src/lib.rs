//! imgate-loadtest: the load test of imgate (and of a Socket.IO peer, for comparison).
//!
//! Scenarios (subcommands): `connect` (connections, login rate, memory per connection), `chat`
//! (messages between users: receipts, delivered, lost, duplicated, throughput, latency),
//! `broadcast` (admin broadcasts: deliveries per second, latency) and `soak` (a cluster of its own
//! under traffic and injected faults: nothing stored lost, doubled or reordered; see [`soak`]). `loadtest/README.md` has the
//! usage.
//!
//! Where things live: [`cli`] (options), [`run`](mod@run) (the coordinator: phases, reading the
//! system's memory, CPU and Redis counters), [`procs`] (the workers, in this process or in child
//! processes), [`progress`] (progress output), [`worker`] (one process's share of the
//! connections), [`conn`] (a lean TCP/WebSocket client socket), [`wire`] (imgate frames and
//! Socket.IO packets), [`targets`] (endpoints, loopback check, alloc), [`gateway`] (admin API,
//! /proc), [`redis_info`] (Redis work), [`hist`] (HdrHistogram), [`report`] (JSON and Markdown),
//! [`chart`] (SVG), [`fault`] (proxies that cut or freeze links, a Redis of one's own), [`plan`] (what workers are told and tell back), [`token`] (login JWTs).

pub mod chart;
pub mod cli;
pub mod conn;
pub mod fault;
pub mod gateway;
pub mod hist;
pub mod plan;
pub mod procs;
pub mod progress;
pub mod redis_info;
pub mod report;
pub mod run;
pub mod soak;
pub mod targets;
pub mod token;
pub mod wire;
pub mod worker;

pub use cli::Cli;
pub use procs::raise_nofile_limit;
pub use report::Report;
pub use run::{run, RunOptions};

/// Microseconds since the Unix epoch.
pub fn now_us() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_micros() as u64)
        .unwrap_or(0)
}

/// Locks `m`, taking the value over from a holder that panicked (these mutexes guard counters
/// and lists that stay consistent at every step).
pub(crate) fn lock<T>(m: &std::sync::Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|e| e.into_inner())
}
