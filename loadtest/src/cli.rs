//! Command-line options. Every scenario shares [`Common`]; each adds its own knobs.

use std::path::PathBuf;

use clap::{Args, Parser, Subcommand, ValueEnum};

/// The gateway's public development JWT secret (see the top-level README).
pub const DEV_SECRET: &str = "imgate-dev-secret-do-not-use-in-production";
/// The gateway's public development admin token.
pub const DEV_ADMIN_TOKEN: &str = "imgate-dev-admin-token";

#[derive(Parser, Debug, Clone)]
#[command(
    name = "imgate-loadtest",
    version,
    about = "Load test for imgate (and a Socket.IO peer): connections and memory, login rate, chat throughput and latency, broadcast fan-out",
    long_about = "Load test for imgate (and a Socket.IO peer).\n\nEvery run is bounded in count and time and stops by itself. Only loopback targets are accepted. See loadtest/README.md."
)]
pub struct Cli {
    #[command(subcommand)]
    pub command: Command,
}

#[derive(Subcommand, Debug, Clone)]
pub enum Command {
    /// Open N authenticated connections at a ramp rate and hold them with heartbeats; report login
    /// rate and latency, failures by error code, and the gateway's memory per connection.
    Connect(ConnectArgs),
    /// N users send messages to random recipients at a total rate; report receipts, delivered,
    /// lost, duplicated, throughput and latency percentiles.
    Chat(ChatArgs),
    /// N connected clients receive admin broadcasts; report deliveries per second and latency.
    Broadcast(BroadcastArgs),
    /// A cluster of its own (Redis, a database, gateway nodes) under steady traffic while faults
    /// are injected at random moments; checks that nothing stored is lost, doubled or reordered.
    Soak(SoakArgs),
    /// Draw the latency curves of one or more result files into one SVG chart.
    Chart(ChartArgs),
    /// Internal: one worker process of a multi-process run (reads its plan from stdin).
    #[command(name = "__worker", hide = true)]
    Worker(WorkerArgs),
}

#[derive(Args, Debug, Clone)]
pub struct WorkerArgs {
    #[arg(long)]
    pub shard: usize,
    #[arg(long)]
    pub shards: usize,
}

/// What the targets are.
#[derive(ValueEnum, Debug, Clone, Copy, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum TargetKind {
    /// imgate gateway nodes (TCP frames or WebSocket on /ws).
    Imgate,
    /// Socket.IO v4 servers (Engine.IO v4 over WebSocket), e.g. loadtest/peers/socketio.
    Socketio,
}

/// How clients talk to an imgate node.
#[derive(ValueEnum, Debug, Clone, Copy, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Transport {
    Tcp,
    Ws,
}

impl Transport {
    pub fn as_str(self) -> &'static str {
        match self {
            Transport::Tcp => "tcp",
            Transport::Ws => "ws",
        }
    }
}

