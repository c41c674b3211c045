//! What the load test reads from (and asks of) the system under test: resident memory and CPU time
//! of its processes (`/proc/PID/status`, `/proc/PID/stat`), or the admin API's stats; admin
//! broadcasts.

use anyhow::{bail, Context};
use serde::Deserialize;

pub struct Observer {
    http: reqwest::Client,
    admins: Vec<String>,
    admin_token: String,
    pids: Vec<u32>,
}

/// A reading of the system's resident memory.
#[derive(Debug, Clone)]
pub struct Memory {
    pub bytes: u64,
    /// Where it came from: `VmRSS of pid ...` or `admin stats memory_rss_bytes`.
    pub source: String,
    /// Connections the admin stats reported at the same time, if read.
    pub connections: Option<u64>,
}

#[derive(Deserialize)]
struct Stats {
    #[serde(default)]
    connections: Option<u64>,
    #[serde(default)]
    memory_rss_bytes: Option<u64>,
}

#[derive(Deserialize)]
struct BroadcastAnswer {
    #[serde(default)]
    connections: Option<u64>,
}

/// VmRSS of a process, in bytes.
pub fn rss_of(pid: u32) -> anyhow::Result<u64> {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status"))
        .with_context(|| format!("cannot read /proc/{pid}/status"))?;
    for line in status.lines() {
        if let Some(rest) = line.strip_prefix("VmRSS:") {
            let kb: u64 = rest
                .trim()
                .trim_end_matches("kB")
                .trim()
                .parse()
                .context("VmRSS is not a number")?;
            return Ok(kb * 1024);
        }
    }
    bail!("/proc/{pid}/status has no VmRSS")
}

/// CPU time (user + system) of a process, in seconds.
pub fn cpu_of(pid: u32) -> anyhow::Result<f64> {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat"))
        .with_context(|| format!("cannot read /proc/{pid}/stat"))?;
    // The command name (field 2) may contain spaces; fields after its closing ')' are plain.
    let after = stat
        .rsplit_once(')')
        .map(|(_, rest)| rest)
        .context("malformed stat")?;
    let fields: Vec<&str> = after.split_whitespace().collect();
    // utime and stime are fields 14 and 15 of stat, i.e. 12 and 13 after the name.
    let ticks: u64 = fields
        .get(11..13)
        .context("short stat")?
        .iter()
        .map(|f| f.parse::<u64>().unwrap_or(0))
        .sum();
    // SAFETY: sysconf has no preconditions.
    let hz = unsafe { libc::sysconf(libc::_SC_CLK_TCK) };
    Ok(ticks as f64 / if hz > 0 { hz as f64 } else { 100.0 })
}

/// Time the threads of a process spent runnable but waiting for a CPU (run-queue delay, from
/// /proc/PID/task/*/schedstat), in seconds: CPU contention, e.g. with other tenants of the
/// machine. Threads that have exited are not counted.
pub fn runqueue_wait_of(pid: u32) -> Option<f64> {
    let tasks = std::fs::read_dir(format!("/proc/{pid}/task")).ok()?;
    let mut ns = 0u64;
    for task in tasks.flatten() {
        let Ok(text) = std::fs::read_to_string(task.path().join("schedstat")) else {
            continue;
        };
        ns += text
            .split_whitespace()
            .nth(1)
            .and_then(|f| f.parse::<u64>().ok())
            .unwrap_or(0);
    }
    Some(ns as f64 / 1e9)
}

impl Observer {
    pub fn new(admins: Vec<String>, admin_token: String, pids: Vec<u32>) -> Observer {
        Observer {
            http: http_client(),
            admins,
            admin_token,
            pids,
        }
    }

    pub fn has_admin(&self) -> bool {
        !self.admins.is_empty()
    }

    pub fn pids(&self) -> &[u32] {
        &self.pids
    }

