//! A small etcd v3 client over etcd's JSON gateway (`POST /v3/...` on every client URL).
//!
//! Why not a gRPC client crate: the usual one (etcd-client, on tonic) compiles etcd's `.proto`
//! files at build time and so needs `protoc` on the build machine, and brings tonic, prost, h2
//! and tower with it. The JSON gateway is served by every etcd since 3.4 on the same port, with
//! the same TLS client certificates, and offers every call tether needs: range, transactions
//! (compare-and-swap on revisions), leases and watches. So this is HTTP/1.1 on the rustls that
//! tether already has, with serde_json; keys and values travel base64-encoded, 64-bit numbers
//! as decimal strings, and fields at their default value are left out (proto3's JSON mapping).
//!
//! Every request is bounded: one connection per call (etcd answers with a content length),
//! a deadline per attempt, at most [`MAX_ANSWER`] bytes read, and the endpoints tried in turn
//! starting from the one that answered last. A watch is one long response of JSON lines
//! (chunked), each line bounded by [`MAX_ANSWER`] too.

use base64::engine::general_purpose::STANDARD as B64;
use base64::Engine;
use bytes::{Buf, BytesMut};
use serde_json::{json, Value};
use std::path::PathBuf;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::Duration;
use tether_endpoint::http;
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};
use tokio::net::TcpStream;

/// Largest answer (or watch line) read from etcd. A whole prefix of node records is a few
/// hundred bytes a node: 64 MiB is over 100,000 nodes, and bounds what a bad endpoint can make
/// a server hold.
pub const MAX_ANSWER: usize = 64 * 1024 * 1024;
/// Keys per page of a range read ([`Etcd::range_prefix`]): a record line is at most a few
/// hundred bytes, so a page stays far below [`MAX_ANSWER`].
pub const RANGE_PAGE: usize = 1000;

/// How long one request to one endpoint may take.
pub const CALL_TIMEOUT: Duration = Duration::from_secs(3);

#[derive(Debug, thiserror::Error)]
pub enum EtcdError {
    /// No endpoint answered: the datastore is unavailable.
    #[error("datastore unavailable: no etcd endpoint answered ({0})")]
    Unavailable(String),
    /// An endpoint answered with an error.
    #[error("etcd answered {code}: {message}")]
    Answer { code: u16, message: String },
    /// An answer tether cannot read.
    #[error("unreadable answer from etcd: {0}")]
    Malformed(String),
    #[error("etcd settings: {0}")]
    Settings(String),
}

/// How to reach etcd (the `--etcd-*` settings).
#[derive(Debug, Clone, Default)]
pub struct EtcdSettings {
    /// `https://host:port`, `http://host:port` or `host:port` (TLS when a CA is given).
    pub endpoints: Vec<String>,
    pub ca: Option<PathBuf>,
    pub cert: Option<PathBuf>,
    pub key: Option<PathBuf>,
    /// Every key tether writes starts with it (default `/tether/`).
    pub prefix: String,
}

#[derive(Debug, Clone)]
struct Endpoint {
    host: String,
    port: u16,
    tls: bool,
}

impl Endpoint {
    fn parse(s: &str, tls_default: bool) -> Result<Self, EtcdError> {
        let (tls, rest) = if let Some(r) = s.strip_prefix("https://") {
            (true, r)
        } else if let Some(r) = s.strip_prefix("http://") {
            (false, r)
        } else {
            (tls_default, s)
        };
        let rest = rest.trim_end_matches('/');
        let bad = || EtcdError::Settings(format!("endpoint {s:?} is not [https://]HOST:PORT"));
        let (host, port) = rest.rsplit_once(':').ok_or_else(bad)?;
        let port = port.parse::<u16>().map_err(|_| bad())?;
        let host = host.trim_start_matches('[').trim_end_matches(']');
        if host.is_empty() {
            return Err(bad());
        }
        Ok(Endpoint {
            host: host.to_string(),
            port,
            tls,
        })
    }

