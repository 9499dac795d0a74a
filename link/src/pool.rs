//! The live links to servers, what each server announced, and the choice of one link for a new
//! stream. Agents keep one link per server; servers keep one per peer.

use crate::latency::{OpenLatency, Passed};
use std::str::FromStr;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant, SystemTime};
use tether_endpoint::status::LinkStatus;
use tether_process::telemetry::{Counted, Tally};
use tether_proto::capability::Capabilities;
use tether_proto::ServerInfo;
use tether_transport::transport::Tunnel;

/// How a new stream picks among healthy links.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Policy {
    /// Fewest open streams first, ties in configured order: spreads load.
    LeastStreams,
    /// Configured order: the first healthy server takes everything, the others are standbys.
    Ordered,
}

impl FromStr for Policy {
    type Err = tether_process::units::UnknownChoice;
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        match s {
            "least-streams" => Ok(Policy::LeastStreams),
            "ordered" => Ok(Policy::Ordered),
            other => Err(tether_process::units::UnknownChoice {
                what: "policy",
                got: other.to_string(),
                choices: "least-streams or ordered",
            }),
        }
    }
}

impl Policy {
    pub fn name(self) -> &'static str {
        match self {
            Policy::LeastStreams => "least-streams",
            Policy::Ordered => "ordered",
        }
    }
}

impl std::fmt::Display for Policy {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.name())
    }
}

/// One live tunnel to one server, and what that server told us about itself.
#[derive(Debug)]
pub struct Link {
    /// The address dialed (`host:port` as configured or announced).
    pub server: String,
    pub tunnel: Tunnel,
    /// The server's instance id, from its welcome: tells two addresses of one server apart.
    pub server_id: String,
    /// The SHA-256 of the key the server's certificate proves: two links are to one server
    /// only when both the id it says and the key it proves agree, so that a holder of another
    /// server certificate cannot keep an agent off a real server by answering with its id.
    pub server_key: String,
    pub since: Instant,
    pub since_wall: SystemTime,
    /// Position in the configured order (lower first).
    pub rank: usize,
    streams: AtomicUsize,
    healthy: AtomicBool,
    draining: AtomicBool,
    servers: Mutex<Option<Vec<ServerInfo>>>,
    /// What the server announced in its welcome (empty from a 0.1 server).
    capabilities: Capabilities,
    /// How fast the server answers opens: when to hedge.
    pub open_latency: OpenLatency,
    /// Whether the server lately let a hedge beat it: then it is tried last.
    pub passed: Passed,
    /// The liveness watch wants a probe sent on this link's control stream.
    probe: tokio::sync::Notify,
    /// A surviving server reported this link's server down, not yet seen by the watch.
    reported_down: AtomicBool,
    /// The liveness watch doubts the server: new streams go elsewhere first.
    doubted: AtomicBool,
    /// Answers to probes received (`Pong`s).
    pongs: std::sync::atomic::AtomicU64,
    /// How far the server's clock is ahead of ours, milliseconds ([`NO_SKEW`] until its
    /// `Clock` came).
    clock_skew_ms: std::sync::atomic::AtomicI64,
}

/// [`Link::clock_skew`] not known (a server before 0.3, or its `Clock` not read yet).
const NO_SKEW: i64 = i64::MIN;

/// How far a server's clock may be from ours before the agent warns: certificates and tokens
/// are checked against clocks, and a join or a renewal fails on a node minutes off.
pub const CLOCK_SKEW_WARN: Duration = Duration::from_secs(30);

impl Link {
    /// The key the server's certificate proves (see [`Link::server_key`]).
    pub fn with_server_key(mut self, key: String) -> Self {
        self.server_key = key;
        self
    }

