//! HTTP/1, as much as tether speaks: request heads for its two small servers (the admin endpoint
//! serves `GET`, the egress proxy `CONNECT`), answers with a fixed length, and one `GET` client
//! (the `status` command, the apiserver readiness check, tests and benchmarks).
//!
//! Parsing is `httparse`'s, the parser under hyper: a head is bytes a stranger sends, and a
//! well-fuzzed parser is worth more than a hand-written one. The functions here bound what they
//! read and never panic (`endpoint/fuzz` fuzzes both request parsers).

use bytes::Bytes;
use std::io;
use std::time::Duration;
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};

/// Most bytes of a request or response head, and most headers in it.
pub const MAX_HEAD: usize = 8 * 1024;
const MAX_HEADERS: usize = 32;

/// Why a head could not be read.
#[derive(Debug, thiserror::Error)]
pub enum HeadError {
    #[error("the head is larger than {MAX_HEAD} bytes")]
    TooLarge,
    #[error("the connection ended before the head did")]
    Ended,
    #[error(transparent)]
    Io(#[from] io::Error),
}

impl HeadError {
    /// The status a server answers this with.
    pub fn status(&self) -> u16 {
        match self {
            HeadError::TooLarge => 431,
            HeadError::Ended | HeadError::Io(_) => 400,
        }
    }
}

/// Reads up to the blank line that ends a head; returns the head and the bytes read after it.
/// Reads at most [`MAX_HEAD`] bytes plus one read.
pub async fn read_head<S: AsyncRead + Unpin>(s: &mut S) -> Result<(Vec<u8>, Bytes), HeadError> {
    let mut buf = Vec::with_capacity(512);
    let mut chunk = [0u8; 1024];
    loop {
        let n = s.read(&mut chunk).await?;
        if n == 0 {
            return Err(HeadError::Ended);
        }
        // Only the new bytes (and the three before them) can complete the terminator.
        let from = buf.len().saturating_sub(3);
        buf.extend_from_slice(&chunk[..n]);
        if let Some(i) = buf[from..].windows(4).position(|w| w == b"\r\n\r\n") {
            let end = from + i + 4;
            let rest = Bytes::copy_from_slice(&buf[end..]);
            buf.truncate(end);
            return Ok((buf, rest));
        }
        if buf.len() > MAX_HEAD {
            return Err(HeadError::TooLarge);
        }
    }
}

/// A parsed request line: the method and the target as sent.
fn parse_request_line(head: &[u8]) -> Result<(String, String), (u16, String)> {
    let mut headers = [httparse::EMPTY_HEADER; MAX_HEADERS];
    let mut req = httparse::Request::new(&mut headers);
    match req.parse(head) {
        Ok(httparse::Status::Complete(_)) => {}
        Ok(httparse::Status::Partial) => return Err((400, "incomplete request head".into())),
        Err(httparse::Error::TooManyHeaders) => {
            return Err((431, format!("more than {MAX_HEADERS} headers")))
        }
        Err(e) => return Err((400, format!("malformed request: {e}"))),
    }
    match (req.method, req.path) {
        (Some(m), Some(p)) => Ok((m.to_string(), p.to_string())),
        _ => Err((400, "malformed request line".into())),
    }
}

/// The method and path (without query) of an origin-form request (`GET /metrics HTTP/1.1`).
pub fn parse_request(head: &[u8]) -> Option<(String, String)> {
    let (method, target) = parse_request_line(head).ok()?;
    if !target.starts_with('/') {
        return None;
    }
    let path = target.split('?').next().unwrap_or("");
    Some((method, path.to_string()))
}

/// A parsed CONNECT request.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ConnectRequest {
    pub host: String,
    pub port: u16,
}

/// Parses a CONNECT request head; the error is the HTTP status and reason to answer with.
pub fn parse_connect(head: &[u8]) -> Result<ConnectRequest, (u16, String)> {
    let (method, target) = parse_request_line(head)?;
    if method != "CONNECT" {
        return Err((405, "only CONNECT is served".into()));
    }
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

/// A parsed response head: the status code and the content length, if it gave one.
pub fn parse_response(head: &[u8]) -> io::Result<(u16, Option<usize>)> {
    let mut headers = [httparse::EMPTY_HEADER; MAX_HEADERS];
    let mut resp = httparse::Response::new(&mut headers);
    let bad = |why: String| io::Error::new(io::ErrorKind::InvalidData, why);
    match resp.parse(head) {
        Ok(httparse::Status::Complete(_)) => {}
        Ok(httparse::Status::Partial) => return Err(bad("incomplete response head".into())),
        Err(e) => return Err(bad(format!("not an HTTP answer: {e}"))),
    }
    let code = resp.code.ok_or_else(|| bad("no status code".into()))?;
    let length = resp
        .headers
        .iter()
        .find(|h| h.name.eq_ignore_ascii_case("content-length"))
        .map(|h| {
            std::str::from_utf8(h.value)
                .ok()
                .and_then(|v| v.trim().parse::<usize>().ok())
                .ok_or_else(|| bad("bad content-length".into()))
        })
        .transpose()?;
    Ok((code, length))
}

/// The reason phrase of the codes tether answers with.
pub fn reason(code: u16) -> &'static str {
    match code {
        200 => "OK",
        400 => "Bad Request",
        403 => "Forbidden",
        404 => "Not Found",
        405 => "Method Not Allowed",
        408 => "Request Timeout",
        409 => "Conflict",
        431 => "Request Header Fields Too Large",
        500 => "Internal Server Error",
        502 => "Bad Gateway",
        503 => "Service Unavailable",
        504 => "Gateway Timeout",
        _ => "Error",
    }
}

