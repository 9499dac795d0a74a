//! What an agent counts, and its Prometheus rendering.

use std::sync::Arc;
use tether_link::pool::Pool;
use tether_link::reconnect::LinkStats;
use tether_process::telemetry::{Counter, CounterFamily, Exposition, Gauge, Label};
use tether_transport::metrics::Shared;
use tether_transport::transport::TransportKind;

/// Why a stream could not be opened through one server. A fixed label set.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum OpenFailure {
    /// The server answered with a failure status.
    Refused,
    /// The server did not answer in time.
    Timeout,
    /// The tunnel failed while opening.
    TunnelLost,
    /// No tunnel was up at all: the local connection was reset.
    NoTunnel,
}

impl Label for OpenFailure {
    const ALL: &'static [Self] = &[
        OpenFailure::Refused,
        OpenFailure::Timeout,
        OpenFailure::TunnelLost,
        OpenFailure::NoTunnel,
    ];
    fn label(self) -> String {
        match self {
            OpenFailure::Refused => "refused",
            OpenFailure::Timeout => "timeout",
            OpenFailure::TunnelLost => "tunnel_lost",
            OpenFailure::NoTunnel => "no_tunnel",
        }
        .into()
    }
}

#[derive(Debug, Default)]
pub struct Metrics {
    /// The families the agent and the server share.
    pub shared: Shared,
    pub links: Arc<LinkStats>,
    pub failovers: Counter,
    pub reverse_streams: Counter,
    pub reverse_open: Gauge,
    pub reverse_refused: Counter,
    /// Expiry of the agent's certificate, Unix seconds.
    pub connections_accepted: Counter,
    pub connections_failed: Counter,
    pub connections_over_limit: Counter,
    pub connections_waited: Counter,
    pub open_failures: CounterFamily<OpenFailure>,
    pub retries: Counter,
    pub hedges: Counter,
    pub hedges_denied: Counter,
    pub early_data: Counter,
    /// Announced server addresses refused by the policy (`server_policy`).
    pub announced_refused: Counter,
}

impl Metrics {
    pub fn open_failed(&self, why: OpenFailure) {
        self.open_failures.inc(why);
    }

    pub fn render(&self, pool: &Pool) -> String {
        let mut e = Exposition::new();
        e.gauge(
            "tether_tunnels_up",
            "Tunnels to servers that are up.",
            self.links.up.get(),
        );
        e.counter(
            "tether_tunnel_connects_total",
            "Tunnels established since start.",
            self.links.connects.get(),
        );
        e.counter(
            "tether_tunnel_connect_failures_total",
            "Failed attempts to establish a tunnel.",
            self.links.connect_failures.get(),
        );
        // One sample per server with a tunnel up: bounded by the size of the control plane.
        let links = pool.all();
        let healthy: Vec<(&str, i64)> = links
            .iter()
            .map(|l| (l.server.as_str(), l.healthy() as i64))
            .collect();
        e.labeled(
            "tether_server_healthy",
            "1 when the server reports a healthy upstream, per connected server.",
            "gauge",
            "server",
            &healthy,
        );
        let draining: Vec<(&str, i64)> = links
            .iter()
            .map(|l| (l.server.as_str(), l.draining() as i64))
            .collect();
        e.labeled(
            "tether_server_draining",
            "1 when the server announced that it is draining, per connected server.",
            "gauge",
            "server",
            &draining,
        );
        let streams: Vec<(&str, usize)> = links
            .iter()
            .map(|l| (l.server.as_str(), l.streams()))
            .collect();
        e.labeled(
            "tether_server_streams",
            "Streams open through each connected server.",
            "gauge",
            "server",
            &streams,
        );
        let quic = links
            .iter()
            .filter(|l| l.tunnel.kind() == TransportKind::Quic)
            .count();
        e.labeled(
            "tether_tunnels_by_transport",
            "Tunnels up, by the transport that carries them.",
            "gauge",
            "transport",
            &[("quic", quic), ("tcp", links.len() - quic)],
        );
        e.counter(
            "tether_failovers_total",
            "New connections carried by another server than the first choice.",
            self.failovers.get(),
        );
        e.counter(
            "tether_reverse_streams_total",
            "Streams from the control plane to a target on this node.",
            self.reverse_streams.get(),
        );
        e.gauge(
            "tether_reverse_streams_open",
            "Reverse streams open now.",
            self.reverse_open.get(),
        );
        e.counter(
            "tether_reverse_refused_total",
            "Reverse streams refused because the target is not allowed.",
            self.reverse_refused.get(),
        );
        e.counter(
            "tether_connections_accepted_total",
            "Local connections accepted.",
            self.connections_accepted.get(),
        );
        e.counter(
            "tether_connections_failed_total",
            "Local connections reset because no server could carry them.",
            self.connections_failed.get(),
        );
        e.counter(
            "tether_connections_over_limit_total",
            "Local connections reset because the connection limit was reached.",
            self.connections_over_limit.get(),
        );
        e.counter(
            "tether_connections_waited_total",
            "Local connections that found no tunnel up and waited for one (--reconnect-grace).",
            self.connections_waited.get(),
        );
        e.family(
            "tether_stream_open_failures_total",
            "Failed stream opens through one server, by reason.",
            "reason",
            &self.open_failures,
        );
        e.counter(
            "tether_stream_hedges_total",
            "Stream opens also asked of the next server because the first had not answered in time.",
            self.hedges.get(),
        );
        e.counter(
            "tether_stream_hedges_denied_total",
            "Hedges not sent because the hedge budget (a tenth of the opens) was spent.",
            self.hedges_denied.get(),
        );
        e.counter(
            "tether_announced_servers_refused_total",
            "Announced server addresses not dialed: loopback, link-local, unspecified or multicast, outside --allow-server-network.",
            self.announced_refused.get(),
        );
        e.counter(
            "tether_stream_early_data_total",
            "Streams whose first bytes travelled with the open (no round trip of their own).",
            self.early_data.get(),
        );
        e.counter(
            "tether_stream_retries_total",
            "Stream opens retried on another server.",
            self.retries.get(),
        );
        let links = pool.all();
        let skews: Vec<(String, f64)> = links
            .iter()
            .filter_map(|l| Some((l.server.clone(), l.clock_skew_ms()? as f64 / 1000.0)))
            .collect();
        let skews: Vec<(&str, f64)> = skews.iter().map(|(s, v)| (s.as_str(), *v)).collect();
        e.labeled(
            "tether_server_clock_skew_seconds",
            "How far each server's clock is ahead of this node's (negative: behind), as the server said when its tunnel came up (servers of 0.3 and later).",
            "gauge",
            "server",
            &skews,
        );
        tether_transport::metrics::render_key_exchanges(
            &mut e,
            "tether_tunnels_key_exchange",
            "Tunnels to servers up now, by the key-exchange group their handshake agreed (X25519MLKEM768 is post-quantum).",
            links.iter().map(|l| l.tunnel.key_exchange()),
        );
        self.shared.render(&mut e);
        e.finish()
    }
}