    fn label(&self) -> String {
        format!("{}:{}", self.host, self.port)
    }
}

/// One key and value as etcd holds it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Kv {
    pub key: String,
    pub value: Vec<u8>,
    pub mod_revision: i64,
    pub lease: i64,
}

/// One change a watch reports.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Event {
    Put(Kv),
    Delete { key: String, mod_revision: i64 },
}

/// A comparison of a transaction.
pub enum Compare {
    /// The key's last modification revision is this (0: the key does not exist).
    ModRevision(String, i64),
}

/// An operation of a transaction.
pub enum Op {
    Put {
        key: String,
        value: Vec<u8>,
        lease: i64,
    },
    Delete(String),
}

/// The client. Cheap to share.
pub struct Etcd {
    endpoints: Vec<Endpoint>,
    tls: Option<tokio_rustls::TlsConnector>,
    prefix: String,
    /// The endpoint to try first: the one that answered last.
    next: AtomicUsize,
}

impl std::fmt::Debug for Etcd {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Etcd")
            .field("endpoints", &self.endpoints)
            .field("prefix", &self.prefix)
            .finish()
    }
}

fn b64(s: &[u8]) -> String {
    B64.encode(s)
}

/// The end of a prefix range: the prefix with its last byte raised by one.
fn range_end(prefix: &str) -> Vec<u8> {
    let mut end = prefix.as_bytes().to_vec();
    while let Some(last) = end.pop() {
        if last < 0xff {
            end.push(last + 1);
            return end;
        }
    }
    vec![0]
}

/// A decimal number as proto3 JSON writes 64-bit integers (a string), or a plain number.
fn num(v: &Value) -> i64 {
    match v {
        Value::String(s) => s.parse().unwrap_or(0),
        Value::Number(n) => n.as_i64().unwrap_or(0),
        _ => 0,
    }
}

fn decode_kv(v: &Value) -> Result<Kv, EtcdError> {
    let text = |field: &str| -> Result<Vec<u8>, EtcdError> {
        match v.get(field).and_then(Value::as_str) {
            None => Ok(Vec::new()),
            Some(s) => B64
                .decode(s)
                .map_err(|e| EtcdError::Malformed(format!("{field}: {e}"))),
        }
    };
    let key = String::from_utf8(text("key")?)
        .map_err(|_| EtcdError::Malformed("a key that is not UTF-8".into()))?;
    Ok(Kv {
        key,
        value: text("value")?,
        mod_revision: v.get("mod_revision").map(num).unwrap_or(0),
        lease: v.get("lease").map(num).unwrap_or(0),
    })
}

fn revision_of(answer: &Value) -> i64 {
    answer
        .get("header")
        .and_then(|h| h.get("revision"))
        .map(num)
        .unwrap_or(0)
}

impl Etcd {
    pub fn new(settings: &EtcdSettings) -> Result<Self, EtcdError> {
        if settings.endpoints.is_empty() {
            return Err(EtcdError::Settings(
                "--datastore etcd needs at least one --etcd-endpoints".into(),
            ));
        }
        let tls_default = settings.ca.is_some() || settings.cert.is_some();
        let endpoints = settings
            .endpoints
            .iter()
            .map(|e| Endpoint::parse(e, tls_default))
            .collect::<Result<Vec<_>, _>>()?;
        let tls = if endpoints.iter().any(|e| e.tls) {
            Some(tls_connector(settings)?)
        } else {
            None
        };
        // A prefix without its closing slash would take in a neighbour's keys: `/tether`
        // also covers `/tether-staging/nodes/...`.
        let prefix = if settings.prefix.is_empty() {
            "/tether/".to_string()
        } else if settings.prefix.ends_with('/') {
            settings.prefix.clone()
        } else {
            return Err(EtcdError::Settings(format!(
                "--etcd-prefix {:?} must end with `/` (or it would also cover the keys of {:?}...)",
                settings.prefix, settings.prefix
            )));
        };
        Ok(Etcd {
            endpoints,
            tls,
            prefix,
            next: AtomicUsize::new(0),
        })
    }

