//! What happened, and whether it was allowed: faults, connection outcomes, and the rules
//! that say which failure a fault explains and which promise broke.

use super::*;

/// A fault, from its start to its end (seconds since the run began).
#[derive(Debug, Clone)]
pub(super) struct Fault {
    pub(super) kind: FaultKind,
    pub(super) target: String,
    pub(super) start: f64,
    /// When it was fully in effect: the kill sent, every firewall rule in (`iptables` takes a
    /// while on a loaded machine). A connection begun before this was in flight at the fault.
    pub(super) in_effect: f64,
    pub(super) end: f64,
}

/// How long after a fault ends its effects may still end a connection: a killed or silent
/// server is noticed in ~2.5 s (the idle timeout), a reset arrives a moment later.
pub(super) const NOTICE: f64 = 6.0;

/// Whether fault `f` may have failed a connection of `kind` that ran from `from` to `to`.
///
/// The rules are the issue's: a new connection (short or bulk) fails only when it was in flight
/// on what the fault took away. One that begins after a server died, went silent or lost UDP is
/// carried by another tunnel, or waits for the next (`--reconnect-grace`), so its failure is
/// tether's. Long-lived connections and reverse CONNECTs live through the fault's window: a
/// watch outlives many faults and only the last can end it (its reset time is judged apart,
/// see [`resets_after_death`]); a CONNECT goes through the one server it asked, as
/// kube-apiserver asks its own, and that server's drain or restart ends it.
pub(super) fn may_fail(f: &Fault, kind: &str, from: f64, to: f64) -> bool {
    let new_connection = matches!(kind, "short" | "bulk");
    let in_flight_at = |t: f64, slack: f64| from <= t + slack && to >= t - slack;
    let in_window = f.start <= to && f.end + NOTICE >= from;
    match f.kind {
        // The agent itself went away: what it carried, and what was refused while it was down.
        FaultKind::RestartAgent => in_window,
        // The upstream's closing listener resets what it had queued, as a dying apiserver
        // would: connections in flight at that instant. Later ones go to another upstream.
        FaultKind::StopUpstream => in_flight_at(f.start, 0.5),
        FaultKind::KillServer | FaultKind::DropPackets | FaultKind::BlockUdp => {
            if new_connection {
                // Begun before the fault was in full effect, ended after it began.
                from <= f.in_effect && to >= f.start
            } else {
                in_window
            }
        }
        // What outlasts the drain timeout is closed: a long-lived connection, or, on a slow
        // link, a bulk one that takes longer than the timeout. Nothing quicker fails.
        FaultKind::DrainServer | FaultKind::RestartAllServers => {
            in_window && (!new_connection || to - from > DRAIN.as_secs_f64())
        }
        // Certificate reloads, NAT rebindings and the link's blackouts (up to the tolerance)
        // must fail nothing: a blackout only delays.
        FaultKind::LinkBlackout
        | FaultKind::LinkRebinding
        | FaultKind::RebindNat
        | FaultKind::ReloadCertificate => false,
        _ => false,
    }
}

/// Whether a fault aimed at one agent (a restart) hit this connection's agent: a restart of
/// one node explains nothing on another.
pub(super) fn aimed_at(f: &Fault, o: &Outcome) -> bool {
    f.kind != FaultKind::RestartAgent || f.target == format!("agent-{}", o.agent)
}

/// The fault that explains a failed connection, if any.
pub(super) fn explanation<'a>(faults: &'a [Fault], o: &Outcome) -> Option<&'a Fault> {
    faults
        .iter()
        .find(|f| may_fail(f, o.kind, o.start, o.end) && aimed_at(f, o))
}

/// A connection's end.
#[derive(Debug, Clone)]
pub(super) struct Outcome {
    pub(super) kind: &'static str,
    /// Seconds since the run began, at the connection's start and end.
    pub(super) start: f64,
    pub(super) end: f64,
    pub(super) bytes: u64,
    /// None: checked and whole. Some: why it failed.
    pub(super) failure: Option<String>,
    /// Bytes came back different: never explained by a fault.
    pub(super) corrupt: bool,
    pub(super) agent: usize,
}