#[derive(Args, Debug, Clone)]
pub struct Common {
    /// Client endpoints, comma-separated: tcp://host:port, ws://host:port/ws (imgate), or
    /// ws://host:port / http://host:port (Socket.IO). Loopback addresses only.
    #[arg(long, value_delimiter = ',')]
    pub targets: Vec<String>,
    /// Read the node addresses from the gateway's public alloc endpoint instead, e.g.
    /// http://127.0.0.1:7401/api/v1/alloc.
    #[arg(long, conflicts_with = "targets")]
    pub alloc: Option<String>,
    /// Transport for imgate targets; defaults to each target's scheme (tcp:// or ws://).
    #[arg(long, value_enum)]
    pub transport: Option<Transport>,
    /// Protocol of the targets.
    #[arg(long, value_enum, default_value_t = TargetKind::Imgate)]
    pub target_kind: TargetKind,
    /// HS256 secret the login tokens (JWT, sub = user id) are signed with.
    #[arg(long, env = "LOADTEST_SECRET", default_value = DEV_SECRET, hide_default_value = true, hide_env_values = true)]
    pub secret: String,
    /// Lifetime of the minted login tokens, in seconds.
    #[arg(long, default_value_t = 3600)]
    pub token_ttl: u64,
    /// Admin API base URLs, comma-separated (e.g. http://127.0.0.1:7401): stats are summed over
    /// all of them; broadcasts go to the first.
    #[arg(long, value_delimiter = ',')]
    pub admin: Vec<String>,
    /// Bearer token of the admin API.
    #[arg(long, env = "LOADTEST_ADMIN_TOKEN", default_value = DEV_ADMIN_TOKEN, hide_default_value = true, hide_env_values = true)]
    pub admin_token: String,
    /// Gateway (or peer) process ids, comma-separated: memory is read from /proc/PID/status (VmRSS,
    /// summed) and CPU time from /proc/PID/stat. Preferred over the admin stats when given.
    #[arg(long, value_delimiter = ',')]
    pub gateway_pid: Vec<u32>,
    /// Redis to watch (redis://127.0.0.1:6379): INFO is read before and after the measured phase
    /// to report commands, PUBLISH calls and Redis CPU per login, message or delivery. Other
    /// clients of the same Redis are counted too.
    #[arg(long)]
    pub redis: Option<String>,
    /// Connections (one per user).
    #[arg(short = 'n', long, default_value_t = 1000)]
    pub connections: u64,
    /// Length of the measured phase in seconds: how long `connect` holds, how long `chat` sends,
    /// the longest `broadcast` phase.
    #[arg(long, default_value_t = 10.0)]
    pub duration: f64,
    /// Write the results as JSON to this file.
    #[arg(long)]
    pub out: Option<PathBuf>,
    /// Write a latency chart (SVG) to this file; defaults to the --out file with .svg.
    #[arg(long)]
    pub chart: Option<PathBuf>,
    /// Spread the connections over this many child processes (a process here may hold at most
    /// ~20,000 open files); chosen automatically when absent.
    #[arg(long)]
    pub procs: Option<usize>,
    /// User ids are this prefix followed by a number.
    #[arg(long, default_value = "lt-")]
    pub user_prefix: String,
    /// Number of the first user.
    #[arg(long, default_value_t = 0)]
    pub user_offset: u64,
    /// Channel type of the connections.
    #[arg(long, default_value = "app")]
    pub channel: String,
    /// Most logins in flight at once (connected but no answer yet).
    #[arg(long, default_value_t = 1000)]
    pub max_inflight: usize,
    /// Time a login may take (connect, handshake, answer), in seconds.
    #[arg(long, default_value_t = 10.0)]
    pub login_timeout: f64,
    /// Ask the server for this heartbeat interval (ms); the server default when absent.
    #[arg(long)]
    pub heartbeat_ms: Option<u64>,
    /// Spread the connections over this many loopback source addresses (127.0.0.1, 127.0.0.2,
    /// ...; IPv4 targets only) so that the kernel's search for a free local port stays short; 1
    /// connects from the default address.
    #[arg(long, default_value_t = 32)]
    pub source_ips: u32,
    /// Hard bound on the whole run, in seconds; the run stops and reports whatever it has.
    #[arg(long, default_value_t = 600.0)]
    pub max_runtime: f64,
    /// No progress output.
    #[arg(long, short)]
    pub quiet: bool,
}

#[derive(Args, Debug, Clone)]
pub struct ConnectArgs {
    #[command(flatten)]
    pub common: Common,
    /// Logins started per second (ramp rate).
    #[arg(long, default_value_t = 5000.0)]
    pub rate: f64,
    /// How long to hold the connections after the ramp, in seconds (overrides --duration).
    #[arg(long)]
    pub hold: Option<f64>,
    /// Seconds to wait after the ramp before reading the gateway's memory.
    #[arg(long, default_value_t = 3.0)]
    pub settle: f64,
}

#[derive(Args, Debug, Clone)]
pub struct ChatArgs {
    #[command(flatten)]
    pub common: Common,
    /// Logins started per second while connecting the users.
    #[arg(long, default_value_t = 5000.0)]
    pub login_rate: f64,
    /// Messages per second, in total over all users.
    #[arg(long, default_value_t = 1000.0)]
    pub rate: f64,
    /// Stop after this many messages (in total), even before --duration is over.
    #[arg(long)]
    pub messages: Option<u64>,
    /// Share of messages addressed to a user connected to another target than the sender's.
    #[arg(long, default_value_t = 0.0)]
    pub cross_node_share: f64,
    /// Size of each message body in bytes (at least the ~60 bytes of its id and send time).
    #[arg(long, default_value_t = 100)]
    pub payload: usize,
    /// After sending stops, wait at most this long (seconds) for outstanding pushes and receipts.
    #[arg(long, default_value_t = 5.0)]
    pub drain: f64,
    /// Do not acknowledge pushes.
    #[arg(long)]
    pub no_ack: bool,
}

