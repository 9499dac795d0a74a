//! tether's wire protocol as pure codecs: bytes in, frames out, no I/O.
//!
//! This crate depends on `bytes` and `thiserror` alone, so the fuzz targets and anyone
//! reading the protocol need nothing else. It holds the protocol's messages (this module) and the
//! per-stream framing of the TLS-over-TCP transport ([`stream_framing`]).
//!
//! Everything that crosses a tunnel between an agent and a server, or between two servers, is a
//! frame:
//!
//! ```text
//! +---------+-----------------+------------------------+
//! | type u8 | length u16 (BE) | body (length bytes)    |
//! +---------+-----------------+------------------------+
//! ```
//!
//! A tunnel carries one control stream, which opens with [`Message::Hello`], and one stream per
//! relayed TCP connection, which opens with [`Message::Open`] and is answered by
//! [`Message::Status`] before any payload flows. After the status, the stream carries raw bytes.
//!
//! The decoder is written for hostile input: it never panics, never allocates more than one frame
//! ([`MAX_FRAME_BODY`]) and reports the first thing that is wrong. Frame types it does not know
//! decode as [`Message::Unknown`], so that a newer peer can add control messages without breaking
//! an older one. See `docs/protocol.md` for the full specification.

#![forbid(unsafe_code)]

pub mod stream_framing;

/// The buffer types of the codecs' signatures, for users (the fuzz targets) that need no other crate.
pub use bytes;

use bytes::{Buf, BufMut, Bytes, BytesMut};
use std::fmt;

/// The protocol version this build speaks. A peer announces the range it speaks in its hello.
pub const PROTOCOL_VERSION: u8 = 1;
/// The oldest version this build still speaks.
pub const MIN_PROTOCOL_VERSION: u8 = 1;
/// Largest frame body accepted. Every message fits easily; anything bigger is hostile or broken.
pub const MAX_FRAME_BODY: usize = 16 * 1024;
/// Bytes before the body: type and length.
pub const FRAME_HEADER_LEN: usize = 3;
/// Largest number of items in any list carried by a message (servers, addresses, capabilities).
pub const MAX_LIST_ITEMS: usize = 256;
/// The service every server offers: its kube-apiserver.
pub const SERVICE_APISERVER: &str = "apiserver";

/// Capabilities: the named features a side announces in its [`Message::Hello`] or
/// [`Message::Welcome`].
///
/// A behaviour that an older release does not know is used only when the other side announced
/// its capability, so agents and servers one minor release apart keep working together (the
/// promise in `docs/protocol.md`). Names a side does not know are kept but mean nothing to it.
pub mod capability {
    use std::collections::BTreeSet;

    /// Offered by every server since 0.1: the kube-apiserver service.
    pub const APISERVER: &str = super::SERVICE_APISERVER;
    /// Said by a server that dials a peer (since 0.1): the tunnel is a server-to-server link.
    pub const PEER: &str = "peer";
    /// Since 0.2: node records travel as [`super::Message::NodeRecordV2`], ordered by epoch and
    /// version instead of clocks, in both directions of a server-to-server link.
    pub const RECORDS_V2: &str = "records-v2";
    /// Since 0.3: node records carry the addresses each node owns (a record with addresses
    /// travels as a frame of kind `NODE_RECORD_V3`); a peer without it gets them without.
    pub const RECORDS_ADDRESSES: &str = "records-addresses";
    /// Since 0.2: the side announces its capabilities. A hello or welcome without it comes from
    /// 0.1, which knows only [`APISERVER`] and [`PEER`].
    pub const CAPABILITIES: &str = "caps";

    /// Since 0.2: a server that reads an `Open` leaves the bytes behind it on the stream, and
    /// relays them once its upstream is connected, so an agent may send a TLS client's first
    /// bytes with the open (docs/protocol.md, "Early bytes").
    pub const EARLY_DATA: &str = "early-data";

    /// Since 0.3, said by agents and servers: liveness is the agent's to probe. The agent sends
    /// [`super::Message::Ping`] as often as its NAT bindings need and when it doubts a server;
    /// the server answers each with [`super::Message::Pong`], sends no heartbeats of its own
    /// over TCP, and reports a peer server it lost with [`super::Message::ServerDown`]. Idle
    /// tunnels go near-silent, and a link blackout no longer reads as a dead server
    /// (docs/operations.md, "Liveness: a dead server, or a dead link").
    pub const LIVENESS: &str = "liveness";

    /// What this build announces on every tunnel, besides the role-specific [`PEER`].
    pub const ANNOUNCED: &[&str] = &[
        APISERVER,
        CAPABILITIES,
        RECORDS_V2,
        EARLY_DATA,
        RECORDS_ADDRESSES,
        LIVENESS,
    ];

    /// Longest capability name kept; longer ones are ignored.
    pub const MAX_NAME: usize = 64;

    /// The capabilities the other side announced.
    #[derive(Debug, Clone, Default, PartialEq, Eq)]
    pub struct Capabilities(BTreeSet<String>);

    impl Capabilities {
        /// What this build announces, plus `extra` (for example [`PEER`]).
        pub fn ours(extra: &[&str]) -> Vec<String> {
            ANNOUNCED
                .iter()
                .chain(extra.iter())
                .map(|s| s.to_string())
                .collect()
        }

