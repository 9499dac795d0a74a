//! The agent's link monitor: samples every tunnel of the pool each tick, feeds the liveness
//! watch ([`super::liveness`]) and carries out its verdicts. All the judgement is in the watch;
//! this is the I/O around it.

use super::liveness::{Action, Sample, Settings, Watch};
use super::pool::{Link, Pool};
use std::collections::BTreeMap;
use std::sync::Arc;
use std::time::Duration;
use tether_process::shutdown::ShutdownSignal;
use tether_proto::{capability, code};
use tracing::{debug, warn};

/// How often the tunnels are sampled: fine enough for a verdict within seconds, and the cost is one
/// look at each tunnel's counters.
pub const TICK: Duration = Duration::from_millis(100);

/// The watch's settings from the agent's liveness settings.
pub fn settings(l: tether_transport::tls::Liveness) -> Settings {
    Settings {
        dead_after: l.idle_timeout,
        tolerance: l.blackout_tolerance,
        idle_probe: l.keepalive_interval,
        ..Settings::default()
    }
}

/// Closes `link`'s tunnel, and the tunnels to its server that were left for it and still
/// carry their last streams (see [`Pool::retired_of`]): they went with it.
fn close_with_retired(pool: &Pool, link: &Link, reason: &str) {
    link.tunnel.close(code::SHUTDOWN, reason);
    for r in pool.retired_of(&link.server) {
        r.tunnel.close(code::SHUTDOWN, reason);
    }
}

/// Runs until shutdown.
pub async fn run(pool: Arc<Pool>, settings: Settings, mut stop: ShutdownSignal) {
    let mut watch: Watch<usize> = Watch::new(settings);
    let mut tick = tokio::time::interval(TICK);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        tokio::select! {
            _ = tick.tick() => {}
            _ = stop.wait() => return,
        }
        let now = tokio::time::Instant::now();
        let links: BTreeMap<usize, Arc<Link>> =
            pool.all().into_iter().map(|l| (l.tunnel.id(), l)).collect();
        let samples: Vec<(usize, Sample)> = links
            .iter()
            .map(|(id, l)| {
                let t = l.tunnel.traffic();
                // An older server keeps the tunnel busy itself (keepalives, heartbeats): its
                // packets are its word. A newer one speaks when asked: its acknowledgements are.
                let beats = !l.has(capability::LIVENESS);
                (
                    *id,
                    Sample {
                        received: if beats { t.heard } else { t.answers },
                        sent: t.questions,
                        pongs: l.pongs(),
                        rtt: l.tunnel.rtt(),
                        lost: t.lost,
                        beats,
                    },
                )
            })
            .collect();
        for (id, l) in &links {
            if l.take_report() {
                watch.reported(id, now);
            }
        }
        for action in watch.tick(now, &samples) {
            match action {
                Action::Probe(id) => {
                    if let Some(l) = links.get(&id) {
                        if l.has(capability::LIVENESS) {
                            l.request_probe();
                        }
                    }
                }
                Action::DeadServer { key, silent } => {
                    if let Some(l) = links.get(&key) {
                        warn!(server = %l.server, silent_ms = silent.as_millis() as u64, streams = l.streams(),
                            "server silent while another answers: closing its tunnel, resetting its streams");
                        l.passed.over();
                        close_with_retired(&pool, l, "server silent while others answer");
                    }
                }
                Action::LinkLost { key, silent } => {
                    if let Some(l) = links.get(&key) {
                        warn!(server = %l.server, silent_ms = silent.as_millis() as u64, streams = l.streams(),
                            "link silent for longer than the blackout tolerance: closing the tunnel");
                        close_with_retired(&pool, l, "silent past the blackout tolerance");
                    }
                }
            }
        }
        pool.set_dark(watch.dark(now));
        for (id, l) in &links {
            let doubted = watch.doubted(id, now);
            if doubted != l.doubted() {
                debug!(server = %l.server, doubted, "server {}", if doubted { "silent: probing every tunnel" } else { "answers again" });
            }
            l.set_doubted(doubted);
        }
    }
}
