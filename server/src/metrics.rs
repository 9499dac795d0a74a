//! What a server counts, and its Prometheus rendering.

use std::sync::Arc;
use tether_common::link::pool::Pool;
use tether_common::link::reconnect::LinkStats;
use tether_common::process::telemetry::{Counter, Exposition, Gauge};
use tether_common::relay::Meter;
use tether_proto::StatusCode;

/// Stream-open failures are counted by reason; the label set is this fixed list.
const REASONS: [StatusCode; 8] = [
    StatusCode::UpstreamUnreachable,
    StatusCode::RefusedByPolicy,
    StatusCode::UnknownService,
    StatusCode::Busy,
    StatusCode::Draining,
    StatusCode::Timeout,
    StatusCode::NoRoute,
    StatusCode::BadRequest,
];

#[derive(Debug, Default)]
pub struct Metrics {
    pub tunnels_up: Gauge,
    pub tunnels_total: Counter,
    pub handshake_failures: Counter,
    pub streams_open: Gauge,
    pub streams_total: Counter,
    pub stream_failures: [Counter; REASONS.len()],
    pub stream_resets: Counter,
    pub protocol_errors: Counter,
    pub upstream_healthy: Gauge,
    pub bytes: Meter,
    /// Links this server dialed to its peers.
    pub peer_links: Arc<LinkStats>,
    /// Peers that dialed this server.
    pub peer_tunnels_in: Gauge,
    pub peer_relayed: Counter,
    pub peer_relay_failures: Counter,
    pub draining: Gauge,
    pub joins: Counter,
    pub join_failures: Counter,
    pub renewals: Counter,
    pub revoked_closed: Counter,
    /// Tunnels closed because their certificate expired while they were up.
    pub expired_closed: Counter,
    pub cert_reloads: Counter,
    /// Expiry of this server's own certificate, Unix seconds.
    pub cert_expiry: Gauge,
    pub limit_hits: [Counter; LIMITS.len()],
    pub egress_streams: Counter,
    /// Address claims that collided with another node's claim.
    pub address_conflicts: Counter,
    pub egress_failures: [Counter; EGRESS_CODES.len()],
}

/// HTTP statuses of failed egress requests; a fixed label set.
pub const EGRESS_CODES: [u16; 10] = [400, 403, 404, 405, 408, 409, 431, 502, 503, 504];

/// The limits whose hits are counted; a fixed label set.
pub const LIMITS: [&str; 8] = [
    "tunnels_per_node",
    "streams_per_tunnel",
    "streams_per_node",
    "streams_per_server",
    "join_rate",
    "handshake_timeout",
    "handshakes",
    "joins",
];

impl Metrics {
    pub fn egress_failed(&self, code: u16) {
        if let Some(i) = EGRESS_CODES.iter().position(|c| *c == code) {
            self.egress_failures[i].inc();
        }
    }

    pub fn limit_hit(&self, limit: &str) {
        if let Some(i) = LIMITS.iter().position(|l| *l == limit) {
            self.limit_hits[i].inc();
        }
    }

    pub fn stream_failed(&self, code: StatusCode) {
        if let Some(i) = REASONS.iter().position(|r| *r == code) {
            self.stream_failures[i].inc();
        }
    }

