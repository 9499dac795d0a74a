//! HTTP/1 request heads, parsed for the two small HTTP servers tether runs: the admin
//! endpoint (`GET`) and the egress proxy (`CONNECT`). Pure functions over bytes a stranger
//! sends, fuzzed (`fuzz/fuzz_targets/connect_request.rs`, `admin_request.rs`).

/// The method and path (without query) of a request head, if its first line is one.
pub fn parse_request(head: &[u8]) -> Option<(String, String)> {
    let text = std::str::from_utf8(head).ok()?;
    let line = text.lines().next()?;
    let mut parts = line.split_whitespace();
    let method = parts.next()?;
    let target = parts.next()?;
    let version = parts.next()?;
    if !version.starts_with("HTTP/1.") || !target.starts_with('/') {
        return None;
    }
    let path = target.split('?').next().unwrap_or("");
    Some((method.to_string(), path.to_string()))
}

/// A parsed CONNECT request.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ConnectRequest {
    pub host: String,
    pub port: u16,
}

/// Parses a request head; the error is the HTTP status and reason to answer with.
pub fn parse_connect(head: &[u8]) -> Result<ConnectRequest, (u16, String)> {
    let text = std::str::from_utf8(head).map_err(|_| (400, "request is not text".to_string()))?;
    let line = text.lines().next().unwrap_or_default();
    let mut parts = line.split_whitespace();
    let (method, target, version) = (parts.next(), parts.next(), parts.next());
    if !matches!(version, Some(v) if v.starts_with("HTTP/1.")) {
        return Err((400, "not an HTTP/1.x request".into()));
    }
    if method != Some("CONNECT") {
        return Err((405, "only CONNECT is served".into()));
    }
    let target = target.unwrap_or_default();
    let (host, port) = target
        .rsplit_once(':')
        .ok_or((400, format!("{target:?} is not host:port")))?;
    let port: u16 = port
        .parse()
        .map_err(|_| (400, format!("{target:?} has no valid port")))?;
    let host = host.trim_start_matches('[').trim_end_matches(']');
    if host.is_empty() || host.len() > 253 {
        return Err((400, format!("{target:?} has no valid host")));
    }
    Ok(ConnectRequest {
        host: host.to_string(),
        port,
    })
}
