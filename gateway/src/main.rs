//! The `imgate` binary: parses configuration, binds, and runs a node (or mints a development
//! token, or opens an interactive chat connection).

use std::net::SocketAddr;
use std::path::PathBuf;

use anyhow::{bail, Context};
use clap::{Parser, Subcommand};
use imgate::auth::Authenticator;
use imgate::config::{LogFormat, Settings};
use imgate::{run, Listeners};
use imgate_shared::connection::{ClientConnection, Endpoint};
use imgate_shared::protocol::HeartbeatRange;
use imgate_shared::{ClientFrame, ServerFrame};
use serde_json::{json, Map, Value};
use tokio::io::{AsyncBufReadExt, BufReader};
use tokio_util::sync::CancellationToken;
use tracing::info;

#[derive(Parser)]
#[command(
    name = "imgate",
    version,
    about = "An IM gateway node: TCP and WebSocket clients, JWT login, heartbeats, admin API"
)]
struct Cli {
    /// TOML configuration file (layered over the defaults, under IMGATE_* variables and flags).
    #[arg(long, short, env = "IMGATE_CONFIG", global = true)]
    config: Option<PathBuf>,
    /// This node's id.
    #[arg(long, global = true)]
    node_id: Option<String>,
    /// Address for client connections (TCP and WebSocket on /ws).
    #[arg(long, global = true)]
    client_listen: Option<SocketAddr>,
    /// Address of the admin API and /metrics.
    #[arg(long, global = true)]
    admin_listen: Option<SocketAddr>,
    /// Log filter, e.g. info or imgate=debug.
    #[arg(long, global = true)]
    log_level: Option<String>,
    /// Log as JSON lines.
    #[arg(long, global = true)]
    log_json: bool,
    #[command(subcommand)]
    command: Option<Command>,
}

#[derive(Subcommand)]
enum Command {
    /// Run a gateway node (the default).
    Serve,
    /// Mint a login token signed with the configured HS256 secret (for development).
    Token {
        /// The user id (the token's `sub`).
        #[arg(long)]
        user: String,
        /// Lifetime in seconds.
        #[arg(long, default_value_t = 86_400)]
        ttl_secs: u64,
    },
    /// Log in as a user and chat from the terminal: type `@bob hello` to send; pushes are printed.
    Chat {
        #[arg(long)]
        user: String,
        /// tcp://host:port or ws://host:port/ws
        #[arg(long, default_value = "tcp://127.0.0.1:7400")]
        endpoint: String,
        #[arg(long, default_value = "app")]
        channel: String,
        #[arg(long, default_value = "terminal")]
        device_id: String,
        /// Login token; minted with the configured secret when absent.
        #[arg(long)]
        token: Option<String>,
    },
    /// Print the effective configuration (secrets masked).
    Config,
}

impl Cli {
    /// The flags that override configuration, as a partial settings tree.
    fn overrides(&self) -> Value {
        let mut root = Map::new();
        let mut set = |section: &str, key: &str, value: Value| {
            root.entry(section)
                .or_insert_with(|| json!({}))
                .as_object_mut()
                .expect("sections are objects")
                .insert(key.to_owned(), value);
        };
        if let Some(id) = &self.node_id {
            set("node", "id", json!(id));
        }
        if let Some(a) = self.client_listen {
            set("client", "listen", json!(a.to_string()));
        }
        if let Some(a) = self.admin_listen {
            set("admin", "listen", json!(a.to_string()));
        }
        if let Some(l) = &self.log_level {
            set("log", "level", json!(l));
        }
        if self.log_json {
            set("log", "format", json!("json"));
        }
        Value::Object(root)
    }
}

fn init_tracing(settings: &Settings) {
    let filter = tracing_subscriber::EnvFilter::try_from_default_env()
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new(&settings.log.level));
    // Colours only on a terminal: a log file or a collector must not get escape sequences.
    let builder = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_ansi(std::io::IsTerminal::is_terminal(&std::io::stdout()));
    match settings.log.format {
        LogFormat::Json => builder.json().init(),
        LogFormat::Text => builder.init(),
    }
}

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    let cli = Cli::parse();
    let settings = Settings::load(cli.config.as_deref(), cli.overrides())?;
    match cli.command.unwrap_or(Command::Serve) {
        Command::Serve => serve(settings).await,
        Command::Token { user, ttl_secs } => {
            let auth = Authenticator::new(&settings)?;
            let Some(token) = auth.mint(&user, ttl_secs, &settings.auth) else {
                bail!("tokens can be minted only with algorithm HS256");
            };
            println!("{token}");
            Ok(())
        }
        Command::Chat {
            user,
            endpoint,
            channel,
            device_id,
            token,
        } => {
            let token = match token {
                Some(t) => t,
                None => Authenticator::new(&settings)?
                    .mint(&user, 86_400, &settings.auth)
                    .context("no --token given and tokens can be minted only with HS256")?,
            };
            let result = chat(endpoint.parse()?, token, channel, device_id).await;
            // The runtime would otherwise wait for the blocked read of stdin before exiting.
            std::process::exit(match result {
                Ok(()) => 0,
                Err(e) => {
                    eprintln!("error: {e:#}");
                    1
                }
            })
        }
        Command::Config => {
            println!("{settings:#?}");
            Ok(())
        }
    }
}

