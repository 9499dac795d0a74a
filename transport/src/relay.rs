//! Moves bytes between the two ends of a relayed connection, in both directions at once: a
//! local socket and a tunnel stream (the forward and reverse paths), the egress proxy's client
//! and a stream, or two streams (a server passing a stream on to a peer).
//!
//! One pump serves them all, as linkerd2-proxy's `duplex` does: each end is an [`End`] that
//! splits into a [`Source`] and a [`Sink`], knows how to wait for its bytes' delivery and how
//! to reset, and the pump copies, counts and ends. Counting lives here alone: bytes on every
//! [`Meter`] given, and a reset on each of them when a relay ends in one.
//!
//! The relay keeps TCP's meaning intact across the tunnel:
//! - every byte arrives once and in order (the transport guarantees order; the relay never drops
//!   or duplicates a chunk);
//! - a half-close travels: end-of-file from one end finishes the other's direction, each
//!   direction on its own;
//! - a reset travels as a reset: a failure on either end resets both, a stream with a reset
//!   frame and a TCP connection with `SO_LINGER` 0, never a clean end-of-file;
//! - memory is bounded: at most one gathered batch ([`GATHER_BYTES`]) is in the relay's hands
//!   per direction, and flow control (TCP windows on one side, transport windows on the other)
//!   pushes back on a fast sender. An idle socket holds no read buffer.
//! - a stream that ended cleanly counts as open until the far end acknowledged its last bytes,
//!   so that whoever closes the tunnel once its streams are done (a drain, a move to a renewed
//!   certificate) does not cut them short.

use crate::transport::{RecvHalf, SendHalf, Stream, StreamError};
use bytes::{Bytes, BytesMut};
use std::future::Future;
use std::io;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;
use tether_proto::code;
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt, ReadHalf, WriteHalf};
use tokio::net::tcp::{OwnedReadHalf, OwnedWriteHalf};
use tokio::net::TcpStream;

/// Largest chunk the relay reads from a socket at once.
pub const CHUNK: usize = 32 * 1024;
/// Most bytes gathered from a tunnel stream for one write (one `writev` to a socket).
pub const GATHER_BYTES: usize = 256 * 1024;

/// The longest a relay that ended cleanly waits for its last bytes to be acknowledged (see
/// [`SendHalf::delivered`]) before it counts the stream done: past the longest blackout a
/// tunnel is held through, which ends the wait sooner by losing the tunnel.
const DELIVERY_LIMIT: Duration = Duration::from_secs(120);

/// Counters a relay adds to as it goes (for example the process-wide totals and a node's own).
#[derive(Debug, Default)]
pub struct Meter {
    /// Bytes from the relay's first end to its second: read from a local connection and sent
    /// into the tunnel.
    pub to_tunnel: AtomicU64,
    /// Bytes from the second end to the first: received from the tunnel.
    pub from_tunnel: AtomicU64,
    /// Relays that ended in a reset (either end's).
    pub resets: AtomicU64,
}

impl Meter {
    fn add(meters: &[&Meter], field: impl Fn(&Meter) -> &AtomicU64, n: u64) {
        for m in meters {
            field(m).fetch_add(n, Ordering::Relaxed);
        }
    }

    /// Counts a reset that ended a connection before it reached a relay (a client gone while
    /// its open was in flight), as a relay would have.
    pub fn reset(&self) {
        self.resets.fetch_add(1, Ordering::Relaxed);
    }
}

/// What broke one direction of a relay.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum Fault {
    /// A socket's read or write failed (a reset, most often).
    #[error("socket: {0}")]
    Socket(io::ErrorKind),
    /// A tunnel stream was reset, stopped or lost.
    #[error("stream: {0}")]
    Stream(#[from] StreamError),
}

impl From<io::Error> for Fault {
    fn from(e: io::Error) -> Self {
        Fault::Socket(e.kind())
    }
}

/// How a relay ended.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Outcome {
    /// Both directions finished cleanly.
    Closed,
    /// The first end (the local connection) failed; both were reset.
    LocalReset(Fault),
    /// The second end (the tunnel stream) failed; both were reset.
    RemoteReset(Fault),
}

/// Totals of one relayed connection.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Summary {
    pub to_tunnel: u64,
    pub from_tunnel: u64,
    pub outcome: Outcome,
}

/// The half of an [`End`] that bytes come out of.
pub trait Source: Send {
    /// Waits for bytes and appends them to `chunks`, returning how many; `None` at a clean end.
    fn pull(
        &mut self,
        chunks: &mut Vec<Bytes>,
    ) -> impl Future<Output = Result<Option<usize>, Fault>> + Send;
}

