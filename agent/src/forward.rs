//! The local listener: each accepted connection becomes a stream through the best tunnel.
//!
//! A connection's open is one exchange per server tried (`Open`, then the server's `Status`),
//! and two things keep it short:
//!
//! - **Early bytes.** For a service whose traffic is TLS (the apiserver by default), the bytes
//!   the client sends before the verdict (its ClientHello) go right behind the `Open`, so a new
//!   connection costs no round trip of its own. They are kept (at most [`EARLY_LIMIT`]) until
//!   the verdict, for a retry elsewhere. The server writes them to its upstream only after its
//!   connect succeeded. At most one attempt carries them while it lives: a copy goes to
//!   another server only once the first attempt is given up and reset, so early bytes never
//!   reach two upstream connections that both stay up. Other services read nothing from the
//!   client before the verdict.
//! - **Hedging.** When the chosen server has not answered within the delay its past answers
//!   suggest ([`tether_link::latency`]), the next server is asked too and the first
//!   `Ok` wins; the other attempt is reset. A dead server thus costs a few milliseconds, not the
//!   open timeout. A hedge carries no early bytes until its own `Ok` (the rule above).
//!
//! The decisions (which server, when to hedge, when to give up or wait for a new tunnel) are
//! [`crate::race`]'s, without I/O and tested on paused time; this file does what it decides.

use crate::metrics::{Metrics, OpenFailure};
use crate::race::{AttemptId, Decision, Race, Step, Timeouts, Timer, Verdict, MAX_ATTEMPTS};
use bytes::{Bytes, BytesMut};
use std::sync::Arc;
use std::time::Duration;
use tether_link::latency::HedgeBudget;
use tether_link::pool::{Link, Policy, Pool, StreamGuard};
use tether_process::shutdown::ShutdownSignal;
use tether_process::telemetry::GaugeGuard;
use tether_proto::capability;
use tether_proto::{code, Message, Target};
use tether_transport::open::{self, OpenError};
use tether_transport::relay;
use tether_transport::transport::Stream;
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::Semaphore;
use tokio::time::Instant;
use tracing::{debug, warn};

/// Most early bytes kept per connection until a verdict; past it, the client is not read
/// until one arrives.
pub const EARLY_LIMIT: usize = 64 * 1024;

/// Settings of the forwarder.
#[derive(Debug, Clone)]
pub struct Forwarding {
    /// The server-side service each connection is carried to.
    pub service: String,
    pub policy: Policy,
    pub stream_open_timeout: Duration,
    pub last_attempt_timeout: Duration,
    /// How long a connection that finds no tunnel waits for one (see `Pool::wait_for_link`).
    pub reconnect_grace: Duration,
    /// The longest an open waits through a dark link (every tunnel silent at once).
    pub blackout_tolerance: Duration,
    pub max_connections: usize,
    /// The service's traffic is TLS, so its first bytes may travel with the open (see the
    /// module's doc and docs/protocol.md).
    pub early_data: bool,
}

/// Accepts local connections until shutdown.
pub async fn serve(
    listener: TcpListener,
    pool: Arc<Pool>,
    metrics: Arc<Metrics>,
    settings: Forwarding,
    mut stop: ShutdownSignal,
) {
    let limit = Arc::new(Semaphore::new(settings.max_connections));
    let settings = Arc::new(settings);
    let budget = Arc::new(HedgeBudget::default());
    loop {
        let accepted = tether_endpoint::net::accept_retrying(
            || listener.accept(),
            |e| warn!(error = %e, "local accept failed"),
        );
        let (conn, peer) = tokio::select! {
            a = accepted => a,
            _ = stop.wait() => return,
        };
        metrics.connections_accepted.inc();
        let Ok(permit) = limit.clone().try_acquire_owned() else {
            metrics.connections_over_limit.inc();
            warn!(%peer, limit = settings.max_connections, "connection limit reached; resetting new connection");
            reset(conn);
            continue;
        };
        let (pool, metrics, settings) = (pool.clone(), metrics.clone(), settings.clone());
        let budget = budget.clone();
        tokio::spawn(async move {
            forward(conn, &pool, &metrics, &settings, &budget).await;
            drop(permit);
        });
    }
}

