//! The nodes to connect to, from the gateway's `GET /api/v1/alloc`.

use std::time::Duration;

use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;

use crate::connection::{ConnectionError, Endpoint};

/// Reads node addresses from `GET /api/v1/alloc` (plain HTTP/1.1, loopback or a trusted network).
pub async fn alloc(url: &str, websocket: bool) -> Result<Vec<Endpoint>, ConnectionError> {
    let bad = || ConnectionError::BadEndpoint(url.to_owned());
    let rest = url.strip_prefix("http://").ok_or_else(bad)?;
    let (host, path) = match rest.find('/') {
        Some(i) => (&rest[..i], &rest[i..]),
        None => (rest, "/api/v1/alloc"),
    };
    let mut stream = tokio::time::timeout(Duration::from_secs(5), TcpStream::connect(host))
        .await
        .map_err(|_| bad())??;
    // The server closes the connection after the response; a chunked body is decoded.
    let request = format!("GET {path} HTTP/1.1\r\nHost: {host}\r\nConnection: close\r\n\r\n");
    stream.write_all(request.as_bytes()).await?;
    let mut response = Vec::new();
    tokio::time::timeout(Duration::from_secs(5), stream.read_to_end(&mut response))
        .await
        .map_err(|_| bad())??;
    let body = response_body(&response).ok_or_else(bad)?;
    #[derive(serde::Deserialize)]
    struct Node {
        client_addr: String,
        ws_url: String,
    }
    #[derive(serde::Deserialize)]
    struct Alloc {
        nodes: Vec<Node>,
    }
    let alloc: Alloc = serde_json::from_slice(&body)?;
    Ok(alloc
        .nodes
        .into_iter()
        .map(|n| {
            if websocket {
                Endpoint::Ws(n.ws_url)
            } else {
                Endpoint::Tcp(n.client_addr)
            }
        })
        .collect())
}

/// The body of a `200` HTTP/1.x response, de-chunked if it came in chunks; `None` for any other
/// status or a malformed response.
fn response_body(response: &[u8]) -> Option<Vec<u8>> {
    let split = response.windows(4).position(|w| w == b"\r\n\r\n")?;
    let head = std::str::from_utf8(&response[..split]).ok()?;
    let body = &response[split + 4..];
    let mut lines = head.split("\r\n");
    let status = lines.next()?;
    if !(status.starts_with("HTTP/1.1 200") || status.starts_with("HTTP/1.0 200")) {
        return None;
    }
    let chunked = lines.any(|l| {
        let l = l.to_ascii_lowercase();
        l.starts_with("transfer-encoding:") && l.contains("chunked")
    });
    if !chunked {
        return Some(body.to_vec());
    }
    let mut out = Vec::new();
    let mut rest = body;
    loop {
        let line_end = rest.windows(2).position(|w| w == b"\r\n")?;
        let size_text = std::str::from_utf8(&rest[..line_end]).ok()?;
        let size = usize::from_str_radix(size_text.split(';').next()?.trim(), 16).ok()?;
        rest = &rest[line_end + 2..];
        if size == 0 {
            return Some(out);
        }
        out.extend_from_slice(rest.get(..size)?);
        rest = rest.get(size + 2..)?;
    }
}

#[cfg(test)]
mod tests {
    use super::response_body;

    #[test]
    fn plain_and_chunked_bodies_are_read() {
        let plain = b"HTTP/1.1 200 OK\r\ncontent-length: 11\r\n\r\n{\"nodes\":[]}";
        assert_eq!(response_body(plain).unwrap(), b"{\"nodes\":[]}");
        let chunked =
            b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n5\r\n{\"nod\r\n7\r\nes\":[]}\r\n0\r\n\r\n";
        assert_eq!(response_body(chunked).unwrap(), b"{\"nodes\":[]}");
        assert!(response_body(b"HTTP/1.1 503 Service Unavailable\r\n\r\n{}").is_none());
        assert!(
            response_body(b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\nzz\r\n").is_none()
        );
    }
}
