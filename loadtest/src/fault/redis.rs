//! A `redis-server` of one's own on a loopback port, without persistence: killing it loses every
//! key, as a Redis restart without AOF or a failover to an empty replica does.

use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;

pub struct PrivateRedis {
    port: u16,
    binary: String,
    child: Option<Child>,
}

impl PrivateRedis {
    /// Starts `redis-server` (from the `PATH`) on a free port and waits until it answers.
    pub async fn start() -> PrivateRedis {
        PrivateRedis::start_with("redis-server", super::free_port())
            .await
            .expect("redis-server is installed and starts")
    }

    /// Starts `binary` on `port` and waits (at most 10 s) until it answers `PING`.
    pub async fn start_with(binary: &str, port: u16) -> anyhow::Result<PrivateRedis> {
        let mut redis = PrivateRedis {
            port,
            binary: binary.to_owned(),
            child: None,
        };
        redis.spawn().await?;
        Ok(redis)
    }

    async fn spawn(&mut self) -> anyhow::Result<()> {
        let child = Command::new(&self.binary)
            .args(["--port", &self.port.to_string(), "--bind", "127.0.0.1"])
            .args(["--save", "", "--appendonly", "no", "--daemonize", "no"])
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .map_err(|e| anyhow::anyhow!("cannot start {}: {e}", self.binary))?;
        self.child = Some(child);
        let deadline = Instant::now() + Duration::from_secs(10);
        while Instant::now() < deadline {
            if matches!(self.command(&["PING"]).await.as_deref(), Ok("+PONG")) {
                return Ok(());
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        anyhow::bail!(
            "{} does not answer on port {} after 10 s",
            self.binary,
            self.port
        )
    }

    pub fn port(&self) -> u16 {
        self.port
    }

    pub fn url(&self) -> String {
        format!("redis://127.0.0.1:{}", self.port)
    }

    /// Kills the server (SIGKILL); every key is lost.
    pub fn kill(&mut self) {
        if let Some(mut c) = self.child.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
    }

    /// Kills the server and starts an empty one on the same port.
    pub async fn restart(&mut self) -> anyhow::Result<()> {
        self.kill();
        self.spawn().await
    }

    /// Sends one command and returns the first line of the answer (`+OK`, `:1`, `-ERR …`).
    pub async fn command(&self, args: &[&str]) -> anyhow::Result<String> {
        let mut s = TcpStream::connect(("127.0.0.1", self.port)).await?;
        let mut req = format!("*{}\r\n", args.len());
        for a in args {
            req.push_str(&format!("${}\r\n{a}\r\n", a.len()));
        }
        s.write_all(req.as_bytes()).await?;
        let mut answer = Vec::new();
        let mut byte = [0u8; 1];
        while !answer.ends_with(b"\r\n") {
            if s.read(&mut byte).await? == 0 {
                anyhow::bail!("redis closed the connection");
            }
            answer.push(byte[0]);
        }
        answer.truncate(answer.len() - 2);
        Ok(String::from_utf8_lossy(&answer).into_owned())
    }
}

impl Drop for PrivateRedis {
    fn drop(&mut self) {
        self.kill();
    }
}