/// Closes a connection with a reset, so that the client fails fast instead of waiting.
fn reset(conn: TcpStream) {
    let _ = conn.set_zero_linger();
}

/// One server asked to carry the connection: the I/O of a [`Race`]'s attempt.
struct Attempt {
    id: AttemptId,
    link: Arc<Link>,
    /// The candidate's place in the order (0: the first choice).
    place: usize,
    stream: Stream,
    /// How many of the kept early bytes this attempt has been sent.
    sent: usize,
    /// Whether early bytes go to it as they arrive (it is the only live attempt, or was).
    eager: bool,
    /// Counts the stream on its link from the open on, through the relay for the winner: a
    /// tunnel being left for a new one (a renewal, a move to QUIC) is closed only when its
    /// count is zero, so it must not be while an open waits on it.
    _counted: StreamGuard,
}

/// What happened while waiting for verdicts.
enum Event {
    Verdict(
        usize,
        Result<Option<Message>, tether_transport::transport::FrameError>,
    ),
    Client(std::io::Result<usize>),
    Timer(Option<Timer>),
}

async fn forward(
    mut conn: TcpStream,
    pool: &Pool,
    metrics: &Metrics,
    settings: &Forwarding,
    budget: &HedgeBudget,
) {
    budget.opened();
    if pool.is_empty() {
        metrics.connections_waited.inc();
        if pool.wait_for_link(settings.reconnect_grace).await {
            debug!("a tunnel came up while the connection waited");
        }
    }
    let timeouts = Timeouts {
        open: settings.stream_open_timeout,
        last: settings.last_attempt_timeout,
        grace: settings.reconnect_grace,
        dark: settings.blackout_tolerance,
    };
    let mut race = Race::new(pool.candidates(settings.policy), timeouts);
    if race.candidates() == 0 && !pool.is_empty() {
        race.none_usable();
    }
    let count = race.candidates();
    let mut attempts: Vec<Attempt> = Vec::with_capacity(MAX_ATTEMPTS);
    let mut kept = BytesMut::new();
    let mut client_ended = false;
    let early = settings.early_data;
    let winner = loop {
        let timer = match race.poll(Instant::now()) {
            Step::GiveUp => break None,
            Step::WaitForLinks { until } => {
                // Every tunnel asked failed as a tunnel: they died together (UDP blocked, the
                // network changed) before the agent noticed; or none could be asked (every
                // server draining). Their successors (a fallback to TCP, a reconnect, a
                // restarted server) are moments away: wait for one, as a connection that finds
                // no tunnel does, and try it.
                if pool.wait_for_new_link(race.tried(), until).await {
                    metrics.connections_waited.inc();
                    race.add_links(pool.candidates(settings.policy));
                }
                continue;
            }
            Step::Start {
                id,
                link,
                place,
                eager,
                timeout,
            } => {
                if !eager {
                    metrics.hedges.inc();
                    debug!(server = %link.server, "no answer yet from the first choice: asking the next server too");
                }
                let retried = race.more_left();
                match start(link.clone(), id, place, eager, timeout, &kept, settings).await {
                    Ok(a) => {
                        let rtt = a.link.tunnel.rtt();
                        let hedge_after = a
                            .link
                            .open_latency
                            .hedge_delay(rtt, settings.stream_open_timeout);
                        race.started(id, hedge_after);
                        attempts.push(a);
                    }
                    Err(e) => {
                        race.start_failed(id);
                        failed(metrics, &link, failure(&e), &e, retried);
                    }
                }
                continue;
            }
            Step::Wait { timer } => timer,
        };
        if attempts.is_empty() {
            // The race waits only with attempts live; never select over none.
            debug_assert!(false, "a race waiting with no attempt");
            break None;
        }
        let read_client = early && !client_ended && kept.len() < EARLY_LIMIT;
        let event = {
            let verdicts = futures_util::future::select_all(
                attempts
                    .iter_mut()
                    .map(|a| Box::pin(a.stream.recv.read_message())),
            );
            tokio::select! {
                (r, i, _) = verdicts => Event::Verdict(i, r),
                r = read_some(&mut conn, &mut kept), if read_client => Event::Client(r),
                _ = sleep_until(timer.map(|(at, _)| at)) => Event::Timer(timer.map(|(_, t)| t)),
            }
        };
        let decision = match event {
            Event::Verdict(i, r) => {
                let id = attempts[i].id;
                let waited = race.waited(id, Instant::now()).unwrap_or_default();
                let a = &mut attempts[i];
                let mut target_reset = false;
                let verdict = match open::verdict(&mut a.stream, r).await {
                    Ok(()) => {
                        a.link.open_latency.record(waited);
                        a.link.passed.answered();
                        Verdict::Ok
                    }
                    Err(OpenError::Reset) => {
                        a.link.open_latency.record(waited);
                        a.link.passed.answered();
                        target_reset = true;
                        Verdict::Refused
                    }
                    Err(e) => {
                        let why = failure(&e);
                        if let OpenError::Refused { .. } = e {
                            // An answer, if not the one hoped for: the server is alive.
                            a.link.open_latency.record(waited);
                            a.link.passed.answered();
                        }
                        failed(metrics, &a.link, why, &e, race.more_left());
                        if why == OpenFailure::TunnelLost {
                            Verdict::Lost
                        } else {
                            Verdict::Refused
                        }
                    }
                };
                if target_reset {
                    // The server answered, and its upstream reset the connection at once (the
                    // reset took the answer with it): the connection was carried, and is
                    // reset, as a reset travels. No other server is asked: the upstream may
                    // have had the early bytes.
                    debug!(server = %attempts[i].link.server, "the upstream reset the connection as it was answered");
                    for mut a in attempts.drain(..) {
                        a.stream.reset(code::RESET).await;
                    }
                    metrics.shared.bytes.reset();
                    reset(conn);
                    return;
                }
                race.verdict(id, verdict)
            }
            Event::Timer(Some(Timer::Expired(id))) => {
                let waited = race.waited(id, Instant::now()).unwrap_or_default();
                race.set_dark(pool.dark());
                let decision = race.timer(Timer::Expired(id), || false);
                if decision == Decision::Held {
                    debug!(waited = ?waited, "the link is dark: the open waits for it");
                } else if let Some(a) = attempts.iter().find(|a| a.id == id) {
                    let e = OpenError::TimedOut(waited);
                    failed(metrics, &a.link, failure(&e), &e, race.more_left());
                }
                decision
            }
            Event::Timer(Some(Timer::Hedge)) => race.timer(Timer::Hedge, || budget.take()),
            Event::Timer(None) => Decision::Nothing,
            Event::Client(Ok(0)) => {
                client_ended = true;
                Decision::Nothing
            }
            Event::Client(Ok(_)) => {
                for a in attempts.iter_mut().filter(|a| a.eager) {
                    send_kept(a, &kept).await;
                }
                Decision::Nothing
            }
            Event::Client(Err(e)) => {
                // A server may have answered already and opened its upstream: the client's
                // reset travels on as a reset, and counts as one, as it would in the relay.
                debug!(error = %e, "the client reset before a server answered");
                for mut a in attempts.drain(..) {
                    a.stream.reset(code::RESET).await;
                }
                metrics.shared.bytes.reset();
                return;
            }
        };
        match decision {
            Decision::Won { winner, losers } => {
                let mut won = None;
                for mut a in attempts.drain(..) {
                    if a.id == winner {
                        won = Some(a);
                    } else if losers.contains(&a.id) {
                        // It sat on the open another server answered: try it last for a while.
                        a.link.passed.over();
                        a.stream.reset(code::RESET).await;
                    }
                }
                break won;
            }
            Decision::Lost {
                ended,
                reset,
                promote,
            } => {
                if let Some(i) = attempts.iter().position(|a| a.id == ended) {
                    let mut a = attempts.swap_remove(i);
                    if reset {
                        a.stream.reset(code::RESET).await;
                    }
                }
                if let Some(a) = attempts.iter_mut().find(|a| Some(a.id) == promote) {
                    // The one attempt left may carry the early bytes now.
                    if a.link.has(capability::EARLY_DATA) {
                        a.eager = true;
                        send_kept(a, &kept).await;
                    }
                }
            }
            Decision::HedgeDenied => metrics.hedges_denied.inc(),
            Decision::Hedge | Decision::Held | Decision::Nothing => {}
        }
    };
    // The links asked and not used stay out of the connection's life: a dead one's tunnel
    // must not be kept alive by a long stream on another.
    drop(race);
    let Some(mut a) = winner else {
        if count == 0 {
            metrics.open_failed(OpenFailure::NoTunnel);
        }
        metrics.connections_failed.inc();
        warn!(
            tunnels = count,
            "no server could carry a new connection; resetting it"
        );
        reset(conn);
        return;
    };
    // The winner has all early bytes before anything the relay reads; the copy goes, so that
    // a connection holds no buffer of its own once relayed.
    send_kept(&mut a, &kept).await;
    if !kept.is_empty() {
        metrics.early_data.inc();
        // Counted as relayed bytes, as they are.
        let n = kept.len() as u64;
        metrics
            .shared
            .bytes
            .to_tunnel
            .fetch_add(n, std::sync::atomic::Ordering::Relaxed);
    }
    drop(kept);
    if a.place > 0 {
        metrics.failovers.inc();
    }
    let _open = GaugeGuard::new(&metrics.shared.streams_open);
    metrics.shared.streams_total.inc();
    // A client that half-closed before the verdict reads as ended again: the relay finishes
    // the stream's direction at once.
    let summary = relay::relay(conn, a.stream, &[&metrics.shared.bytes]).await;
    debug!(server = %a.link.server, sent = summary.to_tunnel, received = summary.from_tunnel,
        outcome = ?summary.outcome, "stream done");
}

