//! Where an egress CONNECT goes, as a state machine of candidates, answers and time without
//! I/O: the egress proxy (`egress::route`) offers it the node's tunnels here and the
//! peer links, asks through what it returns, and tells it the answers.
//!
//! The rule, in order:
//!
//! 1. **The node's tunnels here**, newest first, each at most once: a tunnel that fails as a
//!    tunnel (closed under the open) is left for the next; an answer from the agent (it refused
//!    the target, could not reach it, or let the time run out) is the verdict.
//!    A tunnel whose certificate the node records no longer admit (a revoked node, a forgotten
//!    name, a key that no longer owns the name) is never asked, even in the second or so before
//!    the records' watcher closes it: **a revoked node is never routed**.
//! 2. **The peers**, when the node has no tunnel here left to ask: each that answers "not
//!    mine" or whose link fails is left for the next; any other answer is the verdict. Peers
//!    asked on another server's behalf (one hop) ask no peers in turn.
//! 3. **A wait**, when the node is gone from here for a moment (see
//!    [`wait_until`]: a tunnel failed under the request, the node left less
//!    than the grace ago, or this server just started): once, at most the grace, then the rule
//!    runs again from 1 with what is there by then. Anything else is answered at once.

use std::time::Instant;
use tether_link::RECONNECT_GRACE;
use tether_proto::StatusCode;
use tether_transport::open::OpenError;

/// A tunnel of the node here, as the driver offers it.
#[derive(Debug, Clone)]
pub struct Local<T> {
    /// What the driver asks through.
    pub via: T,
    /// The tunnel's id: a tunnel that failed is not asked again after the wait.
    pub id: usize,
    /// Whether the node records admit the tunnel's certificate now.
    pub admitted: bool,
}

/// How an ask ended, short of a stream.
#[derive(Debug, Clone)]
pub enum Answer {
    /// The tunnel or the peer link failed as a tunnel: ask the next.
    TunnelFailed(Refusal),
    /// A peer does not have the node: ask the next.
    NotThere,
    /// The agent's (or the peer's) verdict: it stands.
    Verdict(Refusal),
}

/// What the driver does next.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Step<T> {
    /// Ask through this tunnel (`hops` 0) or peer link (`hops` 1), then report with
    /// [`Route::answered`] (or stop, with the stream, when it answers yes).
    Ask { via: T, hops: u8 },
    /// Wait for a tunnel of the node until then, then [`Route::offer`] what is there.
    Wait { until: Instant },
    /// Answer the client with this refusal.
    Refuse(Refusal),
}

/// Whom a route may ask.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Scope {
    /// A client's CONNECT here: tunnels here, then peers, and a wait.
    Client,
    /// A peer's request on its client's behalf: tunnels here only, answered at once (the
    /// asking server does the waiting).
    ForPeer,
}

/// The history the wait rule reads: when the node left this server, and when it started.
#[derive(Debug, Clone, Copy)]
pub struct History {
    pub left_at: Option<Instant>,
    pub started: Instant,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Phase {
    Local,
    Peers,
    /// A round ended without a stream.
    Missed,
    Waiting,
    Done,
}

/// One CONNECT's route (see the module's doc).
#[derive(Debug, Clone)]
pub struct Route<T> {
    node: String,
    scope: Scope,
    local: Vec<Local<T>>,
    peers: Vec<T>,
    phase: Phase,
    /// Tunnels here that failed as tunnels.
    tried: Vec<usize>,
    /// Whether a tunnel here was asked in this round.
    asked_here: bool,
    /// The last tunnel failure, when every tunnel asked failed.
    last: Option<Refusal>,
    waited: bool,
}

impl<T: Clone> Route<T> {
    pub fn new(node: &str, scope: Scope) -> Self {
        Route {
            node: node.to_string(),
            scope,
            local: Vec::new(),
            peers: Vec::new(),
            phase: Phase::Local,
            tried: Vec::new(),
            asked_here: false,
            last: None,
            waited: false,
        }
    }

    /// The node's tunnels here (newest first) and the peer links (in the order to ask them),
    /// at the start and after the wait: a new round begins.
    pub fn offer(&mut self, local: Vec<Local<T>>, peers: Vec<T>) {
        self.local = local;
        self.local.reverse();
        self.peers = peers;
        self.peers.reverse();
        self.asked_here = false;
        if self.phase != Phase::Done {
            self.phase = Phase::Local;
            // The last round's failures are history: a node gone for good reads as gone.
            self.last = None;
        }
    }

    /// The tunnels here that failed as tunnels.
    pub fn tried(&self) -> &[usize] {
        &self.tried
    }

    /// The next step at `now`.
    pub fn next(&mut self, now: Instant, history: History) -> Step<T> {
        loop {
            match self.phase {
                Phase::Local => match self.local.pop() {
                    Some(t) if !t.admitted || self.tried.contains(&t.id) => continue,
                    Some(t) => {
                        self.asked_here = true;
                        // Put back until answered, so that `answered` knows which it was.
                        self.local.push(t.clone());
                        return Step::Ask {
                            via: t.via,
                            hops: 0,
                        };
                    }
                    None if self.asked_here || self.scope == Scope::ForPeer => {
                        self.phase = Phase::Missed
                    }
                    None => self.phase = Phase::Peers,
                },
                Phase::Peers => match self.peers.last() {
                    Some(p) => {
                        return Step::Ask {
                            via: p.clone(),
                            hops: 1,
                        }
                    }
                    None => self.phase = Phase::Missed,
                },
                Phase::Missed => {
                    let failed_here = !self.tried.is_empty();
                    let until = wait_until(failed_here, history.left_at, history.started, now);
                    match until {
                        Some(until) if !self.waited && self.scope == Scope::Client => {
                            self.waited = true;
                            self.phase = Phase::Waiting;
                            return Step::Wait { until };
                        }
                        _ => {
                            self.phase = Phase::Done;
                            return Step::Refuse(self.miss());
                        }
                    }
                }
                // Until `offer` starts the next round: nothing new to say.
                Phase::Waiting | Phase::Done => return Step::Refuse(self.miss()),
            }
        }
    }

