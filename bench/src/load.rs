//! The upstream (an echo server and a bulk sink) and the load clients, on plain blocking
//! sockets and threads: the same code measures the direct path and every tunnel, so whatever
//! it costs is on both sides of every ratio.

use anyhow::{bail, Context, Result};
use socket2::{Domain, Socket, Type};
use std::io::{Read, Write};
use std::net::{Shutdown, SocketAddr, TcpListener, TcpStream};
use std::thread;
use std::time::{Duration, Instant};
use tether_testkit::upstream;

/// Request and response size of the round-trip and connection-rate tests.
pub const MESSAGE: usize = 64;
/// What a bulk client writes per call.
const BULK_CHUNK: usize = 256 * 1024;
/// Longest a single blocking socket call may take before a run counts it as an error.
const IO_TIMEOUT: Duration = Duration::from_secs(10);

/// Binds a loopback listener with a deep backlog (connection bursts of the rate test).
pub fn listen() -> Result<TcpListener> {
    Ok(upstream::listen(upstream::loopback0())?)
}

pub use tether_testkit::free_port;

/// The upstream every path leads to: an echo server and a sink that answers the byte count
/// (the kit's, as the tests use).
pub struct Upstream {
    pub echo: SocketAddr,
    pub sink: SocketAddr,
    _servers: (upstream::Echo, upstream::Sink),
}

impl Upstream {
    pub fn start() -> Result<Upstream> {
        let lo = upstream::loopback0();
        Self::start_at(lo, lo)
    }

    /// The upstream on given addresses (the WAN lab's listens on every address).
    pub fn start_at(echo: SocketAddr, sink: SocketAddr) -> Result<Upstream> {
        let e = upstream::Echo::start_on(echo)?;
        let s = upstream::Sink::start_on(sink, upstream::SinkAnswer::Count)?;
        Ok(Upstream {
            echo: e.addr,
            sink: s.addr,
            _servers: (e, s),
        })
    }
}

fn connect(addr: SocketAddr) -> std::io::Result<TcpStream> {
    connect_with(addr, None)
}

/// A connection whose congestion control is `cc` (a name the kernel knows: cubic, bbr), or the
/// system's default.
fn connect_with(addr: SocketAddr, cc: Option<&str>) -> std::io::Result<TcpStream> {
    let s = Socket::new(Domain::for_address(addr), Type::STREAM, None)?;
    if let Some(cc) = cc {
        s.set_tcp_congestion(cc.as_bytes())?;
    }
    s.connect_timeout(&addr.into(), IO_TIMEOUT)?;
    let c: TcpStream = s.into();
    c.set_nodelay(true)?;
    c.set_read_timeout(Some(IO_TIMEOUT))?;
    c.set_write_timeout(Some(IO_TIMEOUT))?;
    Ok(c)
}

fn exchange(
    c: &mut TcpStream,
    msg: &[u8; MESSAGE],
    back: &mut [u8; MESSAGE],
) -> std::io::Result<()> {
    c.write_all(msg)?;
    c.read_exact(back)
}

/// Round trips of one 64-byte message on one connection, after `warmup` unrecorded ones; the
/// time of each in nanoseconds.
pub fn rr(addr: SocketAddr, count: usize, warmup: usize) -> Result<Vec<u64>> {
    let mut c = connect(addr).with_context(|| format!("connect {addr}"))?;
    let msg = [7u8; MESSAGE];
    let mut back = [0u8; MESSAGE];
    let mut times = Vec::with_capacity(count);
    for i in 0..warmup + count {
        let t = Instant::now();
        exchange(&mut c, &msg, &mut back).with_context(|| format!("round trip {i}"))?;
        if i >= warmup {
            times.push(t.elapsed().as_nanos() as u64);
        }
    }
    if back != msg {
        bail!("the echo came back changed");
    }
    Ok(times)
}

/// What a connection-rate run counted.
pub struct Crr {
    pub connections: u64,
    pub errors: u64,
    pub secs: f64,
    /// Median time of one connect, exchange and close, in nanoseconds.
    pub p50_ns: u64,
}