    /// The full key of a name under the prefix (`nodes/NAME`, `tokens/ID`, `servers/ID`).
    pub fn key(&self, rel: &str) -> String {
        format!("{}{rel}", self.prefix)
    }

    /// The key without the prefix, if it is under it.
    pub fn relative<'a>(&self, key: &'a str) -> Option<&'a str> {
        key.strip_prefix(&self.prefix)
    }

    pub fn endpoints(&self) -> Vec<String> {
        self.endpoints.iter().map(Endpoint::label).collect()
    }

    async fn connect(&self, ep: &Endpoint) -> std::io::Result<Box<dyn Conn>> {
        let tcp = TcpStream::connect((ep.host.as_str(), ep.port)).await?;
        let _ = tcp.set_nodelay(true);
        if !ep.tls {
            return Ok(Box::new(tcp));
        }
        let Some(tls) = &self.tls else {
            return Err(std::io::Error::other(
                "no TLS settings for an https endpoint",
            ));
        };
        let name = rustls::pki_types::ServerName::try_from(ep.host.clone())
            .map_err(|e| std::io::Error::new(std::io::ErrorKind::InvalidInput, e))?;
        Ok(Box::new(tls.connect(name, tcp).await?))
    }

    /// Sends one POST to each endpoint in turn until one answers; returns the JSON answer.
    async fn call(&self, path: &str, body: &Value) -> Result<Value, EtcdError> {
        let body = body.to_string();
        let n = self.endpoints.len();
        let first = self.next.load(Ordering::Relaxed) % n;
        let mut why = String::new();
        for i in 0..n {
            let idx = (first + i) % n;
            let ep = &self.endpoints[idx];
            let attempt = async {
                let mut conn = self.connect(ep).await?;
                post(&mut conn, &ep.label(), path, &body).await?;
                read_answer(&mut conn).await
            };
            match tokio::time::timeout(CALL_TIMEOUT, attempt).await {
                Ok(Ok((200, answer))) => {
                    self.next.store(idx, Ordering::Relaxed);
                    return serde_json::from_slice(&answer)
                        .map_err(|e| EtcdError::Malformed(e.to_string()));
                }
                Ok(Ok((code, answer))) if code < 500 && code != 408 && code != 429 => {
                    let message = serde_json::from_slice::<Value>(&answer)
                        .ok()
                        .and_then(|v| {
                            v.get("error")
                                .or_else(|| v.get("message"))
                                .and_then(Value::as_str)
                                .map(String::from)
                        })
                        .unwrap_or_else(|| String::from_utf8_lossy(&answer).into_owned());
                    return Err(EtcdError::Answer { code, message });
                }
                Ok(Ok((code, answer))) => {
                    why = format!(
                        "{}: {code} {}",
                        ep.label(),
                        String::from_utf8_lossy(&answer)
                    );
                }
                Ok(Err(e)) => why = format!("{}: {e}", ep.label()),
                Err(_) => why = format!("{}: no answer within {CALL_TIMEOUT:?}", ep.label()),
            }
        }
        Err(EtcdError::Unavailable(why))
    }

    /// Every key under `rel` (relative to the prefix), and the store's revision.
    ///
    /// Read in pages of [`RANGE_PAGE`] keys, all at the revision of the first, so that no size
    /// of the prefix makes one answer larger than [`MAX_ANSWER`] (a prefix past it once stopped
    /// every server's first read for good), and the pages add up to one consistent snapshot.
    pub async fn range_prefix(&self, rel: &str) -> Result<(Vec<Kv>, i64), EtcdError> {
        let key = self.key(rel);
        let end = range_end(&key);
        let mut from = key.into_bytes();
        let mut revision = 0i64;
        let mut all = Vec::new();
        loop {
            let mut req = json!({
                "key": b64(&from),
                "range_end": b64(&end),
                "limit": RANGE_PAGE.to_string(),
            });
            if revision != 0 {
                req["revision"] = json!(revision.to_string());
            }
            let answer = self.call("/v3/kv/range", &req).await?;
            if revision == 0 {
                revision = revision_of(&answer);
            }
            let kvs = answer
                .get("kvs")
                .and_then(Value::as_array)
                .map(|a| a.iter().map(decode_kv).collect::<Result<Vec<_>, _>>())
                .transpose()?
                .unwrap_or_default();
            let more = answer.get("more").and_then(Value::as_bool).unwrap_or(false);
            let next = kvs.last().map(|kv| {
                let mut k = kv.key.clone().into_bytes();
                k.push(0);
                k
            });
            all.extend(kvs);
            match next {
                Some(k) if more && k > from => from = k,
                _ => return Ok((all, revision)),
            }
        }
    }

    /// The revision of the latest change under the prefix still to be seen: the highest
    /// modification revision of its keys (0 when it holds none). A deletion shows only in the
    /// store's revision, not here. Costs etcd a pass over the prefix's keys (not their values).
    pub async fn latest_change(&self) -> Result<i64, EtcdError> {
        let key = self.key("");
        let answer = self
            .call(
                "/v3/kv/range",
                &json!({
                    "key": b64(key.as_bytes()),
                    "range_end": b64(&range_end(&key)),
                    "limit": "1",
                    "sort_order": "DESCEND",
                    "sort_target": "MOD",
                    "keys_only": true,
                }),
            )
            .await?;
        Ok(answer
            .get("kvs")
            .and_then(Value::as_array)
            .and_then(|a| a.first())
            .map(decode_kv)
            .transpose()?
            .map(|kv| kv.mod_revision)
            .unwrap_or(0))
    }

    /// One key (relative to the prefix), if it exists.
    pub async fn get(&self, rel: &str) -> Result<Option<Kv>, EtcdError> {
        let key = self.key(rel);
        let answer = self
            .call("/v3/kv/range", &json!({"key": b64(key.as_bytes())}))
            .await?;
        answer
            .get("kvs")
            .and_then(Value::as_array)
            .and_then(|a| a.first())
            .map(decode_kv)
            .transpose()
    }

    /// Runs `ops` if every comparison holds; true when it did. Keys are relative.
    pub async fn txn(&self, compare: &[Compare], ops: &[Op]) -> Result<bool, EtcdError> {
        let compare: Vec<Value> = compare
            .iter()
            .map(|c| match c {
                Compare::ModRevision(k, rev) => json!({
                    "key": b64(self.key(k).as_bytes()),
                    "target": "MOD",
                    "result": "EQUAL",
                    "mod_revision": rev.to_string(),
                }),
            })
            .collect();
        let success: Vec<Value> = ops
            .iter()
            .map(|op| match op {
                Op::Put { key, value, lease } => {
                    let mut put =
                        json!({"key": b64(self.key(key).as_bytes()), "value": b64(value)});
                    if *lease != 0 {
                        put["lease"] = Value::String(lease.to_string());
                    }
                    json!({ "request_put": put })
                }
                Op::Delete(key) => {
                    json!({"request_delete_range": {"key": b64(self.key(key).as_bytes())}})
                }
            })
            .collect();
        let answer = self
            .call(
                "/v3/kv/txn",
                &json!({"compare": compare, "success": success}),
            )
            .await?;
        Ok(answer
            .get("succeeded")
            .and_then(Value::as_bool)
            .unwrap_or(false))
    }

    /// Deletes one key; true when it existed.
    pub async fn delete(&self, rel: &str) -> Result<bool, EtcdError> {
        let key = self.key(rel);
        let answer = self
            .call("/v3/kv/deleterange", &json!({"key": b64(key.as_bytes())}))
            .await?;
        Ok(answer.get("deleted").map(num).unwrap_or(0) > 0)
    }

    /// A new lease of `ttl` seconds; its id.
    pub async fn lease_grant(&self, ttl: u64) -> Result<i64, EtcdError> {
        let answer = self
            .call("/v3/lease/grant", &json!({"TTL": ttl.to_string()}))
            .await?;
        match answer.get("ID").map(num) {
            Some(id) if id != 0 => Ok(id),
            _ => Err(EtcdError::Malformed("a lease without an id".into())),
        }
    }

    /// Renews a lease; its remaining seconds, 0 when it is gone.
    pub async fn lease_keepalive(&self, id: i64) -> Result<i64, EtcdError> {
        let answer = self
            .call("/v3/lease/keepalive", &json!({"ID": id.to_string()}))
            .await?;
        Ok(answer
            .get("result")
            .and_then(|r| r.get("TTL"))
            .map(num)
            .unwrap_or(0))
    }

    /// Ends a lease now, deleting its keys.
    pub async fn lease_revoke(&self, id: i64) -> Result<(), EtcdError> {
        self.call("/v3/lease/revoke", &json!({"ID": id.to_string()}))
            .await
            .map(|_| ())
    }

    /// Watches every key under the prefix from `start_revision` on, handing each batch of
    /// events to `on_events` with the revision it brings the store to. Returns when the watch
    /// ends: an error for a lost connection, `Compacted` when the revision asked for is gone.
    pub async fn watch(
        &self,
        start_revision: i64,
        mut on_events: impl FnMut(Vec<Event>, i64),
    ) -> Result<WatchEnd, EtcdError> {
        let n = self.endpoints.len();
        let first = self.next.load(Ordering::Relaxed) % n;
        let ep = &self.endpoints[first];
        let key = self.prefix.clone();
        let body = json!({"create_request": {
            "key": b64(key.as_bytes()),
            "range_end": b64(&range_end(&key)),
            "start_revision": start_revision.to_string(),
            "progress_notify": true,
        }})
        .to_string();
        let start = async {
            let mut conn = self.connect(ep).await?;
            post(&mut conn, &ep.label(), "/v3/watch", &body).await?;
            let (head, rest) = http::read_head(&mut conn)
                .await
                .map_err(|e| std::io::Error::other(e.to_string()))?;
            let (code, _) = http::parse_response(&head)?;
            Ok::<_, std::io::Error>((conn, code, rest))
        };
        let (mut conn, code, rest) = match tokio::time::timeout(CALL_TIMEOUT, start).await {
            Ok(Ok(x)) => x,
            Ok(Err(e)) => {
                self.next.store((first + 1) % n, Ordering::Relaxed);
                return Err(EtcdError::Unavailable(format!("{}: {e}", ep.label())));
            }
            Err(_) => {
                self.next.store((first + 1) % n, Ordering::Relaxed);
                return Err(EtcdError::Unavailable(format!(
                    "{}: no answer within {CALL_TIMEOUT:?}",
                    ep.label()
                )));
            }
        };
        if code != 200 {
            return Err(EtcdError::Answer {
                code,
                message: "the watch was refused".into(),
            });
        }
        let mut chunks = Chunked::new(rest);
        let mut lines = BytesMut::new();
        loop {
            // progress_notify brings a line every few minutes at most on an idle store; a
            // connection that stays silent far longer than that is dead.
            let got = tokio::time::timeout(
                Duration::from_secs(15 * 60),
                chunks.next(&mut conn, &mut lines),
            )
            .await
            .map_err(|_| EtcdError::Unavailable(format!("{}: the watch went silent", ep.label())))?
            .map_err(|e| EtcdError::Unavailable(format!("{}: {e}", ep.label())))?;
            if !got {
                return Err(EtcdError::Unavailable(format!(
                    "{}: the watch ended",
                    ep.label()
                )));
            }
            while let Some(i) = lines.iter().position(|b| *b == b'\n') {
                let line = lines.split_to(i + 1);
                let line = &line[..line.len() - 1];
                if line.iter().all(u8::is_ascii_whitespace) {
                    continue;
                }
                let v: Value = serde_json::from_slice(line)
                    .map_err(|e| EtcdError::Malformed(format!("a watch line: {e}")))?;
                if let Some(err) = v.get("error") {
                    return Err(EtcdError::Malformed(format!("the watch failed: {err}")));
                }
                let Some(result) = v.get("result") else {
                    continue;
                };
                let compact = result.get("compact_revision").map(num).unwrap_or(0);
                if compact > 0 {
                    return Ok(WatchEnd::Compacted(compact));
                }
                if result.get("canceled").and_then(Value::as_bool) == Some(true) {
                    return Ok(WatchEnd::Canceled);
                }
                let mut events = Vec::new();
                for e in result
                    .get("events")
                    .and_then(Value::as_array)
                    .into_iter()
                    .flatten()
                {
                    let Some(kv) = e.get("kv") else { continue };
                    let kv = decode_kv(kv)?;
                    if e.get("type").and_then(Value::as_str) == Some("DELETE") {
                        events.push(Event::Delete {
                            key: kv.key,
                            mod_revision: kv.mod_revision,
                        });
                    } else {
                        events.push(Event::Put(kv));
                    }
                }
                on_events(events, revision_of(result));
            }
            if lines.len() > MAX_ANSWER {
                return Err(EtcdError::Malformed("a watch line over the bound".into()));
            }
        }
    }
}