    pub fn new(server: String, tunnel: Tunnel, server_id: String, rank: usize) -> Self {
        Link {
            server,
            tunnel,
            server_id,
            server_key: String::new(),
            since: Instant::now(),
            since_wall: SystemTime::now(),
            rank,
            streams: AtomicUsize::new(0),
            healthy: AtomicBool::new(true),
            draining: AtomicBool::new(false),
            servers: Mutex::new(None),
            capabilities: Capabilities::default(),
            open_latency: OpenLatency::default(),
            passed: Passed::default(),
            probe: tokio::sync::Notify::new(),
            reported_down: AtomicBool::new(false),
            doubted: AtomicBool::new(false),
            pongs: std::sync::atomic::AtomicU64::new(0),
            clock_skew_ms: std::sync::atomic::AtomicI64::new(NO_SKEW),
        }
    }

    /// Notes the server's clock (`unix_ms`, from its `Clock`), read now: the difference from
    /// ours, taking the message to have spent half a round trip on the way. Returns it.
    pub fn clock(&self, unix_ms: u64) -> Duration {
        let now = tether_process::units::unix_millis(SystemTime::now()) as i64;
        let half_rtt = (self.tunnel.rtt().as_millis() / 2) as i64;
        let skew = (unix_ms.min(i64::MAX as u64) as i64)
            .saturating_add(half_rtt)
            .saturating_sub(now);
        self.clock_skew_ms
            .store(skew.max(NO_SKEW + 1), Ordering::Relaxed);
        Duration::from_millis(skew.unsigned_abs())
    }

    /// How far the server's clock is ahead of ours (negative: behind), in milliseconds.
    pub fn clock_skew_ms(&self) -> Option<i64> {
        let v = self.clock_skew_ms.load(Ordering::Relaxed);
        (v != NO_SKEW).then_some(v)
    }

    /// Counts an answer to a probe.
    pub fn ponged(&self) {
        self.pongs.fetch_add(1, Ordering::Relaxed);
    }

    /// Answers to probes so far.
    pub fn pongs(&self) -> u64 {
        self.pongs.load(Ordering::Relaxed)
    }

    /// Asks the link's control loop to send a probe (a `Ping`).
    pub fn request_probe(&self) {
        self.probe.notify_one();
    }

    /// Resolves when a probe is wanted. Cancel-safe: a request made meanwhile is kept.
    pub async fn probe_wanted(&self) {
        self.probe.notified().await
    }

    /// Notes that a surviving server reported this one down.
    pub fn report_down(&self) {
        self.reported_down.store(true, Ordering::Relaxed);
    }

    /// Takes the report, if one came since the last call.
    pub fn take_report(&self) -> bool {
        self.reported_down.swap(false, Ordering::Relaxed)
    }

    pub fn set_doubted(&self, v: bool) {
        self.doubted.store(v, Ordering::Relaxed);
    }

    /// Whether the liveness watch doubts the server now.
    pub fn doubted(&self) -> bool {
        self.doubted.load(Ordering::Relaxed)
    }

    /// The capabilities the server announced in its welcome.
    pub fn with_capabilities(mut self, capabilities: Capabilities) -> Self {
        self.capabilities = capabilities;
        self
    }

    /// Whether the server announced `capability`: new behaviour is used only then.
    pub fn has(&self, capability: &str) -> bool {
        self.capabilities.has(capability)
    }

    pub fn capabilities(&self) -> &Capabilities {
        &self.capabilities
    }

    /// Streams open through this link now.
    pub fn streams(&self) -> usize {
        self.streams.load(Ordering::Relaxed)
    }

    /// Counts a stream for as long as the guard lives.
    pub fn stream_guard(self: &Arc<Self>) -> StreamGuard {
        Counted::new(self.clone())
    }

    /// Whether the server's upstream was healthy when it last said.
    pub fn healthy(&self) -> bool {
        self.healthy.load(Ordering::Relaxed)
    }

    pub fn set_healthy(&self, v: bool) {
        self.healthy.store(v, Ordering::Relaxed);
    }

    /// Whether the server announced that it is draining.
    pub fn draining(&self) -> bool {
        self.draining.load(Ordering::Relaxed)
    }

