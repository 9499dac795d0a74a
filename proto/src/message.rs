//! The protocol's messages, their parts and its limits: what a frame says, not how.

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

pub(crate) mod kind {
    pub const HELLO: u8 = 0x01;
    pub const WELCOME: u8 = 0x02;
    pub const SERVER_LIST: u8 = 0x03;
    pub const HEALTH: u8 = 0x04;
    pub const DRAIN: u8 = 0x05;
    pub const NODE_INFO: u8 = 0x06;
    pub const NODE_RECORD: u8 = 0x07;
    pub const NODE_RECORD_V2: u8 = 0x08;
    /// A [`super::Message::NodeRecordV2`] with the addresses the node owns (since 0.3, to
    /// peers that announced [`crate::capability::RECORDS_ADDRESSES`]).
    pub const NODE_RECORD_V3: u8 = 0x09;
    /// Liveness (since 0.3, behind [`crate::capability::LIVENESS`]).
    pub const PING: u8 = 0x0a;
    pub const PONG: u8 = 0x0b;
    pub const SERVER_DOWN: u8 = 0x0c;
    /// The server's clock (since 0.3, behind [`crate::capability::CLOCK`]).
    pub const CLOCK: u8 = 0x0d;
    /// A server asks an agent to renew now (since 0.3, behind
    /// [`crate::capability::RENEW_NOW`]).
    pub const RENEW_NOW: u8 = 0x0e;
    pub const OPEN: u8 = 0x10;
    pub const STATUS: u8 = 0x11;
    pub const JOIN: u8 = 0x20;
    pub const RENEW: u8 = 0x21;
    pub const CERTIFICATE: u8 = 0x22;
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

/// The state of a node name, as servers tell each other (see `tether_trust::records`).
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
    /// [`crate::capability::RECORDS_V2`]): `epoch` counts the name's forgets, `version` its writes
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
    /// A server's clock when it sent this, Unix milliseconds (control stream, server to agent,
    /// right after the welcome). The agent compares it with its own: certificates, tokens and
    /// records expire by the clock, and a node whose clock is minutes off fails in ways that
    /// are hard to read (`status` and a metric show the difference).
    Clock { unix_ms: u64 },
    /// A server asks its agent to renew its certificate now, unless it holds one from `issuer`
    /// and trusts exactly the CAs in `trusted` (hex SHA-256 of each CA certificate's DER).
    /// Sent after the welcome and whenever the server's CAs change: a CA rotation moves every
    /// connected node to the new CA at once, and its end takes the old CA out of every
    /// node's trust. The agent checks the certificate it gets as it checks any renewal; the
    /// message itself grants nothing.
    RenewNow {
        issuer: String,
        trusted: Vec<String>,
    },
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
            Message::Clock { .. } => "clock",
            Message::RenewNow { .. } => "renew-now",
            Message::Unknown { .. } => "unknown",
        }
    }
}