/// The half of an [`End`] that bytes go into.
pub trait Sink: Send {
    /// Writes every chunk, in order, and empties the list.
    fn push(&mut self, chunks: &mut Vec<Bytes>) -> impl Future<Output = Result<(), Fault>> + Send;
    /// Ends this direction cleanly: the far side reads end-of-file after the data.
    fn finish(&mut self) -> impl Future<Output = Result<(), Fault>> + Send;
}

/// One end of a relayed connection.
pub trait End: Send + Sized {
    type Source: Source;
    type Sink: Sink;
    /// The two halves, to be driven at once.
    fn split(self) -> (Self::Source, Self::Sink);
    /// After both directions ended cleanly: waits until what was written has reached the far
    /// side, where the end can tell (see [`SendHalf::delivered`]).
    fn delivered(sink: &mut Self::Sink) -> impl Future<Output = ()> + Send {
        let _ = sink;
        async {}
    }
    /// After a failure of either end: ends this one with a reset.
    fn reset(source: Self::Source, sink: Self::Sink) -> impl Future<Output = ()> + Send;
}

/// Relays between `a` (the local end: a socket, or the stream on the node's side of a splice)
/// and `b` (the tunnel stream) until both directions are done or one end fails.
pub async fn relay<A: End, B: End>(a: A, b: B, meters: &[&Meter]) -> Summary {
    relay_with(a, Bytes::new(), b, meters).await
}

/// [`relay`], with `first` sent from `a` to `b` before anything read from `a`: bytes the
/// egress proxy's client sent along with its request, counted as any other.
pub async fn relay_with<A: End, B: End>(a: A, first: Bytes, b: B, meters: &[&Meter]) -> Summary {
    let (mut a_src, mut a_sink) = a.split();
    let (mut b_src, mut b_sink) = b.split();
    let (up, down) = (AtomicU64::new(0), AtomicU64::new(0));
    let count_up = |n: u64| {
        up.fetch_add(n, Ordering::Relaxed);
        Meter::add(meters, |m| &m.to_tunnel, n);
    };
    let count_down = |n: u64| {
        down.fetch_add(n, Ordering::Relaxed);
        Meter::add(meters, |m| &m.from_tunnel, n);
    };
    let forward = async {
        if !first.is_empty() {
            let n = first.len() as u64;
            b_sink
                .push(&mut vec![first])
                .await
                .map_err(Outcome::RemoteReset)?;
            count_up(n);
        }
        pump(
            &mut a_src,
            &mut b_sink,
            count_up,
            Outcome::LocalReset,
            Outcome::RemoteReset,
        )
        .await
    };
    let backward = pump(
        &mut b_src,
        &mut a_sink,
        count_down,
        Outcome::RemoteReset,
        Outcome::LocalReset,
    );
    let outcome = match tokio::try_join!(forward, backward) {
        Ok(_) => {
            tokio::join!(A::delivered(&mut a_sink), B::delivered(&mut b_sink));
            Outcome::Closed
        }
        Err(outcome) => {
            Meter::add(meters, |m| &m.resets, 1);
            tokio::join!(A::reset(a_src, a_sink), B::reset(b_src, b_sink));
            outcome
        }
    };
    Summary {
        to_tunnel: up.load(Ordering::Relaxed),
        from_tunnel: down.load(Ordering::Relaxed),
        outcome,
    }
}

/// One direction: pulls from `from` and pushes into `to` until `from` ends, then finishes
/// `to`. A fault says which end it came from (`from_fault`, `to_fault`).
async fn pump<S: Source, K: Sink>(
    from: &mut S,
    to: &mut K,
    count: impl Fn(u64),
    from_fault: fn(Fault) -> Outcome,
    to_fault: fn(Fault) -> Outcome,
) -> Result<(), Outcome> {
    let mut chunks = Vec::new();
    loop {
        match from.pull(&mut chunks).await.map_err(from_fault)? {
            Some(n) => {
                to.push(&mut chunks).await.map_err(to_fault)?;
                count(n as u64);
            }
            None => return to.finish().await.map_err(to_fault),
        }
    }
}

/// A TCP connection's reading half, which holds a buffer only while bytes are coming: an idle
/// connection (most of them: watches, `exec` sessions) holds none.
pub struct TcpSource {
    rd: OwnedReadHalf,
    buf: BytesMut,
}

