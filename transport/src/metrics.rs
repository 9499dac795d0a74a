//! The metric families both binaries expose with one meaning, rendered once: what is being
//! relayed (streams, resets, bytes) and the process's own state (draining, certificate expiry,
//! renewals). Each binary adds its own families around these.

use crate::relay::Meter;
use std::sync::atomic::Ordering::Relaxed;
use tether_process::telemetry::{Counter, Exposition, Gauge};

#[derive(Debug, Default)]
pub struct Shared {
    pub streams_open: Gauge,
    pub streams_total: Counter,
    pub bytes: Meter,
    pub draining: Gauge,
    pub renewals: Counter,
    /// Expiry of this process's own certificate, Unix seconds (0 until known).
    pub cert_expiry: Gauge,
}

/// The key-exchange groups a tunnel can report (see [`crate::tls::group_name`]): the labels of
/// the `..._key_exchange` families, a fixed set.
pub const KEY_EXCHANGE_GROUPS: [&str; 6] = [
    "X25519MLKEM768",
    "X25519",
    "secp256r1",
    "secp384r1",
    "secp521r1",
    "other",
];

/// Renders a gauge family `name{group=...}`: how many of `tunnels` (each its key-exchange
/// group, if known) agreed each group. Every group is rendered, zeros too, so that an alert on
/// tunnels that are not post-quantum reads a number.
pub fn render_key_exchanges<'a>(
    e: &mut Exposition,
    name: &str,
    help: &str,
    tunnels: impl IntoIterator<Item = Option<&'a str>>,
) {
    let mut counts = [0i64; KEY_EXCHANGE_GROUPS.len()];
    for g in tunnels.into_iter().flatten() {
        let i = KEY_EXCHANGE_GROUPS
            .iter()
            .position(|k| *k == g)
            .unwrap_or(KEY_EXCHANGE_GROUPS.len() - 1);
        counts[i] += 1;
    }
    let values: Vec<(&str, i64)> = KEY_EXCHANGE_GROUPS.iter().copied().zip(counts).collect();
    e.labeled(name, help, "gauge", "group", &values);
}

impl Shared {
    /// Relayed streams that ended in a reset, as every relay counts them (see
    /// [`crate::relay`]).
    pub fn stream_resets(&self) -> u64 {
        self.bytes.resets.load(Relaxed)
    }

    pub fn render(&self, e: &mut Exposition) {
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
        e.counter(
            "tether_stream_resets_total",
            "Relayed streams that ended in a reset (either side).",
            self.stream_resets(),
        );
        e.counter(
            "tether_tunnel_bytes_sent_total",
            "Bytes read from TCP connections and sent into tunnels.",
            self.bytes.to_tunnel.load(Relaxed),
        );
        e.counter(
            "tether_tunnel_bytes_received_total",
            "Bytes received from tunnels and written to TCP connections.",
            self.bytes.from_tunnel.load(Relaxed),
        );
        e.gauge(
            "tether_draining",
            "1 while the process drains after SIGTERM.",
            self.draining.get(),
        );
        e.counter(
            "tether_renewals_total",
            "Certificate renewals (an agent's own; a server's signed for agents).",
            self.renewals.get(),
        );
        e.gauge(
            "tether_certificate_expiry_timestamp_seconds",
            "When this process's certificate expires (Unix time).",
            self.cert_expiry.get(),
        );
    }
}