/// Connect, one 64-byte exchange, close, again and again for `secs`.
pub fn crr(addr: SocketAddr, secs: f64) -> Crr {
    let start = Instant::now();
    let end = start + Duration::from_secs_f64(secs);
    let msg = [9u8; MESSAGE];
    let mut back = [0u8; MESSAGE];
    let (mut connections, mut errors) = (0u64, 0u64);
    let mut times = Vec::new();
    while Instant::now() < end {
        let t = Instant::now();
        let ok = connect(addr).and_then(|mut c| exchange(&mut c, &msg, &mut back));
        match ok {
            Ok(()) => {
                connections += 1;
                times.push(t.elapsed().as_nanos() as u64);
            }
            Err(_) => {
                errors += 1;
                if errors > 1000 {
                    break;
                }
            }
        }
    }
    times.sort_unstable();
    Crr {
        connections,
        errors,
        secs: start.elapsed().as_secs_f64(),
        p50_ns: percentile(&times, 50.0),
    }
}

/// Bytes that arrived at the sink and the seconds they took, over `streams` connections
/// each writing for `secs`.
pub fn bulk(addr: SocketAddr, streams: usize, secs: f64) -> Result<(u64, f64)> {
    bulk_with(addr, streams, secs, None)
}

/// [`bulk`] with the writers' congestion control set to `cc`.
pub fn bulk_with(
    addr: SocketAddr,
    streams: usize,
    secs: f64,
    cc: Option<&'static str>,
) -> Result<(u64, f64)> {
    let start = Instant::now();
    let end = start + Duration::from_secs_f64(secs);
    let workers: Vec<_> = (0..streams)
        .map(|_| {
            thread::spawn(move || -> Result<u64> {
                let mut c = connect_with(addr, cc).with_context(|| format!("connect {addr}"))?;
                let chunk = vec![0x5au8; BULK_CHUNK];
                while Instant::now() < end {
                    c.write_all(&chunk).context("write")?;
                }
                c.shutdown(Shutdown::Write).context("shutdown")?;
                let mut count = [0u8; 8];
                c.set_read_timeout(Some(Duration::from_secs(60)))?;
                c.read_exact(&mut count).context("the sink's count")?;
                Ok(u64::from_be_bytes(count))
            })
        })
        .collect();
    let mut total = 0;
    for w in workers {
        match w.join() {
            Ok(r) => total += r?,
            Err(_) => bail!("a bulk client thread panicked"),
        }
    }
    Ok((total, start.elapsed().as_secs_f64()))
}

/// Opens `n` connections, each proven end to end with one exchange, and returns them to be
/// held idle; `failed` counts the ones that could not be opened.
pub fn hold(addr: SocketAddr, n: usize) -> (Vec<TcpStream>, usize) {
    let msg = [3u8; MESSAGE];
    let mut back = [0u8; MESSAGE];
    let mut held = Vec::with_capacity(n);
    let mut failed = 0;
    for _ in 0..n {
        match connect(addr).and_then(|mut c| exchange(&mut c, &msg, &mut back).map(|_| c)) {
            Ok(c) => held.push(c),
            Err(_) => failed += 1,
        }
    }
    (held, failed)
}

/// One successful exchange on a new connection within `timeout`, or why not.
pub fn probe(addr: SocketAddr, timeout: Duration) -> std::io::Result<()> {
    let mut c = TcpStream::connect_timeout(&addr, timeout)?;
    c.set_nodelay(true)?;
    c.set_read_timeout(Some(timeout))?;
    let mut back = [0u8; MESSAGE];
    exchange(&mut c, &[1u8; MESSAGE], &mut back)
}

/// The `p`th percentile (0 to 100) of sorted values; 0 for none.
pub fn percentile(sorted: &[u64], p: f64) -> u64 {
    if sorted.is_empty() {
        return 0;
    }
    let rank = ((p / 100.0) * (sorted.len() - 1) as f64).round() as usize;
    sorted[rank.min(sorted.len() - 1)]
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_clients_work_against_the_upstream() -> Result<()> {
        let up = Upstream::start()?;
        let mut t = rr(up.echo, 100, 10)?;
        t.sort_unstable();
        assert_eq!(t.len(), 100);
        assert!(percentile(&t, 50.0) <= percentile(&t, 99.0));
        let c = crr(up.echo, 0.2);
        assert!(c.connections > 0 && c.errors == 0);
        let (bytes, secs) = bulk(up.sink, 2, 0.2)?;
        assert!(bytes > 0 && secs > 0.0);
        let (held, failed) = hold(up.echo, 20);
        assert_eq!((held.len(), failed), (20, 0));
        Ok(())
    }

    #[test]
    fn percentiles() {
        let v: Vec<u64> = (1..=100).collect();
        assert_eq!(percentile(&v, 50.0), 51);
        assert_eq!(percentile(&v, 99.0), 99);
        assert_eq!(percentile(&[], 50.0), 0);
    }
}