async fn serve(settings: Settings) -> anyhow::Result<()> {
    init_tracing(&settings);
    // Client connections are bounded by the open-file limit: use all the hard limit allows.
    imgate::descriptors::raise_nofile_limit();
    let listeners = Listeners::bind(&settings)
        .await
        .context("cannot bind the client or admin address")?;
    info!(
        node = %settings.node.id,
        client = %listeners.client.local_addr()?,
        websocket = %format!("ws://{}/ws", listeners.client.local_addr()?),
        admin = %format!("http://{}", listeners.admin.local_addr()?),
        "imgate listening (TCP and WebSocket on the client address; admin API, /metrics, /healthz on the admin address)"
    );
    let shutdown = CancellationToken::new();
    tokio::spawn(signal_shutdown(shutdown.clone()));
    run(settings, listeners, shutdown).await?;
    info!("stopped");
    Ok(())
}

/// Cancels `shutdown` on SIGTERM or SIGINT.
async fn signal_shutdown(shutdown: CancellationToken) {
    #[cfg(unix)]
    {
        use tokio::signal::unix::{signal, SignalKind};
        let mut term = signal(SignalKind::terminate()).expect("SIGTERM handler");
        tokio::select! {
            _ = term.recv() => info!("SIGTERM received"),
            _ = tokio::signal::ctrl_c() => info!("SIGINT received"),
        }
    }
    #[cfg(not(unix))]
    {
        let _ = tokio::signal::ctrl_c().await;
    }
    shutdown.cancel();
}

/// A terminal chat client: lines `@user text` are sent; every frame received is printed as JSON.
async fn chat(
    endpoint: Endpoint,
    token: String,
    channel: String,
    device_id: String,
) -> anyhow::Result<()> {
    let mut conn = ClientConnection::connect(&endpoint)
        .await
        .with_context(|| format!("cannot connect to {endpoint}"))?;
    conn.send(&ClientFrame::Login {
        token,
        device_id,
        channel,
        client_version: Some(concat!("imgate-chat/", env!("CARGO_PKG_VERSION")).into()),
        heartbeat: Some(HeartbeatRange {
            min_ms: 5_000,
            max_ms: 30_000,
        }),
        last_seq: None,
    })
    .await?;
    let heartbeat_ms = match conn.recv().await? {
        Some(ServerFrame::LoginResult {
            heartbeat_ms,
            user_id,
            node_id,
            ..
        }) => {
            eprintln!(
                "logged in as {user_id} on {node_id}; type `@user text` to send, Ctrl-D to quit"
            );
            heartbeat_ms
        }
        Some(other) => bail!("login failed: {}", serde_json::to_string(&other)?),
        None => bail!("server closed the connection during login"),
    };
    let mut lines = BufReader::new(tokio::io::stdin()).lines();
    let mut heartbeat = tokio::time::interval(std::time::Duration::from_millis(
        heartbeat_ms.saturating_sub(1000).max(1000),
    ));
    let mut counter = 0u64;
    loop {
        tokio::select! {
            frame = conn.recv() => match frame? {
                Some(frame) => {
                    if let ServerFrame::Push { id, seq, .. } = &frame {
                        // Stream pushes are acknowledged by position, broadcasts by id.
                        let ack = match seq {
                            Some(seq) => ClientFrame::Ack { seq: Some(*seq), id: None },
                            None => ClientFrame::Ack { seq: None, id: Some(*id) },
                        };
                        conn.send(&ack).await?;
                    }
                    if !matches!(frame, ServerFrame::HeartbeatAck { .. }) {
                        println!("{}", serde_json::to_string(&frame)?);
                    }
                }
                None => { eprintln!("server closed the connection"); return Ok(()) }
            },
            line = lines.next_line() => match line? {
                Some(line) => {
                    let Some((to, text)) = line.strip_prefix('@').and_then(|l| l.split_once(' ')) else {
                        eprintln!("type `@user text`");
                        continue;
                    };
                    counter += 1;
                    let body = imgate_shared::protocol::Body::from_value(&json!({ "text": text }))?;
                    conn.send(&ClientFrame::Send {
                        to: to.to_owned(),
                        channel: None,
                        client_msg_id: format!("chat-{counter}"),
                        body,
                        retry: false,
                    }).await?;
                }
                None => {
                    conn.send(&ClientFrame::Logout {}).await?;
                    return Ok(());
                }
            },
            _ = heartbeat.tick() => conn.send(&ClientFrame::Heartbeat {}).await?,
        }
    }
}