    pub fn set_draining(&self) {
        self.draining.store(true, Ordering::Relaxed);
    }

    /// What `status` shows of this link, the same for an agent's servers and a server's peers.
    pub fn status(&self) -> LinkStatus {
        LinkStatus {
            address: self.server.clone(),
            state: "up".into(),
            instance: Some(self.server_id.clone()),
            remote: Some(self.tunnel.remote_addr().to_string()),
            transport: Some(self.tunnel.kind().to_string()),
            key_exchange: self.tunnel.key_exchange().map(String::from),
            healthy: Some(self.healthy()),
            draining: self.draining(),
            streams: self.streams() as u64,
            rtt_ms: Some((self.tunnel.rtt().as_secs_f64() * 1e4).round() / 10.0),
            connected_since: Some(tether_process::units::unix_seconds(self.since_wall)),
            capabilities: self.capabilities.names(),
            clock_skew_ms: self.clock_skew_ms(),
        }
    }

    /// The server list this server announced last, if any.
    pub fn servers(&self) -> Option<Vec<ServerInfo>> {
        self.servers
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .clone()
    }

    pub fn set_servers(&self, list: Vec<ServerInfo>) {
        *self.servers.lock().unwrap_or_else(|p| p.into_inner()) = Some(list);
    }
}

/// Counts one open stream on a link.
pub type StreamGuard = Counted<Arc<Link>>;

impl Tally for Link {
    fn up(&self) {
        self.streams.up();
    }
    fn down(&self) {
        self.streams.down();
    }
}

/// What the choice of a link looks at, read once per choice: stream counts change while a
/// choice is made, and a sort whose keys move under it has no defined order.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Standing {
    pub healthy: bool,
    pub draining: bool,
    /// The server lately sat on an open another server answered ([`Passed`]).
    pub passed_over: bool,
    pub streams: usize,
    /// The server's place in the configured order.
    pub rank: usize,
}

/// Orders links for a new stream, best first: draining links never; servers passed over lately
/// (likely dead) after all others; healthy ones before unhealthy ones (an unhealthy server may
/// still relay through a peer); within each group, by `policy` (fewest open streams, then
/// configured order; or configured order alone).
pub fn best_first<T>(items: Vec<T>, policy: Policy, standing: impl Fn(&T) -> Standing) -> Vec<T> {
    let mut v: Vec<(Standing, T)> = items
        .into_iter()
        .map(|t| (standing(&t), t))
        .filter(|(s, _)| !s.draining)
        .collect();
    match policy {
        Policy::LeastStreams => {
            v.sort_by_key(|(s, _)| (s.passed_over, !s.healthy, s.streams, s.rank))
        }
        Policy::Ordered => v.sort_by_key(|(s, _)| (s.passed_over, !s.healthy, s.rank)),
    }
    v.into_iter().map(|(_, t)| t).collect()
}

/// The live links.
#[derive(Debug)]
pub struct Pool {
    links: Mutex<Vec<Arc<Link>>>,
    /// Links left for a successor (a renewed certificate, QUIC after TCP) that still carry
    /// their last streams: offered to no new stream, but closed with their server when the
    /// liveness watch finds it dead (see [`Pool::retired_of`]).
    retired: Mutex<Vec<Arc<Link>>>,
    /// Since when the pool has had no link (`None` while it has one); every change of the
    /// links notifies, so that a stream waiting for a tunnel (see [`Pool::wait_for_link`])
    /// looks again. Written under the `links` lock, so that it always agrees with it.
    empty_since: tokio::sync::watch::Sender<Option<tokio::time::Instant>>,
    /// The link is dark: every tunnel silent at once, or just back from that (the liveness
    /// watch's word, see `Watch::dark`), as the link monitor last saw it.
    dark: std::sync::atomic::AtomicBool,
}