    pub fn render(&self, peers: &Pool) -> String {
        use std::sync::atomic::Ordering::Relaxed;
        let mut e = Exposition::new();
        e.gauge(
            "tether_tunnels_up",
            "Agent tunnels connected to this server.",
            self.tunnels_up.get(),
        );
        e.counter(
            "tether_tunnels_accepted_total",
            "Agent tunnels accepted since start.",
            self.tunnels_total.get(),
        );
        e.counter(
            "tether_handshake_failures_total",
            "TLS handshakes refused or failed (no, foreign or bad certificate; timeout).",
            self.handshake_failures.get(),
        );
        e.gauge(
            "tether_streams_open",
            "Streams being relayed now.",
            self.streams_open.get(),
        );
        e.counter(
            "tether_streams_total",
            "Streams relayed since start.",
            self.streams_total.get(),
        );
        let failures: Vec<(&str, u64)> = REASONS
            .iter()
            .zip(&self.stream_failures)
            .map(|(r, c)| (r.label(), c.get()))
            .collect();
        e.labeled(
            "tether_stream_open_failures_total",
            "Streams answered with a failure status, by reason.",
            "counter",
            "reason",
            &failures,
        );
        e.counter(
            "tether_stream_resets_total",
            "Relayed streams that ended in a reset (either side).",
            self.stream_resets.get(),
        );
        e.counter(
            "tether_protocol_errors_total",
            "Streams or tunnels closed for breaking the protocol.",
            self.protocol_errors.get(),
        );
        e.gauge(
            "tether_upstream_healthy",
            "1 when the last upstream check succeeded.",
            self.upstream_healthy.get(),
        );
        e.counter(
            "tether_tunnel_bytes_received_total",
            "Bytes received from tunnels and written to the upstream.",
            self.bytes.from_tunnel.load(Relaxed),
        );
        e.counter(
            "tether_tunnel_bytes_sent_total",
            "Bytes read from the upstream and sent into tunnels.",
            self.bytes.to_tunnel.load(Relaxed),
        );
        e.gauge(
            "tether_peer_tunnels_up",
            "Links this server dialed to its peers that are up.",
            self.peer_links.up.get(),
        );
        e.counter(
            "tether_peer_tunnel_connect_failures_total",
            "Failed attempts to reach a peer.",
            self.peer_links.connect_failures.get(),
        );
        e.gauge(
            "tether_peer_tunnels_in",
            "Peers connected to this server.",
            self.peer_tunnels_in.get(),
        );
        let links = peers.all();
        let healthy: Vec<(&str, i64)> = links
            .iter()
            .map(|l| (l.server.as_str(), (l.healthy() && !l.draining()) as i64))
            .collect();
        e.labeled(
            "tether_peer_healthy",
            "1 when a connected peer reports a healthy upstream and is not draining.",
            "gauge",
            "peer",
            &healthy,
        );
        e.counter(
            "tether_peer_relayed_streams_total",
            "Streams relayed through a peer because this server's upstream failed.",
            self.peer_relayed.get(),
        );
        e.counter(
            "tether_peer_relay_failures_total",
            "Attempts to relay a stream through a peer that failed.",
            self.peer_relay_failures.get(),
        );
        e.gauge(
            "tether_draining",
            "1 while the server drains after SIGTERM.",
            self.draining.get(),
        );
        e.counter(
            "tether_joins_total",
            "Nodes that joined with a token.",
            self.joins.get(),
        );
        e.counter(
            "tether_join_failures_total",
            "Join attempts refused (bad token, taken name, bad request, no request).",
            self.join_failures.get(),
        );
        e.counter(
            "tether_renewals_total",
            "Agent certificates renewed over a tunnel.",
            self.renewals.get(),
        );
        e.counter(
            "tether_revoked_tunnels_closed_total",
            "Tunnels closed because their node was revoked or its name forgotten.",
            self.revoked_closed.get(),
        );
        e.counter(
            "tether_expired_tunnels_closed_total",
            "Tunnels closed because their certificate expired while they were up.",
            self.expired_closed.get(),
        );
        e.counter(
            "tether_certificate_reloads_total",
            "Times the server certificate was reloaded from disk.",
            self.cert_reloads.get(),
        );
        e.gauge(
            "tether_certificate_expiry_timestamp_seconds",
            "When this server's certificate expires (Unix time).",
            self.cert_expiry.get(),
        );
        let hits: Vec<(&str, u64)> = LIMITS
            .iter()
            .zip(&self.limit_hits)
            .map(|(l, c)| (*l, c.get()))
            .collect();
        e.labeled(
            "tether_limit_hits_total",
            "Times a limit refused something, by limit.",
            "counter",
            "limit",
            &hits,
        );
        e.counter(
            "tether_address_conflicts_total",
            "Address claims of a node that another node already claimed (the address is then contested).",
            self.address_conflicts.get(),
        );
        e.counter(
            "tether_egress_streams_total",
            "CONNECT requests of the control plane relayed to a node.",
            self.egress_streams.get(),
        );
        let codes: Vec<String> = EGRESS_CODES.iter().map(|c| c.to_string()).collect();
        let failed: Vec<(&str, u64)> = codes
            .iter()
            .zip(&self.egress_failures)
            .map(|(c, n)| (c.as_str(), n.get()))
            .collect();
        e.labeled(
            "tether_egress_failures_total",
            "CONNECT requests that failed, by the HTTP status answered.",
            "counter",
            "code",
            &failed,
        );
        e.finish()
    }
}
