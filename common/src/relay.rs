//! Moves bytes between a TCP connection and a tunnel stream, in both directions at once.
//!
//! The relay keeps TCP's meaning intact across the tunnel:
//! - every byte arrives once and in order (the transport guarantees order; the relay never drops
//!   or duplicates a chunk);
//! - a half-close travels: end-of-file from the TCP side finishes the stream, and a finished
//!   stream shuts down the TCP write side, each direction on its own;
//! - a reset travels as a reset: a TCP reset resets the stream, and a reset (or stop) of the
//!   stream resets the TCP connection (`SO_LINGER` 0), never a clean end-of-file;
//! - memory is bounded: at most one chunk is in the relay's hands per direction, and flow control
//!   (TCP windows on one side, transport windows on the other) pushes back on a fast sender. An
//!   idle connection holds no buffer at all.
//! - a stream that ended cleanly counts as open until the far end acknowledged its last bytes,
//!   so that whoever closes the tunnel once its streams are done (a drain, a move to a renewed
//!   certificate) does not cut them short.

use crate::transport::{RecvHalf, SendHalf, Stream, StreamError};
use bytes::BytesMut;
use std::io;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;
use tether_proto::code;
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};
use tokio::net::tcp::OwnedReadHalf;
use tokio::net::TcpStream;

/// Largest chunk the relay reads at once.
pub const CHUNK: usize = 32 * 1024;
/// Most bytes gathered from a tunnel stream for one write to a socket.
const GATHER_BYTES: usize = 256 * 1024;

/// The longest a relay that ended cleanly waits for its last bytes to be acknowledged (see
/// [`SendHalf::delivered`]) before it counts the stream done: past the longest blackout a
/// tunnel is held through, which ends the wait sooner by losing the tunnel.
const DELIVERY_LIMIT: Duration = Duration::from_secs(120);

/// Byte counters a relay adds to as data moves (for example the process-wide totals and a
/// tunnel's own).
#[derive(Debug, Default)]
pub struct Meter {
    /// Bytes read from TCP and sent into the tunnel.
    pub to_tunnel: AtomicU64,
    /// Bytes received from the tunnel and written to TCP.
    pub from_tunnel: AtomicU64,
}

impl Meter {
    fn add_to_tunnel(meters: &[&Meter], n: u64) {
        for m in meters {
            m.to_tunnel.fetch_add(n, Ordering::Relaxed);
        }
    }

    fn add_from_tunnel(meters: &[&Meter], n: u64) {
        for m in meters {
            m.from_tunnel.fetch_add(n, Ordering::Relaxed);
        }
    }
}

/// How a relay ended.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Outcome {
    /// Both directions finished cleanly.
    Closed,
    /// The TCP side reset or failed; the stream was reset.
    LocalReset(String),
    /// The stream was reset, stopped or lost; the TCP side was reset.
    RemoteReset(String),
}

/// Totals of one relayed connection.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Summary {
    pub to_tunnel: u64,
    pub from_tunnel: u64,
    pub outcome: Outcome,
}

enum Abort {
    Local(String),
    Remote(String),
}

impl From<Abort> for Outcome {
    fn from(a: Abort) -> Self {
        match a {
            Abort::Local(e) => Outcome::LocalReset(e),
            Abort::Remote(e) => Outcome::RemoteReset(e),
        }
    }
}

/// Relays until both directions are done or one side resets.
pub async fn relay(tcp: TcpStream, stream: Stream, meters: &[&Meter]) -> Summary {
    let _ = tcp.set_nodelay(true);
    let (mut rd, mut wr) = tcp.into_split();
    let Stream { mut send, mut recv } = stream;
    let (up, down) = (AtomicU64::new(0), AtomicU64::new(0));
    let result = tokio::try_join!(
        tcp_to_tunnel(&mut rd, &mut send, meters, &up),
        tunnel_to_tcp(&mut recv, &mut wr, meters, &down),
    );
    let outcome = match result {
        Ok(_) => {
            send.delivered(DELIVERY_LIMIT).await;
            Outcome::Closed
        }
        Err(abort) => {
            send.reset(code::RESET).await;
            recv.stop(code::RESET);
            if let Ok(tcp) = rd.reunite(wr) {
                // Dropping with linger 0 sends RST: the far side's reset arrives as a reset.
                let _ = tcp.set_zero_linger();
            }
            abort.into()
        }
    };
    Summary {
        to_tunnel: up.load(Ordering::Relaxed),
        from_tunnel: down.load(Ordering::Relaxed),
        outcome,
    }
}