impl Default for Pool {
    fn default() -> Self {
        // A new pool counts as just emptied: the first tunnels are on their way.
        let (empty_since, _) = tokio::sync::watch::channel(Some(tokio::time::Instant::now()));
        Pool {
            links: Mutex::new(Vec::new()),
            retired: Mutex::new(Vec::new()),
            empty_since,
            dark: std::sync::atomic::AtomicBool::new(false),
        }
    }
}

impl Pool {
    pub fn add(&self, link: Arc<Link>) {
        let mut links = self.lock();
        links.push(link);
        // Notifies even when the pool was not empty: a stream may wait for a new link.
        self.empty_since.send_modify(|since| *since = None);
    }

    pub fn remove(&self, link: &Arc<Link>) {
        let mut links = self.lock();
        links.retain(|l| !Arc::ptr_eq(l, link));
        if links.is_empty() {
            self.empty_since.send_if_modified(|since| {
                let was = since.is_some();
                since.get_or_insert_with(tokio::time::Instant::now);
                !was
            });
        }
    }

    /// The link monitor's word: the link is dark (see `Watch::dark`), or not.
    pub fn set_dark(&self, dark: bool) {
        self.dark.store(dark, std::sync::atomic::Ordering::Relaxed);
    }

    /// Whether the link is dark: an open in flight waits for the link to come back rather
    /// than giving up (see the agent's race).
    pub fn dark(&self) -> bool {
        self.dark.load(std::sync::atomic::Ordering::Relaxed)
    }

    /// Keeps `link` (already removed) among the retired while its last streams finish.
    pub fn retire(&self, link: Arc<Link>) {
        self.lock_retired().push(link);
    }

    /// `link`'s last streams are done (or it closed): it is forgotten.
    pub fn forget_retired(&self, link: &Arc<Link>) {
        self.lock_retired().retain(|l| !Arc::ptr_eq(l, link));
    }

    /// The retired links to `server`. A server found dead takes them too: the soak across a
    /// cellular link saw a watch left on the tunnel a renewal had retired hang when its server
    /// was killed, since nothing watched that tunnel any more (QUIC's own idle timeout is the
    /// blackout tolerance and 5 s).
    pub fn retired_of(&self, server: &str) -> Vec<Arc<Link>> {
        self.lock_retired()
            .iter()
            .filter(|l| l.server == server)
            .cloned()
            .collect()
    }

    /// Waits until `until` for a link that is not one of `tried`; whether one is up. For a
    /// stream whose every tunnel failed at once: their successors are usually moments away.
    pub async fn wait_for_new_link(
        &self,
        tried: &[Arc<Link>],
        until: tokio::time::Instant,
    ) -> bool {
        // A draining link takes no new stream: it is not what the caller waits for.
        let fresh = || {
            self.lock()
                .iter()
                .any(|l| !l.draining() && !tried.iter().any(|t| Arc::ptr_eq(t, l)))
        };
        let mut changes = self.empty_since.subscribe();
        loop {
            changes.borrow_and_update();
            if fresh() {
                return true;
            }
            tokio::select! {
                // The sender lives as long as the pool, which the caller borrows.
                changed = changes.changed() => if changed.is_err() { return fresh() },
                _ = tokio::time::sleep_until(until) => return fresh(),
            }
        }
    }

    /// Waits for a link while the pool has been empty for less than `grace`; whether one is
    /// up. A new stream that finds no tunnel thus rides out the gap between one tunnel and
    /// the next (a fallback from QUIC to TCP, the last server restarting) instead of failing,
    /// and once the pool has been empty for `grace` it fails at once, without waiting.
    pub async fn wait_for_link(&self, grace: std::time::Duration) -> bool {
        let mut changes = self.empty_since.subscribe();
        loop {
            let Some(since) = *changes.borrow_and_update() else {
                return true;
            };
            let until = since + grace;
            if tokio::time::Instant::now() >= until {
                return false;
            }
            tokio::select! {
                // The sender lives as long as the pool, which the caller borrows.
                changed = changes.changed() => if changed.is_err() { return !self.is_empty() },
                _ = tokio::time::sleep_until(until) => return !self.is_empty(),
            }
        }
    }