/// Writes a whole answer (one per connection) and closes the sending side.
pub async fn respond<S: AsyncWrite + Unpin>(
    s: &mut S,
    code: u16,
    content_type: &str,
    body: &[u8],
) -> io::Result<()> {
    let head = format!(
        "HTTP/1.1 {code} {}\r\ncontent-type: {content_type}\r\ncontent-length: {}\r\nconnection: close\r\n\r\n",
        reason(code),
        body.len()
    );
    s.write_all(head.as_bytes()).await?;
    s.write_all(body).await?;
    s.shutdown().await
}

/// Sends `GET path` on a connection and reads the answer: its status and at most `max_body`
/// bytes of body (up to its content length, or to the end of the connection).
pub async fn get<S: AsyncRead + AsyncWrite + Unpin>(
    s: &mut S,
    host: &str,
    path: &str,
    max_body: usize,
) -> io::Result<(u16, Vec<u8>)> {
    let req = format!("GET {path} HTTP/1.1\r\nhost: {host}\r\nconnection: close\r\n\r\n");
    s.write_all(req.as_bytes()).await?;
    let (head, rest) = read_head(s).await.map_err(|e| match e {
        HeadError::Io(e) => e,
        other => io::Error::new(io::ErrorKind::InvalidData, other.to_string()),
    })?;
    let (code, length) = parse_response(&head)?;
    let want = length.unwrap_or(max_body);
    if want > max_body {
        return Err(io::Error::new(
            io::ErrorKind::InvalidData,
            format!("answer of {want} bytes is larger than {max_body}"),
        ));
    }
    let mut body = rest.to_vec();
    body.truncate(want);
    let mut chunk = [0u8; 8192];
    while body.len() < want {
        let n = s.read(&mut chunk).await?;
        if n == 0 {
            break;
        }
        let take = n.min(want - body.len());
        body.extend_from_slice(&chunk[..take]);
    }
    if length.is_some_and(|l| body.len() < l) {
        return Err(io::ErrorKind::UnexpectedEof.into());
    }
    Ok((code, body))
}

/// [`get`] over plain TCP from synchronous code (the `status` command), within `timeout` in all.
pub fn get_blocking(addr: &str, path: &str, timeout: Duration) -> io::Result<(u16, Vec<u8>)> {
    const MAX_STATUS: usize = 64 * 1024 * 1024;
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()?;
    rt.block_on(async {
        let exchange = async {
            let mut tcp = tokio::net::TcpStream::connect(addr).await?;
            get(&mut tcp, addr, path, MAX_STATUS).await
        };
        tokio::time::timeout(timeout, exchange)
            .await
            .unwrap_or_else(|_| Err(io::Error::new(io::ErrorKind::TimedOut, "no answer in time")))
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn requests_parse_or_name_their_status() {
        assert_eq!(
            parse_request(b"GET /metrics?x=1 HTTP/1.1\r\nhost: a\r\n\r\n"),
            Some(("GET".into(), "/metrics".into()))
        );
        assert_eq!(parse_request(b"GET metrics HTTP/1.1\r\n\r\n"), None);
        assert_eq!(parse_request(b"GET / HTTP/2\r\n\r\n"), None);
        let r =
            parse_connect(b"CONNECT node-1:10250 HTTP/1.1\r\nHost: node-1:10250\r\n\r\n").unwrap();
        assert_eq!((r.host.as_str(), r.port), ("node-1", 10250));
        let r = parse_connect(b"CONNECT [fd00::1]:10250 HTTP/1.1\r\n\r\n").unwrap();
        assert_eq!(r.host, "fd00::1");
        assert_eq!(parse_connect(b"GET / HTTP/1.1\r\n\r\n").unwrap_err().0, 405);
        for bad in [
            &b"CONNECT node HTTP/1.1\r\n\r\n"[..],
            b"CONNECT node:99999 HTTP/1.1\r\n\r\n",
            b"CONNECT :1 HTTP/1.1\r\n\r\n",
            b"CONNECT a:1 SPDY/3\r\n\r\n",
            b"\xff\xfe\r\n\r\n",
        ] {
            assert_eq!(parse_connect(bad).unwrap_err().0, 400, "{bad:?}");
        }
        let many: String = (0..40).map(|i| format!("h{i}: v\r\n")).collect();
        let head = format!("CONNECT a:1 HTTP/1.1\r\n{many}\r\n");
        assert_eq!(parse_connect(head.as_bytes()).unwrap_err().0, 431);
    }

    #[tokio::test]
    async fn get_reads_a_bounded_answer() {
        let (mut client, mut server) = tokio::io::duplex(64 * 1024);
        let serve = tokio::spawn(async move {
            let (head, _) = read_head(&mut server).await.unwrap();
            assert_eq!(parse_request(&head).unwrap().1, "/status");
            respond(&mut server, 200, "application/json", b"{\"a\":1}").await
        });
        let (code, body) = get(&mut client, "x", "/status", 1024).await.unwrap();
        assert_eq!((code, body.as_slice()), (200, &b"{\"a\":1}"[..]));
        serve.await.unwrap().unwrap();

        let (mut client, mut server) = tokio::io::duplex(64 * 1024);
        tokio::spawn(async move {
            let _ = read_head(&mut server).await;
            respond(&mut server, 200, "text/plain", &[b'x'; 4096]).await
        });
        assert!(
            get(&mut client, "x", "/", 1024).await.is_err(),
            "over the bound"
        );
    }

    #[tokio::test]
    async fn heads_are_bounded() {
        let (mut a, mut b) = tokio::io::duplex(64 * 1024);
        tokio::spawn(async move { a.write_all(&[b'a'; MAX_HEAD + 2048]).await });
        assert!(matches!(read_head(&mut b).await, Err(HeadError::TooLarge)));
    }
}
