//! The upstreams tests and the bench relay to: an echo server, and a sink that reads to the end
//! and answers what it got. Threads and blocking sockets (a thread per connection with a small
//! stack), so that what they cost is the same on the direct path and through every tunnel.

use crate::KitError;
use ring::digest::{Context, SHA256};
use socket2::{Domain, Socket, Type};
use std::io::{ErrorKind, Read, Write};
use std::net::{Shutdown, SocketAddr, TcpListener, TcpStream};
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::thread::JoinHandle;
use std::time::Duration;

/// Threads of a connection need little stack.
const SMALL_STACK: usize = 128 * 1024;

/// Binds a listener with a deep backlog (the bench's bursts of connections) and
/// `SO_REUSEADDR` (an upstream started again on its port).
pub fn listen(addr: SocketAddr) -> Result<TcpListener, KitError> {
    let what = format!("bind {addr}");
    let s = Socket::new(Domain::for_address(addr), Type::STREAM, None)
        .map_err(KitError::io(what.clone()))?;
    s.set_reuse_address(true)
        .map_err(KitError::io(what.clone()))?;
    s.bind(&addr.into()).map_err(KitError::io(what.clone()))?;
    s.listen(4096).map_err(KitError::io(what))?;
    Ok(s.into())
}

/// 127.0.0.1 port 0: a fresh port on loopback.
pub fn loopback0() -> SocketAddr {
    SocketAddr::from(([127, 0, 0, 1], 0))
}

/// How a server gets its listener, the first time and after each stop: on loopback, or inside
/// a network namespace (the soak's nodes), as the caller knows how.
pub type Bind = Arc<dyn Fn() -> std::io::Result<TcpListener> + Send + Sync>;

/// The accept thread that runs now, and how to stop it.
struct Running {
    stop: Arc<AtomicBool>,
    /// A handle on the listening socket, to wake a blocked accept: `shutdown` on a listening
    /// socket makes Linux return from `accept` with an error.
    waker: Socket,
    thread: JoinHandle<()>,
}

/// A listener's accept thread, serving each connection on a thread of its own; it can be
/// stopped (the listener closed) and started again on the same address.
struct Server {
    addr: SocketAddr,
    accepted: Arc<AtomicUsize>,
    conn: fn(TcpStream),
    bind: Bind,
    running: Mutex<Option<Running>>,
}

impl Server {
    fn start(bind: Bind, conn: fn(TcpStream)) -> Result<Server, KitError> {
        let l = bind().map_err(KitError::io("bind an upstream"))?;
        let addr = l.local_addr().map_err(KitError::io("listener address"))?;
        let s = Server {
            addr,
            accepted: Arc::default(),
            conn,
            bind,
            running: Mutex::new(None),
        };
        s.run(l)?;
        Ok(s)
    }

    fn running(&self) -> std::sync::MutexGuard<'_, Option<Running>> {
        self.running.lock().unwrap_or_else(|p| p.into_inner())
    }

    fn run(&self, l: TcpListener) -> Result<(), KitError> {
        let waker = Socket::from(l.try_clone().map_err(KitError::io("listener"))?);
        let stop = Arc::new(AtomicBool::new(false));
        let (count, stopped, conn) = (self.accepted.clone(), stop.clone(), self.conn);
        let thread = std::thread::Builder::new()
            .name("upstream".into())
            .spawn(move || loop {
                match l.accept() {
                    _ if stopped.load(Ordering::SeqCst) => return,
                    Ok((c, _)) => {
                        count.fetch_add(1, Ordering::Relaxed);
                        let _ = c.set_nodelay(true);
                        let _ = std::thread::Builder::new()
                            .stack_size(SMALL_STACK)
                            .spawn(move || conn(c));
                    }
                    // Out of descriptors, most likely: a moment for some to close.
                    Err(_) => std::thread::sleep(Duration::from_millis(10)),
                }
            })
            .map_err(KitError::io("start the upstream"))?;
        *self.running() = Some(Running {
            stop,
            waker,
            thread,
        });
        Ok(())
    }

    /// Stops accepting and closes the listener before it returns: the port refuses
    /// connections from then on. The connections accepted go on.
    fn stop(&self) {
        let Some(r) = self.running().take() else {
            return;
        };
        r.stop.store(true, Ordering::SeqCst);
        let _ = r.waker.shutdown(Shutdown::Both);
        let _ = r.thread.join();
    }

    /// Binds the listener again (on the same address, by the same [`Bind`]) and accepts.
    fn start_again(&self) -> Result<(), KitError> {
        if self.running().is_some() {
            return Ok(());
        }
        let l = (self.bind)().map_err(KitError::io(format!("bind {} again", self.addr)))?;
        self.run(l)
    }
}

impl Drop for Server {
    fn drop(&mut self) {
        self.stop();
    }
}

/// A [`Bind`] that binds `at` with [`listen`], then the same port again after each stop.
fn on(at: SocketAddr) -> Result<(TcpListener, Bind), KitError> {
    let first = listen(at)?;
    let addr = first
        .local_addr()
        .map_err(KitError::io("listener address"))?;
    let again: Bind = Arc::new(move || {
        listen(addr).map_err(|e| match e {
            KitError::Io { source, .. } => source,
            other => std::io::Error::other(other.to_string()),
        })
    });
    Ok((first, again))
}

/// A [`Bind`] that hands out `first`, then binds again with `again`.
fn first_then(first: TcpListener, again: Bind) -> Bind {
    let first = Mutex::new(Some(first));
    Arc::new(
        move || match first.lock().unwrap_or_else(|p| p.into_inner()).take() {
            Some(l) => Ok(l),
            None => again(),
        },
    )
}