impl Source for TcpSource {
    async fn pull(&mut self, chunks: &mut Vec<Bytes>) -> Result<Option<usize>, Fault> {
        loop {
            self.rd.readable().await?;
            if self.buf.capacity() < CHUNK / 4 {
                self.buf.reserve(CHUNK);
            }
            match self.rd.try_read_buf(&mut self.buf) {
                Ok(0) => return Ok(None),
                Ok(n) => {
                    chunks.push(self.buf.split().freeze());
                    return Ok(Some(n));
                }
                // The socket is drained: give the buffer back.
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => self.buf = BytesMut::new(),
                Err(e) => return Err(e.into()),
            }
        }
    }
}

impl Sink for OwnedWriteHalf {
    async fn push(&mut self, chunks: &mut Vec<Bytes>) -> Result<(), Fault> {
        Ok(write_all_chunks(self, chunks).await?)
    }
    async fn finish(&mut self) -> Result<(), Fault> {
        Ok(self.shutdown().await?)
    }
}

impl End for TcpStream {
    type Source = TcpSource;
    type Sink = OwnedWriteHalf;
    fn split(self) -> (TcpSource, OwnedWriteHalf) {
        let _ = self.set_nodelay(true);
        let (rd, wr) = self.into_split();
        let buf = BytesMut::new();
        (TcpSource { rd, buf }, wr)
    }
    async fn reset(source: TcpSource, sink: OwnedWriteHalf) {
        if let Ok(tcp) = source.rd.reunite(sink) {
            // Dropping with linger 0 sends RST: the far side's reset arrives as a reset.
            let _ = tcp.set_zero_linger();
        }
    }
}

impl Source for RecvHalf {
    async fn pull(&mut self, chunks: &mut Vec<Bytes>) -> Result<Option<usize>, Fault> {
        Ok(self.read_chunks(chunks, GATHER_BYTES).await?)
    }
}

impl Sink for SendHalf {
    async fn push(&mut self, chunks: &mut Vec<Bytes>) -> Result<(), Fault> {
        for chunk in chunks.drain(..) {
            self.write_chunk(chunk).await?;
        }
        Ok(())
    }
    async fn finish(&mut self) -> Result<(), Fault> {
        SendHalf::finish(self).await;
        Ok(())
    }
}

impl End for Stream {
    type Source = RecvHalf;
    type Sink = SendHalf;
    fn split(self) -> (RecvHalf, SendHalf) {
        (self.recv, self.send)
    }
    async fn delivered(sink: &mut SendHalf) {
        sink.delivered(DELIVERY_LIMIT).await;
    }
    async fn reset(mut source: RecvHalf, mut sink: SendHalf) {
        sink.reset(code::RESET).await;
        source.stop(code::RESET);
    }
}