/// Why a watch ended without an error.
#[derive(Debug, PartialEq, Eq)]
pub enum WatchEnd {
    /// The revision asked for was compacted away: read everything again.
    Compacted(i64),
    Canceled,
}

trait Conn: AsyncRead + AsyncWrite + Unpin + Send {}
impl<T: AsyncRead + AsyncWrite + Unpin + Send> Conn for T {}

fn tls_connector(s: &EtcdSettings) -> Result<tokio_rustls::TlsConnector, EtcdError> {
    use tether_transport::tls;
    let Some(ca) = &s.ca else {
        return Err(EtcdError::Settings(
            "an https etcd endpoint needs --etcd-ca".into(),
        ));
    };
    let roots = tls::load_roots(ca).map_err(|e| EtcdError::Settings(e.to_string()))?;
    let builder = rustls::ClientConfig::builder_with_provider(tls::provider())
        .with_safe_default_protocol_versions()
        .map_err(|e| EtcdError::Settings(e.to_string()))?
        .with_root_certificates(roots);
    let mut cfg = match (&s.cert, &s.key) {
        (Some(cert), Some(key)) => {
            let id =
                tls::Identity::load(cert, key).map_err(|e| EtcdError::Settings(e.to_string()))?;
            builder
                .with_client_auth_cert(id.chain, id.key)
                .map_err(|e| EtcdError::Settings(e.to_string()))?
        }
        (None, None) => builder.with_no_client_auth(),
        _ => {
            return Err(EtcdError::Settings(
                "--etcd-cert and --etcd-key go together".into(),
            ))
        }
    };
    cfg.alpn_protocols = vec![b"http/1.1".to_vec()];
    Ok(tokio_rustls::TlsConnector::from(Arc::new(cfg)))
}