#[derive(Default)]
pub(super) struct Record {
    pub(super) faults: Vec<Fault>,
    pub(super) outcomes: Vec<Outcome>,
    pub(super) samples: Vec<Sample>,
    /// Certificate renewals by agent process.
    pub(super) renewals: BTreeMap<u32, u64>,
    /// Each renewal as the sampler saw it: (seconds since the run began, agent). Seen up to a
    /// sampling period ([`SAMPLE_EVERY`]) after it happened.
    pub(super) renewed: Vec<(f64, usize)>,
    /// Nodes revoked during the run: (seconds since the run began, when the command returned;
    /// node).
    pub(super) revocations: Vec<(f64, String)>,
    /// A revoked node seen where it must not be: (when, node, where).
    pub(super) after_revocation: Vec<(f64, String, String)>,
}

/// Whether a long-lived connection was closed because it outlived two renewals of its node's
/// key, which is by design: its tunnel keeps the key it was dialed with, a server accepts a key
/// only until the renewal after the one that replaced it (see docs/security.md), and a TCP
/// connection cannot move to another tunnel. With the soak's 300 s certificates that is a
/// watch of 100 to 200 s; with the default year-long ones, months. It ended, reset, when a
/// renewal of its agent was seen (within a sampling period and the second the servers take to
/// act on the records), and another renewal of that agent was seen after it began.
pub(super) fn outlived_its_key(rec: &Record, o: &Outcome) -> bool {
    let lag = SAMPLE_EVERY.as_secs_f64() + 1.0;
    let of_agent = || {
        rec.renewed
            .iter()
            .filter(|(_, a)| *a == o.agent)
            .map(|(t, _)| *t)
    };
    o.kind == "long"
        && o.failure.is_some()
        && of_agent().any(|second| {
            o.end >= second - lag
                && o.end <= second + 2.0
                && of_agent().any(|first| first > o.start && first < second)
        })
}

/// How soon after its server died or went silent a long-lived connection must be reset: the
/// agent's idle timeout (~2.5 s), the trickle's pace (0.5 s) and room for a loaded machine.
pub(super) const RESET_BOUND: f64 = 6.0;

/// Long-lived connections that a server's death or silence ended: (connection, seconds from
/// the fault, or from the connection's start if later, to its reset). The fault is the last
/// to begin before the connection ended, and only if it was a death or a silence: a watch
/// outlives many faults, and only the last can have ended it.
pub(super) fn resets_after_death(rec: &Record) -> Vec<(&Outcome, f64)> {
    let dying = [FaultKind::KillServer, FaultKind::DropPackets];
    rec.outcomes
        .iter()
        .filter(|o| o.kind == "long" && o.failure.is_some() && !o.corrupt)
        .filter(|o| !outlived_its_key(rec, o))
        .filter_map(|o| {
            let f = rec
                .faults
                .iter()
                .filter(|f| f.start <= o.end)
                .max_by(|a, b| a.start.total_cmp(&b.start))?;
            let related = dying.contains(&f.kind) && f.end + RESET_BOUND >= o.start;
            related.then(|| (o, o.end - told_apart(&rec.faults, f.start.max(o.start))))
        })
        .collect()
}

/// How long an agent takes to call a server dead once the others answer (the bound).
pub(super) const VERDICT: f64 = 3.0;

/// When a server that died or went silent at `t` can first be told from a dead link: while
/// the link is dark every server is silent, and the agent holds its streams (up to the
/// blackout tolerance). So `t`, or the end of a link blackout under way before the verdict was
/// due. Without `--link` there are none and it is `t`.
pub(super) fn told_apart(faults: &[Fault], mut t: f64) -> f64 {
    loop {
        let later = faults
            .iter()
            .filter(|f| f.kind == FaultKind::LinkBlackout && f.start <= t + VERDICT && f.end > t)
            .map(|f| f.end)
            .fold(t, f64::max);
        if later <= t {
            return t;
        }
        t = later;
    }
}

/// How soon every server must have closed a revoked node's tunnels: a server applies a
/// revocation within a second (tests/tests/etcd.rs), or within two watch checks (4 s) when its
/// watch went silent, as it does after each `cut server from etcd`; and a loaded machine takes
/// a little more.
pub(super) const REVOKE_BOUND: f64 = 6.0;