#[derive(Args, Debug, Clone)]
pub struct BroadcastArgs {
    #[command(flatten)]
    pub common: Common,
    /// Logins started per second while connecting the clients.
    #[arg(long, default_value_t = 5000.0)]
    pub login_rate: f64,
    /// Number of broadcasts to post.
    #[arg(long, default_value_t = 20)]
    pub count: u64,
    /// Broadcasts per second; 0 posts them back to back (each after the previous answer).
    #[arg(long, default_value_t = 0.0)]
    pub rate: f64,
    /// Broadcast only to this channel type.
    #[arg(long)]
    pub broadcast_channel: Option<String>,
    /// After the last broadcast, wait at most this long (seconds) for its deliveries.
    #[arg(long, default_value_t = 5.0)]
    pub drain: f64,
    /// Acknowledge every broadcast push (as a real client would; costs client CPU).
    #[arg(long)]
    pub ack: bool,
}

#[derive(Args, Debug, Clone)]
pub struct ChartArgs {
    /// Result files (JSON written by --out).
    #[arg(required = true)]
    pub inputs: Vec<PathBuf>,
    /// The SVG to write.
    #[arg(long)]
    pub out: PathBuf,
    /// Label of a curve; repeat it for each input, in order.
    #[arg(long = "label")]
    pub labels: Vec<String>,
    /// Chart title.
    #[arg(long)]
    pub title: Option<String>,
}

#[derive(Args, Debug, Clone)]
pub struct SoakArgs {
    /// Gateway nodes to start.
    #[arg(long, default_value_t = 2)]
    pub nodes: usize,
    /// Users, one client each (even ones over TCP, odd ones over WebSocket).
    #[arg(short = 'n', long, default_value_t = 20)]
    pub users: u32,
    /// Messages per second, in total over all users (each user sends one at a time).
    #[arg(long, default_value_t = 100.0)]
    pub rate: f64,
    /// Seconds of traffic and faults.
    #[arg(long, default_value_t = 60.0)]
    pub duration: f64,
    /// Mean seconds between faults: after one is healed, the next comes 0.5 to 1.5 times this later.
    #[arg(long, default_value_t = 5.0)]
    pub fault_every: f64,
    /// Kinds of fault, used in a random order that takes each once before repeating any.
    #[arg(long, value_enum, value_delimiter = ',', default_values_t = crate::soak::faults::FaultKind::all())]
    pub faults: Vec<crate::soak::faults::FaultKind>,
    /// After traffic stops, wait at most this long (seconds) for every stored message to arrive.
    #[arg(long, default_value_t = 60.0)]
    pub drain: f64,
    /// Routing mode of the cluster (`routed` or `broadcast`).
    #[arg(long, default_value = "routed")]
    pub routing: String,
    /// The gateway binary; by default `imgate` beside this program.
    #[arg(long)]
    pub gateway_bin: Option<PathBuf>,
    /// The Redis server binary the soak starts (and kills) on a free port.
    #[arg(long, default_value = "redis-server")]
    pub redis_server: String,
    /// MariaDB/MySQL server, as an account that may create databases: the soak creates a
    /// database of its own and drops it at the end. Loopback only.
    #[arg(
        long,
        env = "LOADTEST_MYSQL_URL",
        default_value = "mysql://root@127.0.0.1:3306"
    )]
    pub mysql: String,
    /// Directory for the node logs (a fresh one under the temp dir when absent).
    #[arg(long)]
    pub logs: Option<PathBuf>,
    /// Write the report as JSON to this file.
    #[arg(long)]
    pub out: Option<PathBuf>,
    /// No progress output.
    #[arg(long, short)]
    pub quiet: bool,
}