/// Opens a stream on `link` and sends `Open` (and the kept early bytes, when `eager`), within
/// `timeout`.
async fn start(
    link: Arc<Link>,
    id: AttemptId,
    place: usize,
    eager: bool,
    timeout: Duration,
    kept: &BytesMut,
    settings: &Forwarding,
) -> Result<Attempt, OpenError> {
    let counted = link.stream_guard();
    let target = Target::Service(settings.service.clone());
    match tokio::time::timeout(timeout, open::begin(&link.tunnel, target, 0)).await {
        Ok(Ok(stream)) => {
            // Before the verdict, only to a server that relays what follows an `Open`.
            let eager = eager && link.has(capability::EARLY_DATA);
            let mut a = Attempt {
                _counted: counted,
                id,
                link,
                place,
                stream,
                sent: 0,
                eager,
            };
            if eager {
                send_kept(&mut a, kept).await;
            }
            Ok(a)
        }
        Ok(Err(e)) => Err(e),
        Err(_) => Err(OpenError::TimedOut(timeout)),
    }
}

/// How a failed open counts in the metrics.
fn failure(e: &OpenError) -> OpenFailure {
    match e {
        OpenError::Refused { .. } | OpenError::Protocol(_) | OpenError::Reset => {
            OpenFailure::Refused
        }
        OpenError::Tunnel(_) => OpenFailure::TunnelLost,
        OpenError::TimedOut(_) => OpenFailure::Timeout,
    }
}

