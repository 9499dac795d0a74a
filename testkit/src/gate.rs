//! A gate: a TCP relay on loopback in front of one or more services, that a test or the soak
//! can close in the ways a network fails, to see what a tether server does when only its own
//! way to etcd (or to anything) breaks while everything else carries on.
//!
//! - [`Gate::cut`]: a black hole, not a refusal. The connections open go silent (their sockets
//!   held open, nothing relayed either way, never closed), and new ones are accepted and held
//!   the same: what a partition, a firewall that loses its state or a host that loses power
//!   look like from the client. No reset, no answer.
//! - [`Gate::refuse`]: every connection open is closed, and new ones are closed at once: a
//!   service that went away cleanly.
//! - [`Gate::silence`]: the connections open now go silent; new ones go through (a NAT that
//!   lost the state of the connections it had).
//! - [`Gate::heal`]: new connections go through again; the silent ones stay silent, as a
//!   connection whose state a firewall lost does, so a client must notice for itself that its
//!   connection went dead.
//!
//! Threads and blocking sockets, each relay direction checking the gate every 200 ms.

use crate::KitError;
use std::collections::VecDeque;
use std::io::{ErrorKind, Read, Write};
use std::net::{Shutdown, SocketAddr, TcpListener, TcpStream};
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicU8, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::Duration;

/// Most silent connections a gate holds; beyond it the oldest are closed (a bound on the
/// descriptors a long soak holds: a server makes a few connections to etcd a second at most).
const HELD_MAX: usize = 512;
/// How often a relay direction looks at the gate while nothing comes.
const CHECK: Duration = Duration::from_millis(200);

const OPEN: u8 = 0;
const CUT: u8 = 1;
const REFUSE: u8 = 2;

struct Shared {
    mode: AtomicU8,
    /// Bumped by `silence`: a connection that started before the bump goes silent.
    silenced: AtomicU64,
    /// The gate was dropped: the accept loops end.
    stopped: AtomicBool,
    /// The connections being relayed (both sockets), to close on `refuse`.
    live: Mutex<Vec<(u64, TcpStream, TcpStream)>>,
    /// Silent sockets, held open.
    held: Mutex<VecDeque<TcpStream>>,
    next_id: AtomicU64,
}

/// Locks `m`, taking the data of a lock a panicking thread left poisoned.
fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|p| p.into_inner())
}

impl Shared {
    fn hold(&self, streams: impl IntoIterator<Item = TcpStream>) {
        let mut h = lock(&self.held);
        h.extend(streams);
        while h.len() > HELD_MAX {
            h.pop_front();
        }
    }

    /// Whether a connection that started at silence generation `gen` must stop relaying.
    fn quiet(&self, gen: u64) -> bool {
        self.mode.load(Ordering::SeqCst) == CUT || self.silenced.load(Ordering::SeqCst) != gen
    }
}

/// A relay in front of one or more services (see the module's doc).
pub struct Gate {
    /// Where to connect to reach each target, in the order given.
    pub addrs: Vec<SocketAddr>,
    shared: Arc<Shared>,
}

impl Gate {
    /// A gate in front of each of `targets`, open.
    pub fn start(targets: &[SocketAddr]) -> Result<Gate, KitError> {
        let shared = Arc::new(Shared {
            mode: AtomicU8::new(OPEN),
            silenced: AtomicU64::new(0),
            stopped: AtomicBool::new(false),
            live: Mutex::default(),
            held: Mutex::default(),
            next_id: AtomicU64::new(0),
        });
        let mut addrs = Vec::new();
        for &target in targets {
            let listener =
                TcpListener::bind("127.0.0.1:0").map_err(KitError::io("bind the gate"))?;
            addrs.push(
                listener
                    .local_addr()
                    .map_err(KitError::io("the gate's address"))?,
            );
            let shared = shared.clone();
            std::thread::Builder::new()
                .name("gate".into())
                .spawn(move || accept(listener, target, shared))
                .map_err(KitError::io("start the gate"))?;
        }
        Ok(Gate { addrs, shared })
    }

    /// The address in front of the first target.
    pub fn addr(&self) -> SocketAddr {
        self.addrs[0]
    }

    /// A black hole: everything goes silent, and new connections are held silent too.
    pub fn cut(&self) {
        self.shared.mode.store(CUT, Ordering::SeqCst);
    }

    /// Every connection closed (the silent ones too), and new ones closed at once.
    pub fn refuse(&self) {
        self.shared.mode.store(REFUSE, Ordering::SeqCst);
        for (_, a, b) in lock(&self.shared.live).drain(..) {
            let _ = a.shutdown(Shutdown::Both);
            let _ = b.shutdown(Shutdown::Both);
        }
        for s in lock(&self.shared.held).drain(..) {
            let _ = s.shutdown(Shutdown::Both);
        }
    }