/// Each revocation: (when, node, seconds until it was last seen on a server or renewing, or
/// zero if never after the command returned).
pub(super) fn revocation_times(rec: &Record) -> Vec<(f64, &str, f64)> {
    rec.revocations
        .iter()
        .map(|(at, node)| {
            let last = rec
                .after_revocation
                .iter()
                .filter(|(t, n, _)| n == node && t >= at)
                .map(|(t, _, _)| t - at)
                .fold(0.0, f64::max);
            (*at, node.as_str(), last)
        })
        .collect()
}

/// Revocations that did not hold: a revoked node still on a server, or renewing, after
/// [`REVOKE_BOUND`].
pub(super) fn revocations_broken(rec: &Record) -> Vec<String> {
    rec.revocations
        .iter()
        .filter_map(|(at, node)| {
            let late: Vec<&(f64, String, String)> = rec
                .after_revocation
                .iter()
                .filter(|(t, n, _)| n == node && *t > at + REVOKE_BOUND)
                .collect();
            let (t, _, what) = late.first()?;
            Some(format!(
                "{node}, revoked at {at:.1} s, was still {what} at {t:.1} s ({} sightings after the {REVOKE_BOUND} s bound, the last at {:.1} s)",
                late.len(),
                late.last().map(|l| l.0).unwrap_or(*t)
            ))
        })
        .collect()
}

pub(super) fn judge_run(rec: &Record, s: &Settings, close_wait: usize) -> Vec<String> {
    let mut v = revocations_broken(rec);
    for (o, took) in resets_after_death(rec) {
        if took > RESET_BOUND {
            v.push(format!(
                "long connection {:.1}-{:.1} s through agent-{} was reset {took:.1} s after its server died or went silent (bound {RESET_BOUND} s)",
                o.start, o.end, o.agent
            ));
        }
    }
    for o in &rec.outcomes {
        if o.corrupt {
            v.push(format!(
                "{} connection at {:.1} s: corrupted ({})",
                o.kind,
                o.start,
                o.failure.as_deref().unwrap_or("")
            ));
            continue;
        }
        let Some(why) = &o.failure else { continue };
        if explanation(&rec.faults, o).is_none() && !outlived_its_key(rec, o) {
            v.push(format!(
                "{} connection {:.1}-{:.1} s through agent-{} failed with no fault to explain it: {why}",
                o.kind, o.start, o.end, o.agent
            ));
        }
    }
    if rec.outcomes.iter().filter(|o| o.failure.is_none()).count() == 0 {
        v.push("no connection succeeded".into());
    }
    if close_wait > 0 {
        v.push(format!(
            "{close_wait} sockets left in CLOSE_WAIT after the load"
        ));
    }
    // Memory and files flat after warm-up, per process instance that lived long enough.
    let warm = s.warmup.as_secs_f64();
    for ((name, pid), samples) in &instances(&rec.samples) {
        let (Some(first), Some(last)) = (samples.first(), samples.last()) else {
            continue;
        };
        let Some(base) = samples.iter().find(|x| x.t >= first.t + warm) else {
            continue;
        };
        // The second half of the instance's life after warm-up.
        let late: Vec<&&Sample> = samples
            .iter()
            .filter(|x| x.t >= base.t + (last.t - base.t) / 2.0)
            .collect();
        let max_rss = late.iter().map(|x| x.rss_kib).max().unwrap_or(0);
        let max_fds = late.iter().map(|x| x.fds).max().unwrap_or(0);
        // Tolerance: half again the warm RSS plus 32 MiB (allocator arenas and windows fill
        // and empty with the load), and 64 files (connections in flight).
        if max_rss > base.rss_kib * 3 / 2 + 32 * 1024 {
            v.push(format!(
                "{name} (pid {pid}) grew from {} MiB after warm-up to {} MiB",
                base.rss_kib >> 10,
                max_rss >> 10
            ));
        }
        if max_fds > base.fds + 64 {
            v.push(format!(
                "{name} (pid {pid}) open files grew from {} to {max_fds}",
                base.fds
            ));
        }
    }
    v
}
