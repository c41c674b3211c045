//! Where the load goes: client endpoints from `--targets` or the gateway's alloc endpoint, and the
//! admin URLs. Everything must resolve to loopback addresses; anything else is refused.

use std::net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr, ToSocketAddrs};

use anyhow::{bail, Context};
use serde::{Deserialize, Serialize};

use crate::cli::{TargetKind, Transport};

/// One node the clients connect to.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Target {
    /// The resolved socket address (always loopback).
    pub addr: SocketAddr,
    /// `tcp` or `ws` (Socket.IO targets are always `ws`).
    pub transport: Transport,
    /// For WebSocket: the URL of the upgrade request.
    pub url: Option<String>,
}

impl Target {
    /// How the target is shown in reports.
    pub fn label(&self) -> String {
        match (&self.url, self.transport) {
            (Some(url), _) => url.clone(),
            (None, _) => format!("tcp://{}", self.addr),
        }
    }
}

/// A URL split into its parts: `scheme://host:port/rest`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct UrlParts {
    pub scheme: Option<String>,
    pub host: String,
    pub port: Option<u16>,
    /// Path and query, starting with `/`; empty when absent.
    pub rest: String,
}

pub fn split_url(s: &str) -> anyhow::Result<UrlParts> {
    let (scheme, rest) = match s.split_once("://") {
        Some((scheme, rest)) => (Some(scheme.to_ascii_lowercase()), rest),
        None => (None, s),
    };
    let (authority, path) = match rest.find('/') {
        Some(i) => (&rest[..i], &rest[i..]),
        None => (rest, ""),
    };
    if authority.contains('@') {
        bail!("{s:?}: user info in addresses is not supported");
    }
    let (host, port) = if let Some(stripped) = authority.strip_prefix('[') {
        // [v6]:port
        let (h, after) = stripped
            .split_once(']')
            .with_context(|| format!("{s:?}: unclosed [ in address"))?;
        let port = match after.strip_prefix(':') {
            Some(p) => Some(p.parse().with_context(|| format!("{s:?}: bad port"))?),
            None => None,
        };
        (h.to_owned(), port)
    } else {
        match authority.rsplit_once(':') {
            Some((h, p)) => (
                h.to_owned(),
                Some(p.parse().with_context(|| format!("{s:?}: bad port"))?),
            ),
            None => (authority.to_owned(), None),
        }
    };
    if host.is_empty() {
        bail!("{s:?}: no host");
    }
    Ok(UrlParts {
        scheme,
        host,
        port,
        rest: path.to_owned(),
    })
}

/// Resolves `host:port` and checks that every address it resolves to is loopback.
pub fn resolve_loopback(host: &str, port: u16) -> anyhow::Result<SocketAddr> {
    let addrs: Vec<SocketAddr> = (host, port)
        .to_socket_addrs()
        .with_context(|| format!("cannot resolve {host}:{port}"))?
        .collect();
    // Connecting to the unspecified address (a node that listens on and advertises 0.0.0.0)
    // reaches this host; take it for loopback.
    let addrs: Vec<SocketAddr> = addrs
        .into_iter()
        .map(|a| match a.ip() {
            IpAddr::V4(v4) if v4.is_unspecified() => {
                SocketAddr::new(Ipv4Addr::LOCALHOST.into(), port)
            }
            IpAddr::V6(v6) if v6.is_unspecified() => {
                SocketAddr::new(Ipv6Addr::LOCALHOST.into(), port)
            }
            _ => a,
        })
        .collect();
    let Some(first) = addrs.first().copied() else {
        bail!("{host}:{port} resolves to no address");
    };
    if let Some(bad) = addrs.iter().find(|a| !is_loopback(a.ip())) {
        bail!(
            "refusing {host}:{port}: it resolves to {} which is not a loopback address; the load test targets loopback only",
            bad.ip()
        );
    }
    Ok(first)
}

pub fn is_loopback(ip: IpAddr) -> bool {
    match ip {
        IpAddr::V4(v4) => v4.is_loopback(),
        IpAddr::V6(v6) => {
            v6.is_loopback() || v6.to_ipv4_mapped().is_some_and(|v4| v4.is_loopback())
        }
    }
}

/// Parses one `--targets` entry.
pub fn parse_target(
    s: &str,
    kind: TargetKind,
    transport: Option<Transport>,
) -> anyhow::Result<Target> {
    let parts = split_url(s.trim())?;
    let default_port = match kind {
        TargetKind::Imgate => 7400,
        TargetKind::Socketio => 3000,
    };
    let port = parts.port.unwrap_or(default_port);
    let addr = resolve_loopback(&parts.host, port)?;
    let hostport = if parts.host.contains(':') {
        format!("[{}]:{port}", parts.host)
    } else {
        format!("{}:{port}", parts.host)
    };
    match kind {
        TargetKind::Socketio => {
            match parts.scheme.as_deref() {
                None | Some("ws") | Some("http") => {}
                Some(other) => {
                    bail!("{s:?}: Socket.IO targets are ws:// or http://, not {other}://")
                }
            }
            let path = if parts.rest.is_empty() || parts.rest == "/" {
                "/socket.io/".to_owned()
            } else {
                parts.rest.split('?').next().unwrap_or_default().to_owned()
            };
            Ok(Target {
                addr,
                transport: Transport::Ws,
                url: Some(format!("ws://{hostport}{path}?EIO=4&transport=websocket")),
            })
        }
        TargetKind::Imgate => {
            let scheme_transport = match parts.scheme.as_deref() {
                None | Some("tcp") => Transport::Tcp,
                Some("ws") => Transport::Ws,
                Some(other) => bail!("{s:?}: imgate targets are tcp:// or ws://, not {other}://"),
            };
            let transport = transport.unwrap_or(scheme_transport);
            let url = match transport {
                Transport::Tcp => None,
                Transport::Ws => {
                    let path = if scheme_transport == Transport::Ws && !parts.rest.is_empty() {
                        parts.rest.clone()
                    } else {
                        "/ws".to_owned()
                    };
                    Some(format!("ws://{hostport}{path}"))
                }
            };
            Ok(Target {
                addr,
                transport,
                url,
            })
        }
    }
}