        /// The set a peer announced. The list is already bounded by the decoder
        /// ([`super::MAX_LIST_ITEMS`]); names longer than [`MAX_NAME`] are dropped.
        pub fn from_announced(list: &[String]) -> Self {
            Capabilities(
                list.iter()
                    .filter(|c| !c.is_empty() && c.len() <= MAX_NAME)
                    .cloned()
                    .collect(),
            )
        }

        pub fn has(&self, name: &str) -> bool {
            self.0.contains(name)
        }

        /// The names, sorted (for `status`).
        pub fn names(&self) -> Vec<String> {
            self.0.iter().cloned().collect()
        }
    }
}

/// A service name that breaks the rule of [`validate_service_name`].
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("service name {0:?}: use 1 to 63 lowercase letters, digits and dashes")]
pub struct BadServiceName(pub String);

/// Checks a service name: 1 to 63 lowercase letters, digits and dashes, as in a DNS label, so
/// that names read the same in flags, logs and metrics.
pub fn validate_service_name(name: &str) -> Result<(), BadServiceName> {
    let ok = !name.is_empty()
        && name.len() <= 63
        && name
            .bytes()
            .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'-');
    if ok {
        Ok(())
    } else {
        Err(BadServiceName(name.to_string()))
    }
}

mod kind {
    pub const HELLO: u8 = 0x01;
    pub const WELCOME: u8 = 0x02;
    pub const SERVER_LIST: u8 = 0x03;
    pub const HEALTH: u8 = 0x04;
    pub const DRAIN: u8 = 0x05;
    pub const NODE_INFO: u8 = 0x06;
    pub const NODE_RECORD: u8 = 0x07;
    pub const NODE_RECORD_V2: u8 = 0x08;
    /// A [`super::Message::NodeRecordV2`] with the addresses the node owns (since 0.3, to
    /// peers that announced [`super::capability::RECORDS_ADDRESSES`]).
    pub const NODE_RECORD_V3: u8 = 0x09;
    /// Liveness (since 0.3, behind [`super::capability::LIVENESS`]).
    pub const PING: u8 = 0x0a;
    pub const PONG: u8 = 0x0b;
    pub const SERVER_DOWN: u8 = 0x0c;
    pub const OPEN: u8 = 0x10;
    pub const STATUS: u8 = 0x11;
    pub const JOIN: u8 = 0x20;
    pub const RENEW: u8 = 0x21;
    pub const CERTIFICATE: u8 = 0x22;
}

/// Application error codes used when a stream is reset or a tunnel is closed.
pub mod code {
    /// Normal close.
    pub const OK: u32 = 0;
    /// The TCP connection at the other end was reset; the reset travels on.
    pub const RESET: u32 = 1;
    /// The peer broke the protocol.
    pub const PROTOCOL: u32 = 2;
    /// The process is shutting down.
    pub const SHUTDOWN: u32 = 3;
    /// A limit was reached.
    pub const LIMIT: u32 = 4;
    /// The node was revoked.
    pub const REVOKED: u32 = 5;
    /// The peer's credentials were refused.
    pub const REFUSED: u32 = 6;
}

/// What a stream asks the far side to reach.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Target {
    /// A named service of the server, such as [`SERVICE_APISERVER`].
    Service(String),
    /// A host (name or IP literal) and port, reached by the far side. Used by the reverse path.
    Address { host: String, port: u16 },
}

impl fmt::Display for Target {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Target::Service(s) => write!(f, "service {s}"),
            Target::Address { host, port } if host.contains(':') => write!(f, "[{host}]:{port}"),
            Target::Address { host, port } => write!(f, "{host}:{port}"),
        }
    }
}

/// The answer to [`Message::Open`]. Numbers are part of the protocol: never reuse one.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum StatusCode {
    Ok,
    UpstreamUnreachable,
    RefusedByPolicy,
    UnknownService,
    Busy,
    Draining,
    Timeout,
    NoRoute,
    BadRequest,
    /// The address asked for is owned by more than one node (reverse path, between peers).
    Contested,
    /// A code this build does not know; treated as a failure.
    Other(u8),
}

impl StatusCode {
    pub fn to_u8(self) -> u8 {
        match self {
            StatusCode::Ok => 0,
            StatusCode::UpstreamUnreachable => 1,
            StatusCode::RefusedByPolicy => 2,
            StatusCode::UnknownService => 3,
            StatusCode::Busy => 4,
            StatusCode::Draining => 5,
            StatusCode::Timeout => 6,
            StatusCode::NoRoute => 7,
            StatusCode::BadRequest => 8,
            StatusCode::Contested => 9,
            StatusCode::Other(n) => n,
        }
    }

    pub fn from_u8(n: u8) -> Self {
        match n {
            0 => StatusCode::Ok,
            1 => StatusCode::UpstreamUnreachable,
            2 => StatusCode::RefusedByPolicy,
            3 => StatusCode::UnknownService,
            4 => StatusCode::Busy,
            5 => StatusCode::Draining,
            6 => StatusCode::Timeout,
            7 => StatusCode::NoRoute,
            8 => StatusCode::BadRequest,
            9 => StatusCode::Contested,
            n => StatusCode::Other(n),
        }
    }