async fn tcp_to_tunnel(
    rd: &mut OwnedReadHalf,
    send: &mut SendHalf,
    meters: &[&Meter],
    total: &AtomicU64,
) -> Result<(), Abort> {
    let mut buf = BytesMut::new();
    loop {
        rd.readable()
            .await
            .map_err(|e| Abort::Local(e.to_string()))?;
        if buf.capacity() < CHUNK / 4 {
            buf.reserve(CHUNK);
        }
        match rd.try_read_buf(&mut buf) {
            Ok(0) => {
                send.finish().await;
                return Ok(());
            }
            Ok(n) => {
                let chunk = buf.split().freeze();
                send.write_chunk(chunk).await.map_err(remote)?;
                total.fetch_add(n as u64, Ordering::Relaxed);
                Meter::add_to_tunnel(meters, n as u64);
            }
            Err(e) if e.kind() == io::ErrorKind::WouldBlock => {
                // The socket is drained: give the buffer back so an idle connection holds none.
                buf = BytesMut::new();
            }
            Err(e) => return Err(Abort::Local(e.to_string())),
        }
    }
}

/// Tunnel to a local writer (a TCP socket, or any byte stream), shutting its write side down
/// at the end of the stream.
async fn tunnel_to_tcp<W: AsyncWrite + Unpin>(
    recv: &mut RecvHalf,
    wr: &mut W,
    meters: &[&Meter],
    total: &AtomicU64,
) -> Result<(), Abort> {
    let mut chunks = Vec::with_capacity(crate::transport::MAX_GATHER);
    loop {
        match recv
            .read_chunks(&mut chunks, GATHER_BYTES)
            .await
            .map_err(remote)?
        {
            Some(n) => {
                write_all_chunks(wr, &mut chunks)
                    .await
                    .map_err(|e| Abort::Local(e.to_string()))?;
                total.fetch_add(n as u64, Ordering::Relaxed);
                Meter::add_from_tunnel(meters, n as u64);
            }
            None => {
                wr.shutdown()
                    .await
                    .map_err(|e| Abort::Local(e.to_string()))?;
                return Ok(());
            }
        }
    }
}

/// Writes every chunk, as few system calls as the socket allows (one `writev` when it takes
/// them all), and empties the list.
async fn write_all_chunks<W: AsyncWrite + Unpin>(
    wr: &mut W,
    chunks: &mut Vec<bytes::Bytes>,
) -> io::Result<()> {
    use bytes::Buf;
    let mut first = 0;
    while first < chunks.len() {
        let slices: Vec<io::IoSlice<'_>> = chunks[first..]
            .iter()
            .map(|c| io::IoSlice::new(c))
            .collect();
        let mut n = wr.write_vectored(&slices).await?;
        if n == 0 {
            return Err(io::ErrorKind::WriteZero.into());
        }
        while n > 0 {
            let c = &mut chunks[first];
            let k = n.min(c.len());
            c.advance(k);
            n -= k;
            if c.is_empty() {
                first += 1;
            }
        }
        while first < chunks.len() && chunks[first].is_empty() {
            first += 1;
        }
    }
    chunks.clear();
    Ok(())
}

fn remote(e: StreamError) -> Abort {
    Abort::Remote(e.to_string())
}

/// Relays between two tunnel streams (a server passing a stream on to a peer), with the same
/// guarantees as [`relay`]: order, half-close per direction, resets that travel as resets.
pub async fn splice(a: Stream, b: Stream, meters: &[&Meter]) -> Summary {
    let Stream {
        send: mut a_send,
        recv: mut a_recv,
    } = a;
    let Stream {
        send: mut b_send,
        recv: mut b_recv,
    } = b;
    let (ab, ba) = (AtomicU64::new(0), AtomicU64::new(0));
    let result = tokio::try_join!(
        pipe(&mut a_recv, &mut b_send, meters, &ab, true),
        pipe(&mut b_recv, &mut a_send, meters, &ba, false),
    );
    let outcome = match result {
        Ok(_) => {
            tokio::join!(
                a_send.delivered(DELIVERY_LIMIT),
                b_send.delivered(DELIVERY_LIMIT)
            );
            Outcome::Closed
        }
        Err(abort) => {
            a_send.reset(code::RESET).await;
            a_recv.stop(code::RESET);
            b_send.reset(code::RESET).await;
            b_recv.stop(code::RESET);
            abort.into()
        }
    };
    Summary {
        to_tunnel: ba.load(Ordering::Relaxed),
        from_tunnel: ab.load(Ordering::Relaxed),
        outcome,
    }
}