async fn post<S: AsyncWrite + Unpin>(
    s: &mut S,
    host: &str,
    path: &str,
    body: &str,
) -> std::io::Result<()> {
    // `hasleader` (gRPC metadata, passed by the gateway from this header): a member cut off
    // from the cluster's leader refuses the call, and ends a watch, instead of answering from
    // a stale copy; the client then moves to the next endpoint. Kubernetes' apiserver asks
    // the same of its watches.
    let req = format!(
        "POST {path} HTTP/1.1\r\nhost: {host}\r\ncontent-type: application/json\r\ngrpc-metadata-hasleader: true\r\ncontent-length: {}\r\nconnection: close\r\n\r\n{body}",
        body.len()
    );
    s.write_all(req.as_bytes()).await?;
    s.flush().await
}

/// Reads a whole answer with a content length (as etcd sends unary answers), bounded.
async fn read_answer<S: AsyncRead + Unpin>(s: &mut S) -> std::io::Result<(u16, Vec<u8>)> {
    let (head, rest) = http::read_head(s)
        .await
        .map_err(|e| std::io::Error::other(e.to_string()))?;
    let (code, length) = http::parse_response(&head)?;
    // Streaming calls (a lease keepalive) answer in chunks.
    let head_text = String::from_utf8_lossy(&head).to_ascii_lowercase();
    if length.is_none() && head_text.contains("transfer-encoding: chunked") {
        let mut chunks = Chunked::new(rest);
        let mut body = BytesMut::new();
        while chunks.next(s, &mut body).await? {
            if body.len() > MAX_ANSWER {
                return Err(std::io::Error::other("an answer over the bound"));
            }
        }
        return Ok((code, body.to_vec()));
    }
    let want = length.unwrap_or(MAX_ANSWER);
    if want > MAX_ANSWER {
        return Err(std::io::Error::other(format!(
            "an answer of {want} bytes, over {MAX_ANSWER}"
        )));
    }
    let mut body = rest.to_vec();
    let mut buf = vec![0u8; 16 * 1024];
    while body.len() < want {
        let n = s.read(&mut buf).await?;
        if n == 0 {
            break;
        }
        body.extend_from_slice(&buf[..n]);
    }
    if length.is_some_and(|l| body.len() < l) {
        return Err(std::io::ErrorKind::UnexpectedEof.into());
    }
    body.truncate(want);
    Ok((code, body))
}