    /// A short, stable label for metrics and logs.
    pub fn label(self) -> &'static str {
        match self {
            StatusCode::Ok => "ok",
            StatusCode::UpstreamUnreachable => "upstream_unreachable",
            StatusCode::RefusedByPolicy => "refused_by_policy",
            StatusCode::UnknownService => "unknown_service",
            StatusCode::Busy => "busy",
            StatusCode::Draining => "draining",
            StatusCode::Timeout => "timeout",
            StatusCode::NoRoute => "no_route",
            StatusCode::BadRequest => "bad_request",
            StatusCode::Contested => "contested",
            StatusCode::Other(_) => "other",
        }
    }
}

impl fmt::Display for StatusCode {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            StatusCode::Other(n) => write!(f, "unknown status {n}"),
            s => f.write_str(&s.label().replace('_', " ")),
        }
    }
}

/// One server as announced to agents and peers.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ServerInfo {
    /// Address agents dial, `host:port`.
    pub addr: String,
    pub healthy: bool,
    pub draining: bool,
}

/// The state of a node name, as servers tell each other (see `tether_certs::records`).
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum RecordState {
    /// Owned by the key with this hex SHA-256.
    Owned(String),
    Revoked,
    Forgotten,
}

/// Every message of the protocol.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Message {
    /// First frame of the control stream, from the dialing side.
    Hello {
        min_version: u8,
        max_version: u8,
        /// What the dialer calls itself. Informational only: the server takes the node name from
        /// the client certificate.
        node_name: String,
        capabilities: Vec<String>,
    },
    /// The accepting side's answer to [`Message::Hello`].
    Welcome {
        version: u8,
        server_id: String,
        capabilities: Vec<String>,
    },
    /// The servers of the control plane, as the sender knows them.
    ServerList { servers: Vec<ServerInfo> },
    /// The sender's upstream health.
    Health { upstream_healthy: bool },
    /// The sender is draining: open no new streams to it.
    Drain,
    /// The node's addresses, so that the control plane can find it by IP.
    NodeInfo { addresses: Vec<String> },
    /// First frame of every relayed stream.
    Open {
        version: u8,
        target: Target,
        /// How many servers have already relayed this stream (peer relay stops at one hop).
        hops: u8,
    },
    /// The answer to [`Message::Open`]; payload follows only after [`StatusCode::Ok`].
    Status { code: StatusCode, message: String },
    /// One node record, from a server to its peers on the control stream.
    NodeRecord {
        name: String,
        state: RecordState,
        at_ms: u64,
    },
    /// One node record, ordered without clocks (since 0.2, to peers that announced
    /// [`capability::RECORDS_V2`]): `epoch` counts the name's forgets, `version` its writes
    /// within the epoch, `writer` breaks ties; `at_ms` is informational. `previous` is the key
    /// before a renewal (empty: none), good for new tunnels until the new one is `seen`.
    NodeRecordV2 {
        name: String,
        state: RecordState,
        epoch: u32,
        version: u64,
        writer: String,
        at_ms: u64,
        previous: String,
        seen: bool,
        /// The IP addresses the node owns, as text (empty for a 0.2 peer, which sends none
        /// and must be sent none).
        addresses: Vec<String>,
    },
    /// First frame of the one stream of a join connection: a token and a signing request.
    Join {
        token_id: String,
        secret: String,
        node_name: String,
        csr: Vec<u8>,
    },
    /// First frame of a renewal stream on an authenticated tunnel: a new signing request.
    Renew { csr: Vec<u8> },
    /// The answer to `Join` or `Renew`: a certificate, or why not.
    Certificate {
        code: StatusCode,
        message: String,
        cert_pem: String,
        ca_pem: String,
    },
    /// An agent asks a server whether it is there (control stream, agent to server); the
    /// server answers with a [`Message::Pong`] carrying the same nonce.
    Ping { nonce: u64 },
    /// A server's answer to [`Message::Ping`].
    Pong { nonce: u64 },
    /// A server tells its agents that it lost its link to the peer server with this instance id
    /// (the `server_id` of that server's welcome). An agent takes it as a reason to probe that
    /// server at once, never as a verdict by itself.
    ServerDown { server_id: String },
    /// A frame of a type this build does not know. Control streams skip it.
    Unknown { kind: u8, len: usize },
}

impl Message {
    pub fn name(&self) -> &'static str {
        match self {
            Message::Hello { .. } => "hello",
            Message::Welcome { .. } => "welcome",
            Message::ServerList { .. } => "server-list",
            Message::Health { .. } => "health",
            Message::Drain => "drain",
            Message::NodeInfo { .. } => "node-info",
            Message::Open { .. } => "open",
            Message::Status { .. } => "status",
            Message::NodeRecord { .. } => "node-record",
            Message::NodeRecordV2 { .. } => "node-record-v2",
            Message::Join { .. } => "join",
            Message::Renew { .. } => "renew",
            Message::Certificate { .. } => "certificate",
            Message::Ping { .. } => "ping",
            Message::Pong { .. } => "pong",
            Message::ServerDown { .. } => "server-down",
            Message::Unknown { .. } => "unknown",
        }
    }
}