/// An upstream that echoes every byte and half-closes when its client does.
pub struct Echo {
    pub addr: SocketAddr,
    server: Server,
}

impl Echo {
    /// An echo server on a fresh loopback port.
    pub fn start() -> Result<Echo, KitError> {
        Self::start_on(loopback0())
    }

    pub fn start_on(at: SocketAddr) -> Result<Echo, KitError> {
        let (first, again) = on(at)?;
        Self::start_with(first_then(first, again))
    }

    /// An echo server on the listener `bind` gives, and on the one it gives again after each
    /// [`Echo::stop`] (the soak's upstreams live in network namespaces).
    pub fn start_with(bind: Bind) -> Result<Echo, KitError> {
        let server = Server::start(bind, echo)?;
        Ok(Echo {
            addr: server.addr,
            server,
        })
    }

    /// Connections accepted so far.
    pub fn accepted(&self) -> usize {
        self.server.accepted.load(Ordering::Relaxed)
    }

    /// Stops accepting; the port refuses connections from then on (an apiserver going away).
    /// The connections open carry on.
    pub fn stop(&self) {
        self.server.stop();
    }

    /// Accepts again on the same port, after [`Echo::stop`].
    pub fn start_again(&self) -> Result<(), KitError> {
        self.server.start_again()
    }
}

fn echo(mut c: TcpStream) {
    let mut buf = vec![0u8; 64 * 1024];
    loop {
        match c.read(&mut buf) {
            Ok(0) => break,
            Ok(n) => {
                if c.write_all(&buf[..n]).is_err() {
                    return;
                }
            }
            Err(e) if e.kind() == ErrorKind::Interrupted => {}
            // A reset: nothing to half-close.
            Err(_) => return,
        }
    }
    let _ = c.shutdown(Shutdown::Write);
}

/// What a [`Sink`] answers at the end of its client's stream.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum SinkAnswer {
    /// The byte count, 8 bytes big-endian: the bench, which must not spend its CPU hashing.
    Count,
    /// `"<hex SHA-256> <count>"`: the tests, which check every byte arrived once and in order.
    Sha256,
}

/// An upstream that reads everything its client sends and, at the end of the stream, answers
/// (see [`SinkAnswer`]) and half-closes.
pub struct Sink {
    pub addr: SocketAddr,
    _server: Server,
}

impl Sink {
    pub fn start(answer: SinkAnswer) -> Result<Sink, KitError> {
        Self::start_on(loopback0(), answer)
    }

    pub fn start_on(at: SocketAddr, answer: SinkAnswer) -> Result<Sink, KitError> {
        let (first, again) = on(at)?;
        let bind = first_then(first, again);
        let server = match answer {
            SinkAnswer::Count => Server::start(bind, |c| sink(c, SinkAnswer::Count)),
            SinkAnswer::Sha256 => Server::start(bind, |c| sink(c, SinkAnswer::Sha256)),
        }?;
        Ok(Sink {
            addr: server.addr,
            _server: server,
        })
    }
}

fn sink(mut c: TcpStream, answer: SinkAnswer) {
    let mut buf = vec![0u8; 256 * 1024];
    let mut ctx = (answer == SinkAnswer::Sha256).then(|| Context::new(&SHA256));
    let mut total = 0u64;
    loop {
        match c.read(&mut buf) {
            Ok(0) => break,
            Ok(n) => {
                if let Some(ctx) = ctx.as_mut() {
                    ctx.update(&buf[..n]);
                }
                total += n as u64;
            }
            Err(e) if e.kind() == ErrorKind::Interrupted => {}
            Err(_) => return,
        }
    }
    let _ = match ctx {
        Some(ctx) => {
            c.write_all(format!("{} {total}", hex::encode(ctx.finish().as_ref())).as_bytes())
        }
        None => c.write_all(&total.to_be_bytes()),
    };
    let _ = c.shutdown(Shutdown::Write);
}

#[cfg(test)]
mod tests {
    use super::*;

    fn roundtrip(addr: SocketAddr, data: &[u8]) -> Vec<u8> {
        let mut c = TcpStream::connect(addr).expect("connect");
        c.write_all(data).expect("write");
        c.shutdown(Shutdown::Write).expect("half-close");
        let mut back = Vec::new();
        c.read_to_end(&mut back).expect("read");
        back
    }

    #[test]
    fn an_echo_stops_refusing_and_starts_again_on_its_port() {
        let e = Echo::start().expect("echo");
        assert_eq!(roundtrip(e.addr, b"one"), b"one");
        e.stop();
        let refused = TcpStream::connect(e.addr).map_err(|e| e.kind());
        assert_eq!(refused.err(), Some(ErrorKind::ConnectionRefused));
        e.start_again().expect("start again");
        assert_eq!(roundtrip(e.addr, b"two"), b"two");
        assert_eq!(e.accepted(), 2);
    }

    #[test]
    fn a_sink_answers_the_count_or_the_hash() {
        let count = Sink::start(SinkAnswer::Count).expect("sink");
        assert_eq!(roundtrip(count.addr, b"abc"), 3u64.to_be_bytes());
        let hash = Sink::start(SinkAnswer::Sha256).expect("sink");
        let answer = String::from_utf8(roundtrip(hash.addr, b"abc")).expect("text");
        assert_eq!(
            answer,
            "ba7816bf8f01cfea414140de5dae2223b00361a396177a9cb410ff61f20015ad 3"
        );
    }
}