    /// The connections open now go silent; new ones go through.
    pub fn silence(&self) {
        self.shared.silenced.fetch_add(1, Ordering::SeqCst);
    }

    /// New connections go through again.
    pub fn heal(&self) {
        self.shared.mode.store(OPEN, Ordering::SeqCst);
    }
}

impl Drop for Gate {
    fn drop(&mut self) {
        self.shared.stopped.store(true, Ordering::SeqCst);
        self.refuse();
        // Wake the accept loops so that they see the flag and drop their listeners.
        for a in &self.addrs {
            let _ = TcpStream::connect_timeout(a, Duration::from_millis(100));
        }
    }
}

fn accept(listener: TcpListener, target: SocketAddr, shared: Arc<Shared>) {
    for c in listener.incoming() {
        if shared.stopped.load(Ordering::SeqCst) {
            return;
        }
        let Ok(c) = c else {
            std::thread::sleep(Duration::from_millis(10));
            continue;
        };
        match shared.mode.load(Ordering::SeqCst) {
            CUT => {
                shared.hold([c]);
                continue;
            }
            REFUSE => continue,
            _ => {}
        }
        let shared = shared.clone();
        let _ = std::thread::Builder::new()
            .name("gate-relay".into())
            .spawn(move || {
                if let Ok(out) = TcpStream::connect_timeout(&target, Duration::from_secs(1)) {
                    relay(c, out, &shared);
                }
            });
    }
}

/// Relays both ways until either side ends, the gate refuses (both closed), or the connection
/// goes silent (both held).
fn relay(a: TcpStream, b: TcpStream, shared: &Arc<Shared>) {
    let gen = shared.silenced.load(Ordering::SeqCst);
    let id = shared.next_id.fetch_add(1, Ordering::SeqCst);
    let (Ok(a2), Ok(b2), Ok(a3), Ok(b3)) =
        (a.try_clone(), b.try_clone(), a.try_clone(), b.try_clone())
    else {
        return;
    };
    lock(&shared.live).push((id, a3, b3));
    let back_shared = shared.clone();
    let back = std::thread::Builder::new()
        .name("gate-relay".into())
        .spawn(move || pump(b2, a2, gen, &back_shared));
    pump(a, b, gen, shared);
    if let Ok(back) = back {
        let _ = back.join();
    }
    lock(&shared.live).retain(|(i, _, _)| *i != id);
}

/// Copies `from` to `to`, looking at the gate between reads; passes an end on as a half-close.
fn pump(mut from: TcpStream, mut to: TcpStream, gen: u64, shared: &Shared) {
    if from.set_read_timeout(Some(CHECK)).is_err() {
        return;
    }
    let mut buf = vec![0u8; 64 * 1024];
    loop {
        if shared.quiet(gen) {
            shared.hold([from, to]);
            return;
        }
        match from.read(&mut buf) {
            Ok(0) => {
                let _ = to.shutdown(Shutdown::Write);
                return;
            }
            Ok(n) => {
                if shared.quiet(gen) {
                    continue;
                }
                if to.write_all(&buf[..n]).is_err() {
                    let _ = from.shutdown(Shutdown::Both);
                    return;
                }
            }
            Err(e) if matches!(e.kind(), ErrorKind::WouldBlock | ErrorKind::TimedOut) => {}
            Err(_) => {
                let _ = to.shutdown(Shutdown::Both);
                return;
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::upstream::Echo;

    fn echoes(c: &mut TcpStream) -> bool {
        let _ = c.set_read_timeout(Some(Duration::from_millis(700)));
        let mut b = [0u8; 1];
        c.write_all(b"x").is_ok() && matches!(c.read(&mut b), Ok(1))
    }

    #[test]
    fn a_gate_relays_cuts_refuses_silences_and_heals() {
        let e = Echo::start().expect("echo");
        let g = Gate::start(&[e.addr]).expect("gate");
        let mut open = TcpStream::connect(g.addr()).expect("connect");
        assert!(echoes(&mut open));
        // Silenced: the open connection gets nothing back; a new one goes through.
        g.silence();
        assert!(!echoes(&mut open));
        let mut fresh = TcpStream::connect(g.addr()).expect("connect");
        assert!(echoes(&mut fresh));
        // Cut: a black hole, for the open ones and the new ones.
        g.cut();
        assert!(!echoes(&mut fresh));
        let mut held = TcpStream::connect(g.addr()).expect("accepted, and held");
        assert!(!echoes(&mut held));
        // Refused: closed, now and at once.
        g.refuse();
        let mut closed = TcpStream::connect(g.addr()).expect("accepted, then closed");
        let _ = closed.set_read_timeout(Some(Duration::from_secs(5)));
        let _ = closed.write_all(b"x");
        assert!(!matches!(closed.read(&mut [0u8; 1]), Ok(1)));
        g.heal();
        let mut healed = TcpStream::connect(g.addr()).expect("connect");
        assert!(echoes(&mut healed));
    }
}