/// Why bytes could not be decoded. Every variant is a protocol violation by the peer.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum DecodeError {
    #[error("frame body of {0} bytes exceeds the limit of {MAX_FRAME_BODY}")]
    FrameTooLarge(usize),
    #[error("{msg} frame is truncated")]
    Truncated { msg: &'static str },
    #[error("{msg} frame has {extra} trailing bytes")]
    TrailingBytes { msg: &'static str, extra: usize },
    #[error("{msg} frame has a string that is not UTF-8")]
    BadUtf8 { msg: &'static str },
    #[error("{msg} frame has a list of {count} items, more than {MAX_LIST_ITEMS}")]
    TooManyItems { msg: &'static str, count: usize },
    #[error("{msg} frame has an unknown target kind {kind}")]
    BadTargetKind { msg: &'static str, kind: u8 },
    #[error("{msg} frame has a bad boolean {value}")]
    BadBool { msg: &'static str, value: u8 },
    /// A record frame with addresses whose list is empty: a record without addresses travels
    /// as the older frame kind, so that every message has one encoding.
    #[error("{msg} frame has an empty address list")]
    EmptyAddresses { msg: &'static str },
}

/// Why a message could not be encoded. Only oversized content can cause it.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum EncodeError {
    #[error("{0} message body exceeds {MAX_FRAME_BODY} bytes")]
    TooLarge(&'static str),
    #[error("{0} message has a string longer than 65535 bytes")]
    StringTooLong(&'static str),
    #[error("{0} message has a list longer than {MAX_LIST_ITEMS} items")]
    TooManyItems(&'static str),
    #[error("unknown messages cannot be encoded")]
    Unknown,
}

/// Appends one framed message to `out`.
pub fn encode(msg: &Message, out: &mut BytesMut) -> Result<(), EncodeError> {
    let name = msg.name();
    let mut body = BytesMut::new();
    let kind = match msg {
        Message::Hello {
            min_version,
            max_version,
            node_name,
            capabilities,
        } => {
            body.put_u8(*min_version);
            body.put_u8(*max_version);
            put_str(&mut body, node_name, name)?;
            put_str_list(&mut body, capabilities, name)?;
            kind::HELLO
        }
        Message::Welcome {
            version,
            server_id,
            capabilities,
        } => {
            body.put_u8(*version);
            put_str(&mut body, server_id, name)?;
            put_str_list(&mut body, capabilities, name)?;
            kind::WELCOME
        }
        Message::ServerList { servers } => {
            put_count(&mut body, servers.len(), name)?;
            for s in servers {
                put_str(&mut body, &s.addr, name)?;
                body.put_u8(s.healthy as u8);
                body.put_u8(s.draining as u8);
            }
            kind::SERVER_LIST
        }
        Message::Health { upstream_healthy } => {
            body.put_u8(*upstream_healthy as u8);
            kind::HEALTH
        }
        Message::Drain => kind::DRAIN,
        Message::Ping { nonce } => {
            body.put_u64(*nonce);
            kind::PING
        }
        Message::Pong { nonce } => {
            body.put_u64(*nonce);
            kind::PONG
        }
        Message::ServerDown { server_id } => {
            put_str(&mut body, server_id, name)?;
            kind::SERVER_DOWN
        }
        Message::NodeInfo { addresses } => {
            put_str_list(&mut body, addresses, name)?;
            kind::NODE_INFO
        }
        Message::Open {
            version,
            target,
            hops,
        } => {
            body.put_u8(*version);
            match target {
                Target::Service(s) => {
                    body.put_u8(0);
                    put_str(&mut body, s, name)?;
                }
                Target::Address { host, port } => {
                    body.put_u8(1);
                    put_str(&mut body, host, name)?;
                    body.put_u16(*port);
                }
            }
            body.put_u8(*hops);
            kind::OPEN
        }
        Message::Status { code, message } => {
            body.put_u8(code.to_u8());
            put_str(&mut body, message, name)?;
            kind::STATUS
        }
        Message::NodeRecord {
            name: n,
            state,
            at_ms,
        } => {
            put_str(&mut body, n, name)?;
            put_record_state(&mut body, state, name)?;
            body.put_u64(*at_ms);
            kind::NODE_RECORD
        }
        Message::NodeRecordV2 {
            name: n,
            state,
            epoch,
            version,
            writer,
            at_ms,
            previous,
            seen,
            addresses,
        } => {
            put_str(&mut body, n, name)?;
            put_record_state(&mut body, state, name)?;
            body.put_u32(*epoch);
            body.put_u64(*version);
            put_str(&mut body, writer, name)?;
            body.put_u64(*at_ms);
            put_str(&mut body, previous, name)?;
            body.put_u8(u8::from(*seen));
            if addresses.is_empty() {
                kind::NODE_RECORD_V2
            } else {
                put_str_list(&mut body, addresses, name)?;
                kind::NODE_RECORD_V3
            }
        }
        Message::Join {
            token_id,
            secret,
            node_name,
            csr,
        } => {
            put_str(&mut body, token_id, name)?;
            put_str(&mut body, secret, name)?;
            put_str(&mut body, node_name, name)?;
            put_bytes(&mut body, csr, name)?;
            kind::JOIN
        }
        Message::Renew { csr } => {
            put_bytes(&mut body, csr, name)?;
            kind::RENEW
        }
        Message::Certificate {
            code,
            message,
            cert_pem,
            ca_pem,
        } => {
            body.put_u8(code.to_u8());
            put_str(&mut body, message, name)?;
            put_str(&mut body, cert_pem, name)?;
            put_str(&mut body, ca_pem, name)?;
            kind::CERTIFICATE
        }
        Message::Unknown { .. } => return Err(EncodeError::Unknown),
    };
    if body.len() > MAX_FRAME_BODY {
        return Err(EncodeError::TooLarge(name));
    }
    out.reserve(FRAME_HEADER_LEN + body.len());
    out.put_u8(kind);
    out.put_u16(body.len() as u16);
    out.extend_from_slice(&body);
    Ok(())
}

/// Encodes one message into a fresh buffer.
pub fn encode_to_bytes(msg: &Message) -> Result<Bytes, EncodeError> {
    let mut out = BytesMut::new();
    encode(msg, &mut out)?;
    Ok(out.freeze())
}

/// Decodes the first frame in `buf`.
///
/// Returns `Ok(None)` when `buf` does not yet hold a whole frame (read more and call again), or
/// the message and how many bytes it used.
pub fn decode(buf: &[u8]) -> Result<Option<(Message, usize)>, DecodeError> {
    if buf.len() < FRAME_HEADER_LEN {
        return Ok(None);
    }
    let kind = buf[0];
    let len = u16::from_be_bytes([buf[1], buf[2]]) as usize;
    if len > MAX_FRAME_BODY {
        return Err(DecodeError::FrameTooLarge(len));
    }
    let total = FRAME_HEADER_LEN + len;
    if buf.len() < total {
        return Ok(None);
    }
    let body = &buf[FRAME_HEADER_LEN..total];
    let msg = decode_body(kind, body)?;
    Ok(Some((msg, total)))
}

/// How many more bytes are needed before [`decode`] can return a frame, given what is buffered.
/// Lets readers ask for exactly one frame and never consume payload that follows it.
pub fn bytes_needed(buf: &[u8]) -> Result<usize, DecodeError> {
    if buf.len() < FRAME_HEADER_LEN {
        return Ok(FRAME_HEADER_LEN - buf.len());
    }
    let len = u16::from_be_bytes([buf[1], buf[2]]) as usize;
    if len > MAX_FRAME_BODY {
        return Err(DecodeError::FrameTooLarge(len));
    }
    Ok((FRAME_HEADER_LEN + len).saturating_sub(buf.len()))
}

fn decode_body(kind: u8, body: &[u8]) -> Result<Message, DecodeError> {
    let mut r = Reader {
        buf: body,
        msg: "unknown",
    };
    let msg = match kind {
        kind::HELLO => {
            r.msg = "hello";
            Message::Hello {
                min_version: r.u8()?,
                max_version: r.u8()?,
                node_name: r.string()?,
                capabilities: r.string_list()?,
            }
        }
        kind::WELCOME => {
            r.msg = "welcome";
            Message::Welcome {
                version: r.u8()?,
                server_id: r.string()?,
                capabilities: r.string_list()?,
            }
        }
        kind::SERVER_LIST => {
            r.msg = "server-list";
            let n = r.count()?;
            let mut servers = Vec::with_capacity(n);
            for _ in 0..n {
                servers.push(ServerInfo {
                    addr: r.string()?,
                    healthy: r.bool()?,
                    draining: r.bool()?,
                });
            }
            Message::ServerList { servers }
        }
        kind::HEALTH => {
            r.msg = "health";
            Message::Health {
                upstream_healthy: r.bool()?,
            }
        }
        kind::DRAIN => {
            r.msg = "drain";
            Message::Drain
        }
        kind::PING => {
            r.msg = "ping";
            Message::Ping { nonce: r.u64()? }
        }
        kind::PONG => {
            r.msg = "pong";
            Message::Pong { nonce: r.u64()? }
        }
        kind::SERVER_DOWN => {
            r.msg = "server-down";
            Message::ServerDown {
                server_id: r.string()?,
            }
        }
        kind::NODE_INFO => {
            r.msg = "node-info";
            Message::NodeInfo {
                addresses: r.string_list()?,
            }
        }
        kind::OPEN => {
            r.msg = "open";
            let version = r.u8()?;
            let target = match r.u8()? {
                0 => Target::Service(r.string()?),
                1 => Target::Address {
                    host: r.string()?,
                    port: r.u16()?,
                },
                k => {
                    return Err(DecodeError::BadTargetKind {
                        msg: r.msg,
                        kind: k,
                    })
                }
            };
            Message::Open {
                version,
                target,
                hops: r.u8()?,
            }
        }
        kind::STATUS => {
            r.msg = "status";
            Message::Status {
                code: StatusCode::from_u8(r.u8()?),
                message: r.string()?,
            }
        }
        kind::NODE_RECORD => {
            r.msg = "node-record";
            Message::NodeRecord {
                name: r.string()?,
                state: r.record_state()?,
                at_ms: r.u64()?,
            }
        }
        kind::NODE_RECORD_V2 | kind::NODE_RECORD_V3 => {
            r.msg = "node-record-v2";
            Message::NodeRecordV2 {
                name: r.string()?,
                state: r.record_state()?,
                epoch: r.u32()?,
                version: r.u64()?,
                writer: r.string()?,
                at_ms: r.u64()?,
                previous: r.string()?,
                seen: r.bool()?,
                addresses: if kind == kind::NODE_RECORD_V3 {
                    let list = r.string_list()?;
                    if list.is_empty() {
                        return Err(DecodeError::EmptyAddresses { msg: r.msg });
                    }
                    list
                } else {
                    Vec::new()
                },
            }
        }
        kind::JOIN => {
            r.msg = "join";
            Message::Join {
                token_id: r.string()?,
                secret: r.string()?,
                node_name: r.string()?,
                csr: r.bytes()?,
            }
        }
        kind::RENEW => {
            r.msg = "renew";
            Message::Renew { csr: r.bytes()? }
        }
        kind::CERTIFICATE => {
            r.msg = "certificate";
            Message::Certificate {
                code: StatusCode::from_u8(r.u8()?),
                message: r.string()?,
                cert_pem: r.string()?,
                ca_pem: r.string()?,
            }
        }
        other => {
            return Ok(Message::Unknown {
                kind: other,
                len: body.len(),
            })
        }
    };
    if !r.buf.is_empty() {
        return Err(DecodeError::TrailingBytes {
            msg: r.msg,
            extra: r.buf.len(),
        });
    }
    Ok(msg)
}

struct Reader<'a> {
    buf: &'a [u8],
    msg: &'static str,
}

impl Reader<'_> {
    fn need(&self, n: usize) -> Result<(), DecodeError> {
        if self.buf.remaining() < n {
            Err(DecodeError::Truncated { msg: self.msg })
        } else {
            Ok(())
        }
    }
    fn u8(&mut self) -> Result<u8, DecodeError> {
        self.need(1)?;
        Ok(self.buf.get_u8())
    }
    fn u16(&mut self) -> Result<u16, DecodeError> {
        self.need(2)?;
        Ok(self.buf.get_u16())
    }
    fn u32(&mut self) -> Result<u32, DecodeError> {
        self.need(4)?;
        Ok(self.buf.get_u32())
    }
    fn u64(&mut self) -> Result<u64, DecodeError> {
        self.need(8)?;
        Ok(self.buf.get_u64())
    }
    fn bytes(&mut self) -> Result<Vec<u8>, DecodeError> {
        let n = self.u16()? as usize;
        self.need(n)?;
        let (b, rest) = self.buf.split_at(n);
        self.buf = rest;
        Ok(b.to_vec())
    }
    fn bool(&mut self) -> Result<bool, DecodeError> {
        match self.u8()? {
            0 => Ok(false),
            1 => Ok(true),
            value => Err(DecodeError::BadBool {
                msg: self.msg,
                value,
            }),
        }
    }
    fn count(&mut self) -> Result<usize, DecodeError> {
        let n = self.u16()? as usize;
        if n > MAX_LIST_ITEMS {
            return Err(DecodeError::TooManyItems {
                msg: self.msg,
                count: n,
            });
        }
        Ok(n)
    }
    fn string(&mut self) -> Result<String, DecodeError> {
        let n = self.u16()? as usize;
        self.need(n)?;
        let (s, rest) = self.buf.split_at(n);
        self.buf = rest;
        String::from_utf8(s.to_vec()).map_err(|_| DecodeError::BadUtf8 { msg: self.msg })
    }
    fn record_state(&mut self) -> Result<RecordState, DecodeError> {
        Ok(match self.u8()? {
            0 => RecordState::Owned(self.string()?),
            1 => RecordState::Revoked,
            2 => RecordState::Forgotten,
            k => {
                return Err(DecodeError::BadTargetKind {
                    msg: self.msg,
                    kind: k,
                })
            }
        })
    }

    fn string_list(&mut self) -> Result<Vec<String>, DecodeError> {
        let n = self.count()?;
        let mut v = Vec::with_capacity(n);
        for _ in 0..n {
            v.push(self.string()?);
        }
        Ok(v)
    }
}

fn put_record_state(
    out: &mut BytesMut,
    state: &RecordState,
    msg: &'static str,
) -> Result<(), EncodeError> {
    match state {
        RecordState::Owned(k) => {
            out.put_u8(0);
            put_str(out, k, msg)?;
        }
        RecordState::Revoked => out.put_u8(1),
        RecordState::Forgotten => out.put_u8(2),
    }
    Ok(())
}

fn put_str(out: &mut BytesMut, s: &str, msg: &'static str) -> Result<(), EncodeError> {
    let n = u16::try_from(s.len()).map_err(|_| EncodeError::StringTooLong(msg))?;
    out.put_u16(n);
    out.extend_from_slice(s.as_bytes());
    Ok(())
}

fn put_bytes(out: &mut BytesMut, b: &[u8], msg: &'static str) -> Result<(), EncodeError> {
    let n = u16::try_from(b.len()).map_err(|_| EncodeError::StringTooLong(msg))?;
    out.put_u16(n);
    out.extend_from_slice(b);
    Ok(())
}

fn put_count(out: &mut BytesMut, n: usize, msg: &'static str) -> Result<(), EncodeError> {
    if n > MAX_LIST_ITEMS {
        return Err(EncodeError::TooManyItems(msg));
    }
    out.put_u16(n as u16);
    Ok(())
}

fn put_str_list(out: &mut BytesMut, v: &[String], msg: &'static str) -> Result<(), EncodeError> {
    put_count(out, v.len(), msg)?;
    for s in v {
        put_str(out, s, msg)?;
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    fn roundtrip(msg: Message) {
        let bytes = encode_to_bytes(&msg).expect("encodes");
        let (back, used) = decode(&bytes).expect("decodes").expect("whole frame");
        assert_eq!(back, msg);
        assert_eq!(used, bytes.len());
    }

    #[test]
    fn capabilities_keep_unknown_names_and_drop_absurd_ones() {
        use capability::Capabilities;
        let ours = Capabilities::ours(&[capability::PEER]);
        assert!(ours.iter().any(|c| c == capability::CAPABILITIES));
        let long = "x".repeat(capability::MAX_NAME + 1);
        let theirs = Capabilities::from_announced(&[
            "apiserver".into(),
            "from-the-future".into(),
            String::new(),
            long.clone(),
        ]);
        assert!(theirs.has("apiserver") && theirs.has("from-the-future"));
        assert!(!theirs.has(capability::CAPABILITIES) && !theirs.has(&long) && !theirs.has(""));
        // A 0.1 hello: nothing new may be used.
        let old = Capabilities::from_announced(&["apiserver".into()]);
        assert!(!old.has(capability::CAPABILITIES));
    }

    #[test]
    fn open_apiserver_is_stable_on_the_wire() {
        let msg = Message::Open {
            version: 1,
            target: Target::Service("apiserver".into()),
            hops: 0,
        };
        let bytes = encode_to_bytes(&msg).unwrap();
        let mut expect = vec![0x10, 0, 14, 1, 0, 0, 9];
        expect.extend_from_slice(b"apiserver");
        expect.push(0);
        assert_eq!(&bytes[..], &expect[..]);
        roundtrip(msg);
    }

    #[test]
    fn partial_frames_ask_for_more() {
        let bytes = encode_to_bytes(&Message::Status {
            code: StatusCode::Busy,
            message: "too many streams".into(),
        })
        .unwrap();
        for cut in 0..bytes.len() {
            assert_eq!(decode(&bytes[..cut]), Ok(None), "cut at {cut}");
            let expect = if cut < FRAME_HEADER_LEN {
                FRAME_HEADER_LEN - cut
            } else {
                bytes.len() - cut
            };
            assert_eq!(bytes_needed(&bytes[..cut]).unwrap(), expect);
        }
        assert_eq!(bytes_needed(&bytes).unwrap(), 0);
    }

    #[test]
    fn oversized_frames_are_refused_before_buffering() {
        let hdr = [kind::HELLO, 0xff, 0xff];
        assert_eq!(decode(&hdr), Err(DecodeError::FrameTooLarge(65535)));
        assert!(bytes_needed(&hdr).is_err());
    }

    #[test]
    fn a_record_with_an_empty_address_list_has_one_encoding() {
        // Found by the fuzzer: a V3 record frame with no addresses decoded to a message that
        // re-encodes as V2. It is an error now.
        let msg = Message::NodeRecordV2 {
            name: "n".into(),
            state: RecordState::Revoked,
            epoch: 0,
            version: 1,
            writer: "w".into(),
            at_ms: 0,
            previous: String::new(),
            seen: false,
            addresses: Vec::new(),
        };
        let mut frame = encode_to_bytes(&msg).unwrap().to_vec();
        assert_eq!(frame[0], kind::NODE_RECORD_V2);
        frame[0] = kind::NODE_RECORD_V3;
        frame.extend_from_slice(&[0, 0]);
        let len = (frame.len() - FRAME_HEADER_LEN) as u16;
        frame[1..3].copy_from_slice(&len.to_be_bytes());
        assert!(matches!(
            decode(&frame),
            Err(DecodeError::EmptyAddresses { .. })
        ));
        let mut with = msg;
        if let Message::NodeRecordV2 { addresses, .. } = &mut with {
            addresses.push("10.0.0.1".into());
        }
        let frame = encode_to_bytes(&with).unwrap();
        assert_eq!(frame[0], kind::NODE_RECORD_V3);
        assert_eq!(decode(&frame).unwrap().unwrap().0, with);
    }

    #[test]
    fn trailing_bytes_and_bad_fields_are_errors() {
        let mut b = encode_to_bytes(&Message::Drain).unwrap().to_vec();
        b[2] = 1;
        b.push(0);
        assert!(matches!(decode(&b), Err(DecodeError::TrailingBytes { .. })));
        assert!(matches!(
            decode(&[kind::HEALTH, 0, 1, 7]),
            Err(DecodeError::BadBool { .. })
        ));
        assert!(matches!(
            decode(&[kind::OPEN, 0, 2, 1, 9]),
            Err(DecodeError::BadTargetKind { .. })
        ));
        assert!(matches!(
            decode(&[kind::STATUS, 0, 3, 0, 0, 5]),
            Err(DecodeError::Truncated { .. })
        ));
        assert!(matches!(
            decode(&[kind::STATUS, 0, 5, 0, 0, 2, 0xff, 0xfe]),
            Err(DecodeError::BadUtf8 { .. })
        ));
    }

    #[test]
    fn unknown_frames_are_skippable() {
        assert_eq!(
            decode(&[0x7f, 0, 2, 1, 2, 0x05]),
            Ok(Some((Message::Unknown { kind: 0x7f, len: 2 }, 5)))
        );
    }

    #[test]
    fn unknown_status_codes_survive() {
        roundtrip(Message::Status {
            code: StatusCode::Other(200),
            message: String::new(),
        });
        assert_eq!(StatusCode::from_u8(200), StatusCode::Other(200));
    }

    #[test]
    fn encoder_refuses_oversized_content() {
        let msg = Message::NodeInfo {
            addresses: vec!["x".repeat(1000); 20],
        };
        assert_eq!(
            encode_to_bytes(&msg),
            Err(EncodeError::TooLarge("node-info"))
        );
        let msg = Message::NodeInfo {
            addresses: vec![String::new(); MAX_LIST_ITEMS + 1],
        };
        assert_eq!(
            encode_to_bytes(&msg),
            Err(EncodeError::TooManyItems("node-info"))
        );
    }

    fn small_string() -> impl Strategy<Value = String> {
        ".{0,40}"
    }

    fn string_list() -> impl Strategy<Value = Vec<String>> {
        proptest::collection::vec(small_string(), 0..8)
    }

    fn any_status() -> impl Strategy<Value = StatusCode> {
        any::<u8>().prop_map(StatusCode::from_u8)
    }

    fn any_target() -> impl Strategy<Value = Target> {
        prop_oneof![
            small_string().prop_map(Target::Service),
            (small_string(), any::<u16>()).prop_map(|(host, port)| Target::Address { host, port }),
        ]
    }

    fn any_message() -> impl Strategy<Value = Message> {
        prop_oneof![
            (any::<u8>(), any::<u8>(), small_string(), string_list()).prop_map(
                |(min_version, max_version, node_name, capabilities)| Message::Hello {
                    min_version,
                    max_version,
                    node_name,
                    capabilities
                }
            ),
            (any::<u8>(), small_string(), string_list()).prop_map(
                |(version, server_id, capabilities)| Message::Welcome {
                    version,
                    server_id,
                    capabilities
                }
            ),
            proptest::collection::vec(
                (small_string(), any::<bool>(), any::<bool>()).prop_map(
                    |(addr, healthy, draining)| ServerInfo {
                        addr,
                        healthy,
                        draining
                    }
                ),
                0..8
            )
            .prop_map(|servers| Message::ServerList { servers }),
            any::<bool>().prop_map(|upstream_healthy| Message::Health { upstream_healthy }),
            Just(Message::Drain),
            any::<u64>().prop_map(|nonce| Message::Ping { nonce }),
            any::<u64>().prop_map(|nonce| Message::Pong { nonce }),
            small_string().prop_map(|server_id| Message::ServerDown { server_id }),
            string_list().prop_map(|addresses| Message::NodeInfo { addresses }),
            (any::<u8>(), any_target(), any::<u8>()).prop_map(|(version, target, hops)| {
                Message::Open {
                    version,
                    target,
                    hops,
                }
            }),
            (any_status(), small_string())
                .prop_map(|(code, message)| Message::Status { code, message }),
            (
                small_string(),
                prop_oneof![
                    small_string().prop_map(RecordState::Owned),
                    Just(RecordState::Revoked),
                    Just(RecordState::Forgotten)
                ],
                any::<u64>()
            )
                .prop_map(|(name, state, at_ms)| Message::NodeRecord {
                    name,
                    state,
                    at_ms
                }),
            (
                small_string(),
                prop_oneof![
                    small_string().prop_map(RecordState::Owned),
                    Just(RecordState::Revoked),
                    Just(RecordState::Forgotten)
                ],
                (any::<u32>(), any::<u64>()),
                small_string(),
                (
                    any::<u64>(),
                    small_string(),
                    any::<bool>(),
                    proptest::collection::vec(small_string(), 0..4)
                )
            )
                .prop_map(
                    |(
                        name,
                        state,
                        (epoch, version),
                        writer,
                        (at_ms, previous, seen, addresses),
                    )| {
                        Message::NodeRecordV2 {
                            name,
                            state,
                            epoch,
                            version,
                            writer,
                            at_ms,
                            previous,
                            seen,
                            addresses,
                        }
                    }
                ),
            (
                small_string(),
                small_string(),
                small_string(),
                proptest::collection::vec(any::<u8>(), 0..600)
            )
                .prop_map(|(token_id, secret, node_name, csr)| Message::Join {
                    token_id,
                    secret,
                    node_name,
                    csr
                }),
            proptest::collection::vec(any::<u8>(), 0..600).prop_map(|csr| Message::Renew { csr }),
            (any_status(), small_string(), small_string(), small_string()).prop_map(
                |(code, message, cert_pem, ca_pem)| Message::Certificate {
                    code,
                    message,
                    cert_pem,
                    ca_pem
                }
            ),
        ]
    }

    proptest! {
        #[test]
        fn every_message_round_trips(msg in any_message()) {
            roundtrip(msg);
        }

        #[test]
        fn concatenated_messages_decode_in_order(msgs in proptest::collection::vec(any_message(), 1..6)) {
            let mut buf = BytesMut::new();
            for m in &msgs {
                encode(m, &mut buf).unwrap();
            }
            let mut at = 0;
            for m in &msgs {
                let (back, used) = decode(&buf[at..]).unwrap().unwrap();
                prop_assert_eq!(&back, m);
                at += used;
            }
            prop_assert_eq!(at, buf.len());
        }

        #[test]
        fn arbitrary_bytes_never_panic(bytes in proptest::collection::vec(any::<u8>(), 0..512)) {
            let _ = decode(&bytes);
            let _ = bytes_needed(&bytes);
        }

        #[test]
        fn arbitrary_bodies_never_panic(kind in any::<u8>(), body in proptest::collection::vec(any::<u8>(), 0..300)) {
            let mut frame = vec![kind];
            frame.extend_from_slice(&(body.len() as u16).to_be_bytes());
            frame.extend_from_slice(&body);
            if let Ok(Some((_, used))) = decode(&frame) {
                prop_assert_eq!(used, frame.len());
            }
        }
    }
}