/// Checks an HTTP base URL (admin API, alloc endpoint) and returns it without a trailing `/`.
pub fn check_http_url(s: &str) -> anyhow::Result<String> {
    let parts = split_url(s.trim())?;
    match parts.scheme.as_deref() {
        Some("http") => {}
        Some(other) => bail!("{s:?}: only http:// is supported (loopback), not {other}://"),
        None => bail!("{s:?}: give a full URL such as http://127.0.0.1:7401"),
    }
    resolve_loopback(&parts.host, parts.port.unwrap_or(80))?;
    Ok(s.trim().trim_end_matches('/').to_owned())
}

/// The alloc endpoint's answer (only the fields used here).
#[derive(Debug, Deserialize)]
struct Alloc {
    nodes: Vec<AllocNode>,
}

#[derive(Debug, Deserialize)]
struct AllocNode {
    #[serde(default)]
    id: Option<String>,
    #[serde(default)]
    client_addr: Option<String>,
    #[serde(default)]
    ws_url: Option<String>,
}

/// Reads the node list from the gateway's alloc endpoint.
pub async fn from_alloc(
    url: &str,
    transport: Option<Transport>,
    http: &reqwest::Client,
) -> anyhow::Result<Vec<Target>> {
    let url = check_http_url(url)?;
    let alloc: Alloc = http
        .get(&url)
        .send()
        .await
        .with_context(|| format!("GET {url}"))?
        .error_for_status()
        .with_context(|| format!("GET {url}"))?
        .json()
        .await
        .with_context(|| format!("{url}: not the alloc JSON"))?;
    let transport = transport.unwrap_or(Transport::Tcp);
    let mut targets = Vec::new();
    for node in alloc.nodes {
        let name = node.id.clone().unwrap_or_default();
        let target = match (transport, &node.ws_url, &node.client_addr) {
            (Transport::Ws, Some(ws), _) => parse_target(ws, TargetKind::Imgate, None)?,
            (_, _, Some(addr)) => parse_target(addr, TargetKind::Imgate, Some(transport))?,
            _ => bail!("alloc node {name:?} has no usable address"),
        };
        targets.push(target);
    }
    if targets.is_empty() {
        bail!("{url} lists no nodes");
    }
    Ok(targets)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_targets() {
        let t = parse_target("tcp://127.0.0.1:7400", TargetKind::Imgate, None).unwrap();
        assert_eq!(t.transport, Transport::Tcp);
        assert_eq!(t.addr, "127.0.0.1:7400".parse().unwrap());
        let t = parse_target(
            "tcp://127.0.0.1:7400",
            TargetKind::Imgate,
            Some(Transport::Ws),
        )
        .unwrap();
        assert_eq!(t.url.as_deref(), Some("ws://127.0.0.1:7400/ws"));
        let t = parse_target("ws://localhost:9/ws", TargetKind::Imgate, None).unwrap();
        assert_eq!(t.transport, Transport::Ws);
        assert!(t.addr.ip().is_loopback());
        let t = parse_target("http://127.0.0.1:3001", TargetKind::Socketio, None).unwrap();
        assert_eq!(
            t.url.as_deref(),
            Some("ws://127.0.0.1:3001/socket.io/?EIO=4&transport=websocket")
        );
        let t = parse_target("[::1]:7400", TargetKind::Imgate, None).unwrap();
        assert!(t.addr.ip().is_loopback());
        let t = parse_target("0.0.0.0:7400", TargetKind::Imgate, None).unwrap();
        assert_eq!(t.addr, "127.0.0.1:7400".parse().unwrap());
    }

    #[test]
    fn refuses_non_loopback() {
        for bad in [
            "tcp://10.0.0.1:7400",
            "ws://192.168.1.2:7400/ws",
            "8.8.8.8:53",
        ] {
            let err = parse_target(bad, TargetKind::Imgate, None).unwrap_err();
            assert!(err.to_string().contains("loopback"), "{bad}: {err}");
        }
        assert!(check_http_url("http://10.1.2.3:7401").is_err());
        assert!(check_http_url("https://127.0.0.1:7401").is_err());
        assert_eq!(
            check_http_url("http://127.0.0.1:7401/").unwrap(),
            "http://127.0.0.1:7401"
        );
    }
}