/// Counts and logs a failed attempt.
fn failed(
    metrics: &Metrics,
    link: &Link,
    why: OpenFailure,
    detail: &dyn std::fmt::Display,
    retried: bool,
) {
    metrics.open_failed(why);
    debug!(server = %link.server, reason = %detail, "stream open failed");
    if retried {
        metrics.retries.inc();
    }
}

/// Sends an attempt the kept early bytes it has not had yet. A failure shows in its verdict.
async fn send_kept(a: &mut Attempt, kept: &BytesMut) {
    if a.sent < kept.len() {
        let more = Bytes::copy_from_slice(&kept[a.sent..]);
        a.sent = kept.len();
        let _ = a.stream.send.write_chunk(more).await;
    }
}

/// Reads what the client has sent, into `kept` (up to [`EARLY_LIMIT`] in all).
async fn read_some(conn: &mut TcpStream, kept: &mut BytesMut) -> std::io::Result<usize> {
    use tokio::io::AsyncReadExt;
    let room = EARLY_LIMIT - kept.len();
    kept.reserve(room.min(16 * 1024));
    let mut limited = (&mut *conn).take(room as u64);
    limited.read_buf(kept).await
}

async fn sleep_until(at: Option<Instant>) {
    match at {
        Some(at) => tokio::time::sleep_until(at).await,
        None => std::future::pending().await,
    }
}