    /// The answer to the last [`Step::Ask`], short of a stream.
    pub fn answered(&mut self, answer: Answer) {
        let asked_local = self.phase == Phase::Local;
        let asked = if asked_local {
            self.local.pop().map(|t| t.id)
        } else {
            self.peers.pop();
            None
        };
        match answer {
            Answer::Verdict(refusal) => {
                self.phase = Phase::Done;
                self.last = Some(refusal);
            }
            Answer::TunnelFailed(refusal) if asked_local => {
                self.tried.extend(asked);
                self.last = Some(refusal);
            }
            Answer::TunnelFailed(_) | Answer::NotThere => {}
        }
    }

    /// The refusal a round without a stream comes to: the verdict, or the last tunnel's
    /// failure, or the node's absence.
    fn miss(&self) -> Refusal {
        if let Some(last) = &self.last {
            return last.clone();
        }
        let node = &self.node;
        Refusal::NoNode(match self.scope {
            Scope::ForPeer => format!("node {node} is not connected to this server"),
            Scope::Client => format!("node {node} is not connected to any server"),
        })
    }
}

/// Why a CONNECT is not carried. Each kind is mapped once to the HTTP status its client reads
/// ([`Refusal::http`]) and once to the wire status a peer asking on a client's behalf reads
/// ([`Refusal::wire`]), and back ([`Refusal::from_wire`]), so that a verdict keeps its meaning
/// across a hop. Before, refusals were `(u16, String)` mapped HTTP to wire to HTTP, and a
/// peer's `busy` reached kube-apiserver as 502, a contested address as 403.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum Refusal {
    /// The agent's policy does not allow the target: 403.
    #[error("{0}")]
    Forbidden(String),
    /// No node by that name is connected (here, or anywhere), or no node owns that address: 404.
    #[error("{0}")]
    NoNode(String),
    /// More than one node owns that address: 409, until an operator releases it.
    #[error("{0}")]
    Contested(String),
    /// A limit was reached, or the server is draining: 503, worth a retry.
    #[error("{0}")]
    Busy(String),
    /// The agent could not reach the target, or no tunnel carried the open: 502.
    #[error("{0}")]
    Unreachable(String),
    /// No answer in time: 504.
    #[error("{0}")]
    TimedOut(String),
}

impl Refusal {
    /// The HTTP status the egress client reads.
    pub fn http(&self) -> u16 {
        match self {
            Refusal::Forbidden(_) => 403,
            Refusal::NoNode(_) => 404,
            Refusal::Contested(_) => 409,
            Refusal::Busy(_) => 503,
            Refusal::Unreachable(_) => 502,
            Refusal::TimedOut(_) => 504,
        }
    }

    /// The status a peer that asked on a client's behalf reads.
    pub fn wire(&self) -> StatusCode {
        match self {
            Refusal::Forbidden(_) => StatusCode::RefusedByPolicy,
            Refusal::NoNode(_) => StatusCode::NoRoute,
            Refusal::Contested(_) => StatusCode::Contested,
            Refusal::Busy(_) => StatusCode::Busy,
            Refusal::Unreachable(_) => StatusCode::UpstreamUnreachable,
            Refusal::TimedOut(_) => StatusCode::Timeout,
        }
    }

    /// A refusal as an agent or a peer answered it.
    pub fn from_wire(code: StatusCode, message: String) -> Self {
        match code {
            StatusCode::RefusedByPolicy => Refusal::Forbidden(message),
            StatusCode::NoRoute => Refusal::NoNode(message),
            StatusCode::Contested => Refusal::Contested(message),
            StatusCode::Busy | StatusCode::Draining => Refusal::Busy(message),
            StatusCode::Timeout => Refusal::TimedOut(message),
            StatusCode::Ok
            | StatusCode::UpstreamUnreachable
            | StatusCode::UnknownService
            | StatusCode::BadRequest
            | StatusCode::Other(_) => Refusal::Unreachable(message),
        }
    }

    /// The refusal a failed open comes to.
    pub(crate) fn from_open(e: OpenError) -> Self {
        match e {
            OpenError::Refused { code, message } => Refusal::from_wire(code, message),
            OpenError::TimedOut(_) => Refusal::TimedOut(e.to_string()),
            OpenError::Tunnel(_) | OpenError::Protocol(_) | OpenError::Reset => {
                Refusal::Unreachable(e.to_string())
            }
        }
    }
}

/// Until when a CONNECT whose node has no tunnel here waits for one (the rule of [`route`]),
/// or `None` to answer at once: the grace after a tunnel of the node failed under the request
/// (`failed_here`), else after the node left this server, else, for a node never seen, after
/// this server started. Never past `now` and the grace: a request waits at most
/// [`RECONNECT_GRACE`].
pub fn wait_until(
    failed_here: bool,
    left_at: Option<Instant>,
    started: Instant,
    now: Instant,
) -> Option<Instant> {
    let since = if failed_here {
        now
    } else {
        left_at.unwrap_or(started)
    };
    let until = since + RECONNECT_GRACE;
    (until > now).then(|| until.min(now + RECONNECT_GRACE))
}

#[cfg(test)]
mod tests;
