//! What a server counts, and its Prometheus rendering.

use crate::datastore::StoreHealth;
use std::sync::Arc;
use tether_link::pool::Pool;
use tether_link::reconnect::LinkStats;
use tether_process::telemetry::{Counter, CounterFamily, Exposition, Gauge, Label};
use tether_proto::StatusCode;
use tether_transport::metrics::Shared;

/// The limits whose hits are counted (`tether_limit_hits_total{limit}`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Limit {
    TunnelsPerNode,
    StreamsPerTunnel,
    StreamsPerNode,
    StreamsPerServer,
    JoinRate,
    HandshakeTimeout,
    Handshakes,
    Joins,
    /// Renewals over a node's bound (one in flight, a rate per node).
    Renewals,
    /// Joins of a new name past `--max-nodes`.
    Nodes,
}

impl Label for Limit {
    const ALL: &'static [Self] = &[
        Limit::TunnelsPerNode,
        Limit::StreamsPerTunnel,
        Limit::StreamsPerNode,
        Limit::StreamsPerServer,
        Limit::JoinRate,
        Limit::HandshakeTimeout,
        Limit::Handshakes,
        Limit::Joins,
        Limit::Renewals,
        Limit::Nodes,
    ];
    fn label(self) -> String {
        match self {
            Limit::TunnelsPerNode => "tunnels_per_node",
            Limit::StreamsPerTunnel => "streams_per_tunnel",
            Limit::StreamsPerNode => "streams_per_node",
            Limit::StreamsPerServer => "streams_per_server",
            Limit::JoinRate => "join_rate",
            Limit::HandshakeTimeout => "handshake_timeout",
            Limit::Handshakes => "handshakes",
            Limit::Renewals => "renewals",
            Limit::Nodes => "nodes",
            Limit::Joins => "joins",
        }
        .into()
    }
}

/// The HTTP status a failed egress request was answered with
/// (`tether_egress_failures_total{code}`); other codes are not counted.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct EgressCode(pub u16);

impl Label for EgressCode {
    const ALL: &'static [Self] = &[
        EgressCode(400),
        EgressCode(403),
        EgressCode(404),
        EgressCode(405),
        EgressCode(408),
        EgressCode(409),
        EgressCode(431),
        EgressCode(502),
        EgressCode(503),
        EgressCode(504),
    ];
    fn label(self) -> String {
        self.0.to_string()
    }
}

#[derive(Debug, Default)]
pub struct Metrics {
    /// The families the agent and the server share.
    pub shared: Shared,
    pub tunnels_up: Gauge,
    pub tunnels_total: Counter,
    pub handshake_failures: Counter,
    pub stream_failures: CounterFamily<StatusCode>,
    pub protocol_errors: Counter,
    pub upstream_healthy: Gauge,
    /// Links this server dialed to its peers.
    pub peer_links: Arc<LinkStats>,
    /// Peers that dialed this server.
    pub peer_tunnels_in: Gauge,
    pub peer_relayed: Counter,
    pub peer_relay_failures: Counter,
    pub joins: Counter,
    pub join_failures: Counter,
    pub revoked_closed: Counter,
    /// Tunnels closed because their certificate expired while they were up.
    pub expired_closed: Counter,
    pub cert_reloads: Counter,
    /// 1 while a CA rotation runs.
    pub ca_rotation: Gauge,
    /// Nodes still on the old CA of the running rotation.
    pub ca_old_nodes: Gauge,
    pub limit_hits: CounterFamily<Limit>,
    pub egress_streams: Counter,
    /// CONNECT requests that waited for a node gone from here for a moment.
    pub egress_waited: Counter,
    /// Address claims refused: owned by another node, not an IP address, or past the bound.
    pub address_conflicts: Counter,
    pub egress_failures: CounterFamily<EgressCode>,
    /// Whether the datastore answers (see `datastore`).
    pub datastore: Arc<StoreHealth>,
}

impl Metrics {
    pub fn egress_failed(&self, code: u16) {
        self.egress_failures.inc(EgressCode(code));
    }

    pub fn limit_hit(&self, limit: Limit) {
        self.limit_hits.inc(limit);
    }

    pub fn stream_failed(&self, code: StatusCode) {
        self.stream_failures.inc(code);
    }

    pub fn render(&self, peers: &Pool, registry: &crate::registry::Registry) -> String {
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
        e.family(
            "tether_stream_open_failures_total",
            "Streams answered with a failure status, by reason.",
            "reason",
            &self.stream_failures,
        );
        e.counter(
            "tether_protocol_errors_total",
            "Streams or tunnels closed for breaking the protocol.",
            self.protocol_errors.get(),
        );
        e.gauge(
            "tether_datastore_available",
            "1 when the datastore answers (always, for the data directory); 0 while etcd is unreachable and the server serves from the last state it read.",
            self.datastore.available() as i64,
        );
        e.gauge(
            "tether_datastore_revision",
            "The etcd revision this server has applied last (0 for the data directory).",
            self.datastore
                .revision
                .load(std::sync::atomic::Ordering::Relaxed),
        );
        e.counter(
            "tether_datastore_silent_watches_total",
            "etcd watches found silent (a change etcd held did not come through within two checks) and started again.",
            self.datastore
                .silent_watches
                .load(std::sync::atomic::Ordering::Relaxed),
        );
        e.gauge(
            "tether_upstream_healthy",
            "1 when the last upstream check succeeded.",
            self.upstream_healthy.get(),
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
            "tether_ca_rotation_running",
            "1 while a CA rotation runs (servers trust the old and the new CA).",
            self.ca_rotation.get(),
        );
        e.gauge(
            "tether_ca_old_nodes",
            "Nodes still on the old CA of the running rotation (0 when none runs): `ca finish` waits for 0.",
            self.ca_old_nodes.get(),
        );
        e.family(
            "tether_limit_hits_total",
            "Times a limit refused something, by limit.",
            "limit",
            &self.limit_hits,
        );
        e.counter(
            "tether_address_conflicts_total",
            "Address claims refused: the address is owned by another node, is not an IP address, or is past the bound of addresses per node.",
            self.address_conflicts.get(),
        );
        e.counter(
            "tether_egress_streams_total",
            "CONNECT requests of the control plane relayed to a node.",
            self.egress_streams.get(),
        );
        e.counter(
            "tether_egress_waited_total",
            "CONNECT requests that waited for their node's next tunnel (its tunnels here had just died or closed).",
            self.egress_waited.get(),
        );
        e.family(
            "tether_egress_failures_total",
            "CONNECT requests that failed, by the HTTP status answered.",
            "code",
            &self.egress_failures,
        );
        let agents = registry.snapshot();
        tether_transport::metrics::render_key_exchanges(
            &mut e,
            "tether_tunnels_key_exchange",
            "Agent tunnels connected now, by the key-exchange group their handshake agreed (X25519MLKEM768 is post-quantum).",
            agents
                .iter()
                .flat_map(|(_, tunnels)| tunnels.iter().map(|t| t.tunnel.key_exchange())),
        );
        tether_transport::metrics::render_key_exchanges(
            &mut e,
            "tether_peer_links_key_exchange",
            "Links to peer servers up now, by the key-exchange group their handshake agreed.",
            peers.all().iter().map(|l| l.tunnel.key_exchange()),
        );
        self.shared.render(&mut e);
        e.finish()
    }
}