    pub fn len(&self) -> usize {
        self.lock().len()
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// Every live link, in configured order.
    pub fn all(&self) -> Vec<Arc<Link>> {
        let mut v = self.lock().clone();
        v.sort_by_key(|l| l.rank);
        v
    }

    /// Whether a link to the server with this instance id and key is up (other than
    /// `except`).
    pub fn has_server(&self, server_id: &str, server_key: &str, except: &str) -> bool {
        self.lock()
            .iter()
            .any(|l| l.server_id == server_id && l.server_key == server_key && l.server != except)
    }

    /// A surviving server reported the server with this instance id down: its links are told.
    pub fn report_down(&self, server_id: &str) -> usize {
        let links = self.lock();
        let mut n = 0;
        for l in links.iter().filter(|l| l.server_id == server_id) {
            l.report_down();
            n += 1;
        }
        n
    }

    /// The links to try for a new stream, best first (see [`best_first`]).
    pub fn candidates(&self, policy: Policy) -> Vec<Arc<Link>> {
        let links = self.lock().clone();
        best_first(links, policy, |l| Standing {
            healthy: l.healthy(),
            draining: l.draining(),
            passed_over: l.passed.now() || l.doubted(),
            streams: l.streams(),
            rank: l.rank,
        })
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, Vec<Arc<Link>>> {
        self.links.lock().unwrap_or_else(|p| p.into_inner())
    }

    fn lock_retired(&self) -> std::sync::MutexGuard<'_, Vec<Arc<Link>>> {
        self.retired.lock().unwrap_or_else(|p| p.into_inner())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn s(healthy: bool, draining: bool, streams: usize, rank: usize) -> Standing {
        Standing {
            healthy,
            draining,
            passed_over: false,
            streams,
            rank,
        }
    }

    fn order(links: &[(&'static str, Standing)], policy: Policy) -> Vec<&'static str> {
        best_first(links.to_vec(), policy, |(_, st)| *st)
            .into_iter()
            .map(|(n, _)| n)
            .collect()
    }

    #[test]
    fn healthy_and_least_busy_first_draining_never() {
        let links = [
            ("a", s(true, false, 5, 0)),
            ("b", s(true, false, 1, 1)),
            ("c", s(false, false, 0, 2)),
            ("d", s(true, true, 0, 3)),
            ("e", s(true, false, 1, 4)),
        ];
        assert_eq!(order(&links, Policy::LeastStreams), ["b", "e", "a", "c"]);
        assert_eq!(order(&links, Policy::Ordered), ["a", "b", "e", "c"]);
    }

    #[test]
    fn a_server_passed_over_comes_after_all_others() {
        let passed = Standing {
            passed_over: true,
            ..s(true, false, 0, 0)
        };
        let links = [
            ("a", passed),
            ("b", s(true, false, 9, 1)),
            ("c", s(false, false, 0, 2)),
        ];
        assert_eq!(order(&links, Policy::LeastStreams), ["b", "c", "a"]);
        assert_eq!(order(&links, Policy::Ordered), ["b", "c", "a"]);
    }

    #[test]
    fn an_unhealthy_server_is_still_a_last_resort() {
        let links = [("a", s(false, false, 0, 0)), ("b", s(false, false, 0, 1))];
        assert_eq!(order(&links, Policy::LeastStreams), ["a", "b"]);
        assert!(order(&[("a", s(true, true, 0, 0))], Policy::Ordered).is_empty());
    }

    #[test]
    fn policies_parse_and_print_alike() {
        for p in [Policy::LeastStreams, Policy::Ordered] {
            assert_eq!(p.to_string().parse::<Policy>(), Ok(p));
        }
        assert!("random".parse::<Policy>().is_err());
    }
}