/// One direction of a splice. `inbound` tells which meter side the bytes count on.
async fn pipe(
    from: &mut RecvHalf,
    to: &mut SendHalf,
    meters: &[&Meter],
    total: &AtomicU64,
    inbound: bool,
) -> Result<(), Abort> {
    loop {
        match from.read_chunk(CHUNK).await {
            Ok(Some(chunk)) => {
                let n = chunk.len() as u64;
                to.write_chunk(chunk)
                    .await
                    .map_err(|e| Abort::Remote(e.to_string()))?;
                total.fetch_add(n, Ordering::Relaxed);
                if inbound {
                    Meter::add_from_tunnel(meters, n);
                } else {
                    Meter::add_to_tunnel(meters, n);
                }
            }
            Ok(None) => {
                to.finish().await;
                return Ok(());
            }
            Err(e) => return Err(Abort::Local(e.to_string())),
        }
    }
}

/// A client connection of the egress proxy, which a relay may have to end with a reset.
pub trait Resettable {
    /// Makes the coming close a reset where the connection has one: TCP's RST, for a plain
    /// TCP client or the socket under a TLS one. A Unix socket has none, and its client reads
    /// an end (a TLS client also sees its missing `close_notify`).
    fn reset_on_close(&self);
}

impl Resettable for TcpStream {
    fn reset_on_close(&self) {
        let _ = self.set_zero_linger();
    }
}

impl Resettable for tokio_rustls::server::TlsStream<TcpStream> {
    fn reset_on_close(&self) {
        self.get_ref().0.reset_on_close();
    }
}

impl Resettable for tokio::net::UnixStream {
    fn reset_on_close(&self) {}
}

