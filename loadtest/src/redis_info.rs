//! Redis work per message: `INFO` read before and after the measured phase over a plain RESP
//! connection (loopback only) — commands processed, PUBLISH calls and Redis CPU time.

use std::collections::BTreeMap;
use std::time::Duration;

use anyhow::{bail, Context};
use serde::{Deserialize, Serialize};
use tokio::io::{AsyncBufReadExt, AsyncReadExt, AsyncWriteExt, BufReader};
use tokio::net::TcpStream;

use crate::targets::{resolve_loopback, split_url};

/// A reading of Redis's counters.
#[derive(Debug, Clone, Default)]
pub struct RedisMark {
    pub commands: u64,
    pub cpu_secs: f64,
    /// Calls per command name (lowercase), from `INFO commandstats`.
    pub calls: BTreeMap<String, u64>,
}

/// What Redis did during a phase.
#[derive(Debug, Clone, Default, Serialize, Deserialize)]
pub struct RedisSummary {
    pub url: String,
    pub commands: u64,
    pub cpu_secs: f64,
    /// What the per-unit figures are counted per.
    pub unit: String,
    pub commands_per_unit: f64,
    pub publish_per_unit: f64,
    pub cpu_us_per_unit: f64,
    /// The busiest commands of the phase, with their calls.
    pub top_commands: Vec<(String, u64)>,
}

/// Checks a `redis://host:port` URL (loopback only); returns `host:port`.
pub fn check_url(url: &str) -> anyhow::Result<String> {
    let parts = split_url(url)?;
    if parts.scheme.as_deref() != Some("redis") {
        bail!("{url:?}: give redis://host:port");
    }
    let addr = resolve_loopback(&parts.host, parts.port.unwrap_or(6379))?;
    Ok(addr.to_string())
}

/// Reads `INFO all` (stats, cpu and commandstats).
pub async fn read(addr: &str) -> anyhow::Result<RedisMark> {
    let text = tokio::time::timeout(Duration::from_secs(5), info(addr))
        .await
        .context("Redis INFO timed out")??;
    Ok(parse(&text))
}

async fn info(addr: &str) -> anyhow::Result<String> {
    let stream = TcpStream::connect(addr)
        .await
        .with_context(|| format!("cannot connect to Redis at {addr}"))?;
    let mut stream = BufReader::new(stream);
    stream
        .get_mut()
        .write_all(b"*2\r\n$4\r\nINFO\r\n$3\r\nall\r\n")
        .await?;
    let mut header = String::new();
    stream.read_line(&mut header).await?;
    let Some(len) = header.strip_prefix('$') else {
        bail!("Redis answered INFO with {header:?}");
    };
    let len: usize = len.trim().parse().context("bad INFO length")?;
    let mut body = vec![0; len + 2];
    stream.read_exact(&mut body).await?;
    body.truncate(len);
    Ok(String::from_utf8_lossy(&body).into_owned())
}

fn parse(text: &str) -> RedisMark {
    let mut mark = RedisMark::default();
    for line in text.lines() {
        let Some((key, value)) = line.trim().split_once(':') else {
            continue;
        };
        match key {
            "total_commands_processed" => mark.commands = value.parse().unwrap_or(0),
            "used_cpu_sys" | "used_cpu_user" => mark.cpu_secs += value.parse().unwrap_or(0.0),
            _ => {
                if let Some(cmd) = key.strip_prefix("cmdstat_") {
                    let calls = value
                        .split(',')
                        .find_map(|kv| kv.strip_prefix("calls="))
                        .and_then(|c| c.parse().ok())
                        .unwrap_or(0);
                    mark.calls.insert(cmd.to_owned(), calls);
                }
            }
        }
    }
    mark
}

pub fn summary(
    url: &str,
    before: &RedisMark,
    after: &RedisMark,
    unit: &str,
    units: u64,
) -> RedisSummary {
    let commands = after.commands.saturating_sub(before.commands);
    let cpu = (after.cpu_secs - before.cpu_secs).max(0.0);
    let delta = |name: &str| {
        after
            .calls
            .get(name)
            .copied()
            .unwrap_or(0)
            .saturating_sub(before.calls.get(name).copied().unwrap_or(0))
    };
    let mut top: Vec<(String, u64)> = after
        .calls
        .keys()
        .map(|k| (k.clone(), delta(k)))
        .filter(|(_, n)| *n > 0)
        .collect();
    top.sort_by_key(|t| std::cmp::Reverse(t.1));
    top.truncate(8);
    let per = |x: f64| {
        if units > 0 {
            (x / units as f64 * 1000.0).round() / 1000.0
        } else {
            0.0
        }
    };
    RedisSummary {
        url: url.to_owned(),
        commands,
        cpu_secs: (cpu * 1000.0).round() / 1000.0,
        unit: unit.to_owned(),
        commands_per_unit: per(commands as f64),
        publish_per_unit: per(delta("publish") as f64),
        cpu_us_per_unit: per(cpu * 1e6),
        top_commands: top,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_info() {
        let text = "# Stats\r\ntotal_commands_processed:120\r\n# CPU\r\nused_cpu_sys:1.5\r\nused_cpu_user:2.25\r\n# Commandstats\r\ncmdstat_publish:calls=40,usec=100,usec_per_call=2.5\r\ncmdstat_get:calls=3,usec=1\r\n";
        let m = parse(text);
        assert_eq!(m.commands, 120);
        assert!((m.cpu_secs - 3.75).abs() < 1e-9);
        assert_eq!(m.calls.get("publish"), Some(&40));
        let mut after = m.clone();
        after.commands += 50;
        after.calls.insert("publish".into(), 60);
        after.cpu_secs += 0.001;
        let s = summary("redis://x", &m, &after, "message", 10);
        assert_eq!(s.commands, 50);
        assert_eq!(s.commands_per_unit, 5.0);
        assert_eq!(s.publish_per_unit, 2.0);
        assert_eq!(s.cpu_us_per_unit, 100.0);
        assert_eq!(s.top_commands, vec![("publish".to_owned(), 20)]);
        assert!(check_url("redis://10.0.0.1:6379").is_err());
        assert_eq!(check_url("redis://127.0.0.1").unwrap(), "127.0.0.1:6379");
    }
}