/// A decoder of HTTP/1.1 chunked bodies, kept across reads (a watch's answer).
struct Chunked {
    buf: BytesMut,
    /// Bytes left of the chunk being read, when inside one.
    left: Option<usize>,
    /// The last (empty) chunk was read.
    done: bool,
}

impl Chunked {
    fn new(rest: bytes::Bytes) -> Self {
        Chunked {
            buf: BytesMut::from(&rest[..]),
            left: None,
            done: false,
        }
    }

    /// Moves decoded body bytes to `out`; false at the body's end.
    async fn next<S: AsyncRead + Unpin + ?Sized>(
        &mut self,
        s: &mut S,
        out: &mut BytesMut,
    ) -> std::io::Result<bool> {
        loop {
            match self.decode(out)? {
                Some(true) => return Ok(true),
                Some(false) => return Ok(false),
                None => {}
            }
            if self.buf.len() > 64 * 1024 && self.left.is_none() {
                return Err(std::io::Error::other("a chunk header over 64 KiB"));
            }
            let n = s.read_buf(&mut self.buf).await?;
            if n == 0 {
                return Ok(false);
            }
        }
    }

    /// `Some(true)` when bytes were decoded, `Some(false)` at the end, `None` for more input.
    fn decode(&mut self, out: &mut BytesMut) -> std::io::Result<Option<bool>> {
        let mut moved = false;
        loop {
            if self.done {
                return Ok(Some(moved));
            }
            match self.left {
                Some(0) => {
                    if self.buf.len() < 2 {
                        return Ok(moved.then_some(true));
                    }
                    self.buf.advance(2);
                    self.left = None;
                }
                Some(n) => {
                    if self.buf.is_empty() {
                        return Ok(moved.then_some(true));
                    }
                    let take = n.min(self.buf.len());
                    out.extend_from_slice(&self.buf.split_to(take));
                    self.left = Some(n - take);
                    moved = true;
                }
                None => {
                    let Some(i) = self.buf.windows(2).position(|w| w == b"\r\n") else {
                        return Ok(moved.then_some(true));
                    };
                    let line = self.buf.split_to(i + 2);
                    let size = std::str::from_utf8(&line[..i])
                        .ok()
                        .map(|l| l.split(';').next().unwrap_or("").trim())
                        .and_then(|h| usize::from_str_radix(h, 16).ok())
                        .ok_or_else(|| std::io::Error::other("a bad chunk size"))?;
                    if size == 0 {
                        self.done = true;
                        continue;
                    }
                    if size > MAX_ANSWER {
                        return Err(std::io::Error::other("a chunk over the bound"));
                    }
                    self.left = Some(size);
                }
            }
        }
    }
}

#[cfg(test)]
mod tests;