/// Relays between any client byte stream (the egress proxy's: TCP, TLS or a Unix socket) and a
/// tunnel stream, with the guarantees of [`relay`]; a reset towards the client is one where
/// its connection has a reset (see [`Resettable`]). `initial` is sent into the tunnel first
/// (bytes the client sent along with its request).
///
/// The soak across a cellular link found the close: a reverse stream lost with its tunnel
/// reached the egress client as a clean end, and the client took a truncated answer for a
/// whole one.
pub async fn relay_io<S: AsyncRead + AsyncWrite + Resettable + Unpin>(
    io: S,
    initial: bytes::Bytes,
    stream: Stream,
    meters: &[&Meter],
) -> Summary {
    let (mut rd, mut wr) = tokio::io::split(io);
    let Stream { mut send, mut recv } = stream;
    let (up, down) = (AtomicU64::new(0), AtomicU64::new(0));
    let to_tunnel = async {
        if !initial.is_empty() {
            let n = initial.len() as u64;
            send.write_chunk(initial).await.map_err(remote)?;
            up.fetch_add(n, Ordering::Relaxed);
        }
        let mut buf = BytesMut::new();
        loop {
            buf.reserve(CHUNK);
            match rd.read_buf(&mut buf).await {
                Ok(0) => {
                    send.finish().await;
                    return Ok(());
                }
                Ok(n) => {
                    send.write_chunk(buf.split().freeze())
                        .await
                        .map_err(remote)?;
                    up.fetch_add(n as u64, Ordering::Relaxed);
                    Meter::add_to_tunnel(meters, n as u64);
                }
                Err(e) => return Err(Abort::Local(e.to_string())),
            }
        }
    };
    let from_tunnel = tunnel_to_tcp(&mut recv, &mut wr, meters, &down);
    let result = tokio::try_join!(to_tunnel, from_tunnel);
    let outcome = match result {
        Ok(_) => {
            send.delivered(DELIVERY_LIMIT).await;
            Outcome::Closed
        }
        Err(abort) => {
            send.reset(code::RESET).await;
            recv.stop(code::RESET);
            rd.unsplit(wr).reset_on_close();
            abort.into()
        }
    };
    Summary {
        to_tunnel: up.load(Ordering::Relaxed),
        from_tunnel: down.load(Ordering::Relaxed),
        outcome,
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::transport::{tcp, Tunnel};
    use std::time::Duration;
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    use tokio::net::TcpListener;

    /// Both ends of a loopback TCP connection.
    async fn tcp_pair() -> (TcpStream, TcpStream) {
        let l = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = l.local_addr().unwrap();
        let (a, b) = tokio::join!(TcpStream::connect(addr), l.accept());
        (a.unwrap(), b.unwrap().0)
    }

    /// client ◄─TCP─► relay ◄─stream─► relay ◄─TCP─► server: returns the client's and the
    /// server's sockets, and the two relays' summaries to come.
    async fn relayed() -> (
        TcpStream,
        TcpStream,
        tokio::task::JoinHandle<Summary>,
        tokio::task::JoinHandle<Summary>,
    ) {
        let (ta, tb) = tcp::pair();
        let (ta, tb) = (Tunnel::from_tcp(ta), Tunnel::from_tcp(tb));
        let (client, near) = tcp_pair().await;
        let (far, server) = tcp_pair().await;
        // As in use, a frame opens the stream (the peer sees it once it carries a byte).
        let mut opened = ta.open_stream().await.unwrap();
        let hello = tether_proto::Message::Health {
            upstream_healthy: true,
        };
        opened.send.write_message(&hello).await.unwrap();
        let mut accepted = tb.accept_stream().await.unwrap();
        assert_eq!(accepted.recv.read_message().await.unwrap(), Some(hello));
        let a = tokio::spawn(async move {
            let _keep = ta;
            relay(near, opened, &[]).await
        });
        let b = tokio::spawn(async move {
            let _keep = tb;
            relay(far, accepted, &[]).await
        });
        (client, server, a, b)
    }

    async fn within<T>(f: impl std::future::Future<Output = T>) -> T {
        tokio::time::timeout(Duration::from_secs(10), f)
            .await
            .expect("in time")
    }

    #[tokio::test]
    async fn a_half_close_travels_each_way_on_its_own() {
        let (mut client, mut server, a, b) = relayed().await;
        client.write_all(b"ping").await.unwrap();
        client.shutdown().await.unwrap();
        // The server reads the bytes and then the end, while its own direction stays open.
        let mut got = Vec::new();
        within(server.read_to_end(&mut got)).await.unwrap();
        assert_eq!(got, b"ping");
        server.write_all(b"pong, later").await.unwrap();
        server.shutdown().await.unwrap();
        let mut back = Vec::new();
        within(client.read_to_end(&mut back)).await.unwrap();
        assert_eq!(back, b"pong, later");
        let (a, b) = (within(a).await.unwrap(), within(b).await.unwrap());
        assert_eq!(a.outcome, Outcome::Closed);
        assert_eq!(b.outcome, Outcome::Closed);
        assert_eq!((a.to_tunnel, a.from_tunnel), (4, 11));
        assert_eq!((b.to_tunnel, b.from_tunnel), (11, 4));
    }

    #[tokio::test]
    async fn a_reset_travels_as_a_reset() {
        let (mut client, server, a, b) = relayed().await;
        client.write_all(b"x").await.unwrap();
        // The server aborts: RST on its socket.
        server.set_zero_linger().unwrap();
        drop(server);
        let mut buf = [0u8; 16];
        let read = within(client.read(&mut buf)).await;
        assert_eq!(
            read.map_err(|e| e.kind()),
            Err(std::io::ErrorKind::ConnectionReset),
            "the client sees a reset, not an end"
        );
        let (a, b) = (within(a).await.unwrap(), within(b).await.unwrap());
        assert!(
            matches!(b.outcome, Outcome::LocalReset(_)),
            "{:?}",
            b.outcome
        );
        assert!(
            matches!(a.outcome, Outcome::RemoteReset(_)),
            "{:?}",
            a.outcome
        );
    }
}