    /// Sum of the admin stats of every node: (connections, memory_rss_bytes).
    async fn stats(&self) -> anyhow::Result<(Option<u64>, Option<u64>)> {
        let mut connections = None;
        let mut memory = None;
        for admin in &self.admins {
            let url = format!("{admin}/api/v1/stats");
            let stats: Stats = self
                .http
                .get(&url)
                .bearer_auth(&self.admin_token)
                .send()
                .await
                .with_context(|| format!("GET {url}"))?
                .error_for_status()
                .with_context(|| format!("GET {url}"))?
                .json()
                .await
                .with_context(|| format!("GET {url}: unexpected answer"))?;
            if let Some(c) = stats.connections {
                *connections.get_or_insert(0) += c;
            }
            if let Some(m) = stats.memory_rss_bytes {
                *memory.get_or_insert(0) += m;
            }
        }
        Ok((connections, memory))
    }

    /// The system's resident memory: VmRSS summed over the pids when given, else the admin stats.
    pub async fn memory(&self) -> anyhow::Result<Option<Memory>> {
        let connections = if self.has_admin() {
            self.stats().await?.0
        } else {
            None
        };
        if !self.pids.is_empty() {
            let mut bytes = 0;
            for &pid in &self.pids {
                bytes += rss_of(pid)?;
            }
            let pids: Vec<String> = self.pids.iter().map(|p| p.to_string()).collect();
            return Ok(Some(Memory {
                bytes,
                source: format!("VmRSS of pid {}", pids.join("+")),
                connections,
            }));
        }
        if self.has_admin() {
            let (connections, memory) = self.stats().await?;
            return Ok(memory.map(|bytes| Memory {
                bytes,
                source: "admin stats memory_rss_bytes".into(),
                connections,
            }));
        }
        Ok(None)
    }

    /// CPU seconds used so far by the given processes (None without --gateway-pid).
    pub fn cpu_secs(&self) -> Option<f64> {
        if self.pids.is_empty() {
            return None;
        }
        self.pids.iter().map(|&p| cpu_of(p).ok()).sum()
    }

    /// Run-queue delay so far of the given processes (None without --gateway-pid).
    pub fn runqueue_wait_secs(&self) -> Option<f64> {
        if self.pids.is_empty() {
            return None;
        }
        self.pids.iter().map(|&p| runqueue_wait_of(p)).sum()
    }

    /// Posts one broadcast to the first admin URL; returns how many connections it reached.
    pub async fn broadcast(
        &self,
        body: serde_json::Value,
        channel: Option<&str>,
    ) -> anyhow::Result<u64> {
        let Some(admin) = self.admins.first() else {
            bail!("broadcast needs --admin");
        };
        let url = format!("{admin}/api/v1/broadcast");
        let mut req = serde_json::json!({ "body": body });
        if let Some(c) = channel {
            req["channel"] = c.into();
        }
        let answer = self
            .http
            .post(&url)
            .bearer_auth(&self.admin_token)
            .json(&req)
            .send()
            .await
            .with_context(|| format!("POST {url}"))?;
        let status = answer.status();
        if !status.is_success() {
            let text = answer.text().await.unwrap_or_default();
            bail!("POST {url}: {status} {text}");
        }
        let answer: BroadcastAnswer = answer.json().await.context("broadcast answer")?;
        Ok(answer.connections.unwrap_or(0))
    }
}

/// An HTTP client for loopback: no proxy, short timeouts.
pub fn http_client() -> reqwest::Client {
    reqwest::Client::builder()
        .no_proxy()
        .timeout(std::time::Duration::from_secs(30))
        .build()
        .expect("a plain HTTP client builds")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn reads_own_process() {
        let pid = std::process::id();
        assert!(rss_of(pid).unwrap() > 0);
        assert!(cpu_of(pid).unwrap() >= 0.0);
        assert!(runqueue_wait_of(pid).unwrap() >= 0.0);
    }
}