/// Writes every chunk, as few system calls as the socket allows (one `writev` when it takes
/// them all), and empties the list.
async fn write_all_chunks<W: AsyncWrite + Unpin>(
    wr: &mut W,
    chunks: &mut Vec<Bytes>,
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

/// Any client byte stream as an [`End`]: the egress proxy's (TCP, TLS or a Unix socket). A
/// reset towards the client is one where its connection has a reset (see [`Resettable`]).
///
/// The soak across a cellular link found why it matters: a reverse stream lost with its
/// tunnel reached the egress client as a clean end, and the client took a truncated answer
/// for a whole one.
pub struct Io<S>(pub S);

/// The reading half of an [`Io`].
pub struct IoSource<S> {
    rd: ReadHalf<S>,
    buf: BytesMut,
}

impl<S: AsyncRead + Send> Source for IoSource<S> {
    async fn pull(&mut self, chunks: &mut Vec<Bytes>) -> Result<Option<usize>, Fault> {
        self.buf.reserve(CHUNK);
        match self.rd.read_buf(&mut self.buf).await? {
            0 => Ok(None),
            n => {
                chunks.push(self.buf.split().freeze());
                Ok(Some(n))
            }
        }
    }
}

impl<S: AsyncWrite + Send> Sink for WriteHalf<S> {
    async fn push(&mut self, chunks: &mut Vec<Bytes>) -> Result<(), Fault> {
        Ok(write_all_chunks(self, chunks).await?)
    }
    async fn finish(&mut self) -> Result<(), Fault> {
        Ok(self.shutdown().await?)
    }
}

impl<S: AsyncRead + AsyncWrite + Resettable + Send + Unpin> End for Io<S> {
    type Source = IoSource<S>;
    type Sink = WriteHalf<S>;
    fn split(self) -> (IoSource<S>, WriteHalf<S>) {
        let (rd, wr) = tokio::io::split(self.0);
        let buf = BytesMut::new();
        (IoSource { rd, buf }, wr)
    }
    async fn reset(source: IoSource<S>, sink: WriteHalf<S>) {
        source.rd.unsplit(sink).reset_on_close();
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::transport::{tcp, Tunnel};
    use std::sync::Arc;
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

    /// Two ends of a TCP tunnel and a stream opened across it: the opening side's stream and
    /// the accepting side's. As in use, a frame opens the stream (the peer sees it once it
    /// carries a byte); it is read before the stream is handed out.
    async fn stream_pair() -> (Tunnel, Tunnel, Stream, Stream) {
        let (ta, tb) = tcp::pair();
        let (ta, tb) = (Tunnel::from_tcp(ta), Tunnel::from_tcp(tb));
        let mut opened = ta.open_stream().await.unwrap();
        let hello = tether_proto::Message::Health {
            upstream_healthy: true,
        };
        opened.send.write_message(&hello).await.unwrap();
        let mut accepted = tb.accept_stream().await.unwrap();
        assert_eq!(accepted.recv.read_message().await.unwrap(), Some(hello));
        (ta, tb, opened, accepted)
    }

    /// client ◄─TCP─► relay ◄─stream─► relay ◄─TCP─► server: returns the client's and the
    /// server's sockets, and the two relays' summaries to come.
    async fn relayed() -> (
        TcpStream,
        TcpStream,
        tokio::task::JoinHandle<Summary>,
        tokio::task::JoinHandle<Summary>,
    ) {
        relayed_counting(Arc::default()).await
    }

    /// [`relayed`], the node-side relay counting on `meter`.
    async fn relayed_counting(
        meter: Arc<Meter>,
    ) -> (
        TcpStream,
        TcpStream,
        tokio::task::JoinHandle<Summary>,
        tokio::task::JoinHandle<Summary>,
    ) {
        let (client, near) = tcp_pair().await;
        let (far, server) = tcp_pair().await;
        let (ta, tb, opened, accepted) = stream_pair().await;
        let a = tokio::spawn(async move {
            let _keep = ta;
            relay(near, opened, &[&meter]).await
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

    /// Every relay counts its resets where it counts its bytes: the egress proxy's relay once
    /// counted none, and each caller counted its own.
    #[tokio::test]
    async fn a_reset_is_counted_once_on_every_meter() {
        let meter = Arc::new(Meter::default());
        let (client, mut server, a, b) = relayed_counting(meter.clone()).await;
        client.set_zero_linger().unwrap();
        drop(client);
        let mut buf = [0u8; 16];
        let read = within(server.read(&mut buf)).await;
        assert_eq!(
            read.map_err(|e| e.kind()),
            Err(std::io::ErrorKind::ConnectionReset)
        );
        let a = within(a).await.unwrap();
        assert!(matches!(a.outcome, Outcome::LocalReset(Fault::Socket(_))));
        within(b).await.unwrap();
        assert_eq!(meter.resets.load(Ordering::Relaxed), 1);
    }

    /// The bytes an egress client sent with its request go first and count as relayed: they
    /// once went into the tunnel uncounted.
    #[tokio::test]
    async fn first_bytes_go_first_and_are_counted() {
        let (mut client, near) = tcp_pair().await;
        let (ta, _tb, opened, accepted) = stream_pair().await;
        let meter = Arc::new(Meter::default());
        let counted = meter.clone();
        let relayed = tokio::spawn(async move {
            let _keep = ta;
            let first = Bytes::from_static(b"GET / HTTP/1.1\r\n\r\n");
            relay_with(Io(near), first, opened, &[&counted]).await
        });
        client.write_all(b"and more").await.unwrap();
        client.shutdown().await.unwrap();
        let mut got = Vec::new();
        let (mut rd, mut wr) = (accepted.recv, accepted.send);
        while let Some(chunk) = within(rd.read_chunk(CHUNK)).await.unwrap() {
            got.extend_from_slice(&chunk);
        }
        assert_eq!(got, b"GET / HTTP/1.1\r\n\r\nand more");
        wr.finish().await;
        let mut end = Vec::new();
        within(client.read_to_end(&mut end)).await.unwrap();
        let summary = within(relayed).await.unwrap();
        assert_eq!(summary.outcome, Outcome::Closed);
        assert_eq!(summary.to_tunnel, 26);
        assert_eq!(meter.to_tunnel.load(Ordering::Relaxed), 26);
        assert_eq!(meter.resets.load(Ordering::Relaxed), 0);
    }
}
