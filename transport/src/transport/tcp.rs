//! The fallback transport: TLS 1.3 over TCP, multiplexed with yamux, for networks that block
//! or throttle UDP.
//!
//! One driver task owns each connection and polls it; callers talk to it through bounded
//! channels (open requests, accepted streams). yamux reads a peer's reset as a clean end of
//! stream, so each stream carries a small framing of its own, which restores the meaning of
//! finish and reset that QUIC has:
//!
//! ```text
//! DATA:  0x00, length u32 (BE), bytes     FIN: 0x01     RESET: 0x02, code u32 (BE)
//! ```
//!
//! A stream that ends without FIN (the connection died, or the peer dropped it) reads as a reset.
//!
//! Windows: yamux grows each stream's receive window on demand from 256 KiB towards the link's
//! bandwidth-delay product; a tunnel carries its configured stream limit (at most
//! [`MAX_STREAMS`]), and its total window is 256 KiB for each of them plus [`WINDOW_GROWTH`]
//! shared (a ceiling on data in flight: the relays read as data arrives). A join connection
//! carries one stream and one window. Liveness: the agent's probes and verdicts
//! (`link::liveness`), as on QUIC; the socket itself gives up on a silent peer only after the
//! blackout tolerance ([`tune`]).
//!
//! Records: each yamux frame, header and body, leaves as one TLS record and one `write`
//! ([`super::coalesce`]); frames are cut to fill a record exactly.

use super::coalesce::Coalesce;
use super::error::{CloseReason, StreamError};
use crate::tls::Liveness;
use bytes::{Bytes, BytesMut};
use rustls::pki_types::CertificateDer;
use std::io;
use std::net::SocketAddr;
use std::sync::Arc;
use std::task::Poll;
use tether_proto::stream_framing as framing;
use tokio::net::TcpStream;
use tokio::sync::{mpsc, oneshot, watch, Mutex};
use tokio_util::compat::TokioAsyncReadCompatExt;

/// Streams accepted but not yet taken by the tunnel's owner; more are refused (reset).
const ACCEPT_QUEUE: usize = 256;

type Io = Box<dyn AsyncIo>;
trait AsyncIo: futures_util::AsyncRead + futures_util::AsyncWrite + Unpin + Send {}
impl<T: futures_util::AsyncRead + futures_util::AsyncWrite + Unpin + Send> AsyncIo for T {}

/// The shared end of a yamux connection.
#[derive(Debug)]
pub struct TcpTunnel {
    open_tx: mpsc::Sender<oneshot::Sender<io::Result<yamux::Stream>>>,
    inbound: Mutex<mpsc::Receiver<yamux::Stream>>,
    closed: watch::Receiver<Option<CloseReason>>,
    close_tx: mpsc::Sender<String>,
    pub remote: SocketAddr,
    pub id: usize,
    pub peer_certs: Vec<CertificateDer<'static>>,
    pub alpn: Option<Vec<u8>>,
    /// The key-exchange group the handshake agreed (see [`crate::tls::group_name`]).
    pub key_exchange: Option<&'static str>,
    /// Bytes through the TCP socket, each way: what the agent's liveness watch samples.
    pub traffic: Arc<Traffic>,
}

/// Bytes a tunnel's socket has read and written so far.
#[derive(Debug, Default)]
pub struct Traffic {
    pub received: std::sync::atomic::AtomicU64,
    pub sent: std::sync::atomic::AtomicU64,
}

/// A TCP stream that counts what passes (below TLS: every byte on the wire but the headers).
struct Counted {
    inner: TcpStream,
    traffic: Arc<Traffic>,
}

impl tokio::io::AsyncRead for Counted {
    fn poll_read(
        mut self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
        buf: &mut tokio::io::ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        let before = buf.filled().len();
        let r = std::pin::Pin::new(&mut self.inner).poll_read(cx, buf);
        let n = buf.filled().len() - before;
        if n > 0 {
            self.traffic
                .received
                .fetch_add(n as u64, std::sync::atomic::Ordering::Relaxed);
        }
        r
    }
}

impl tokio::io::AsyncWrite for Counted {
    fn poll_write(
        mut self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        let r = std::pin::Pin::new(&mut self.inner).poll_write(cx, buf);
        if let Poll::Ready(Ok(n)) = &r {
            self.traffic
                .sent
                .fetch_add(*n as u64, std::sync::atomic::Ordering::Relaxed);
        }
        r
    }

    fn poll_write_vectored(
        mut self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
        bufs: &[io::IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        let r = std::pin::Pin::new(&mut self.inner).poll_write_vectored(cx, bufs);
        if let Poll::Ready(Ok(n)) = &r {
            self.traffic
                .sent
                .fetch_add(*n as u64, std::sync::atomic::Ordering::Relaxed);
        }
        r
    }

    fn is_write_vectored(&self) -> bool {
        self.inner.is_write_vectored()
    }

    fn poll_flush(
        mut self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
    ) -> Poll<io::Result<()>> {
        std::pin::Pin::new(&mut self.inner).poll_flush(cx)
    }

    fn poll_shutdown(
        mut self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
    ) -> Poll<io::Result<()>> {
        std::pin::Pin::new(&mut self.inner).poll_shutdown(cx)
    }
}

fn next_id() -> usize {
    use std::sync::atomic::{AtomicUsize, Ordering};
    // Far above quinn's ids, so the two never collide.
    static N: AtomicUsize = AtomicUsize::new(1 << 40);
    N.fetch_add(1, Ordering::Relaxed)
}

/// TCP settings of a tunnel: no Nagle delay, and a silent peer given up after the blackout
/// tolerance. `TCP_USER_TIMEOUT` ends a connection whose sent data stays unacknowledged that
/// long; kernel keepalives, first sent after the tolerance of silence (the agent's probes come
/// sooner, so on a live tunnel they never fire), end an idle one whose peer vanished (a node
/// that lost power) three probes later. Before, both were set to the 2.5 s idle timeout, and a
/// link blackout of a few seconds killed every tunnel: or, worse, left the other end's streams
/// waiting on a connection only one side had given up.
fn tune(tcp: &TcpStream, liveness: Liveness) -> io::Result<()> {
    tcp.set_nodelay(true)?;
    let sock = socket2::SockRef::from(tcp);
    // The kernel counts keepalive times in whole seconds, at least one.
    let hold = liveness
        .blackout_tolerance
        .max(liveness.idle_timeout)
        .max(std::time::Duration::from_secs(1));
    let ka = socket2::TcpKeepalive::new()
        .with_time(hold)
        .with_interval((hold / 6).max(std::time::Duration::from_secs(1)))
        .with_retries(3);
    sock.set_tcp_keepalive(&ka)?;
    sock.set_tcp_user_timeout(Some(liveness.tunnel_idle_timeout()))?;
    // Keep what waits unsent in the kernel small: a bulk stream's bytes queued there would sit
    // ahead of every other stream's, however small (head-of-line blocking across streams).
    sock.set_tcp_notsent_lowat(NOTSENT_LOWAT)?;
    Ok(())
}

/// Unsent bytes the kernel may hold for a tunnel's socket (`TCP_NOTSENT_LOWAT`).
const NOTSENT_LOWAT: u32 = 128 * 1024;

/// Streams one TCP tunnel carries at once.
pub const MAX_STREAMS: usize = 2048;

/// The peer's certificates and the agreed ALPN protocol of a finished TLS handshake.
/// What a finished handshake agreed: the peer's certificates, the protocol, the key exchange.
struct Session {
    peer_certs: Vec<CertificateDer<'static>>,
    alpn: Option<Vec<u8>>,
    key_exchange: Option<&'static str>,
}

fn session_info<D>(session: &rustls::ConnectionCommon<D>) -> Session {
    Session {
        peer_certs: session
            .peer_certificates()
            .map(|c| c.iter().map(|c| c.clone().into_owned()).collect())
            .unwrap_or_default(),
        alpn: session.alpn_protocol().map(|a| a.to_vec()),
        key_exchange: session
            .negotiated_key_exchange_group()
            .map(|g| crate::tls::group_name(g.name())),
    }
}

/// Most plaintext in one TLS record.
const TLS_RECORD: usize = 16 * 1024;
/// The size of a yamux frame header.
const YAMUX_HEADER: usize = 12;

/// Streams a join connection may have: its one exchange (the `Join` and its answer).
pub const JOIN_MAX_STREAMS: usize = 1;

/// yamux settings for a connection of this ALPN. A join connection is unauthenticated, so it
/// gets one stream and the smallest window yamux allows (its fixed 256 KiB initial credit):
/// whatever a stranger sends, it holds at most that much of this server's memory. A tunnel gets
/// `max_streams` (its configured limit, at most [`MAX_STREAMS`]), and a connection window of
/// 256 KiB for each: yamux lets every stream send its initial 256 KiB, so a smaller window is
/// only had with fewer streams.
fn yamux_config(alpn: Option<&[u8]>, mode: yamux::Mode, max_streams: usize) -> yamux::Config {
    let mut c = yamux::Config::default();
    // A frame and its 12-byte header fill one TLS record (16 KiB of plaintext) exactly: the
    // header travels with the body (`Coalesce`), and a 16 KiB body would spill 12 bytes into a
    // record of their own.
    c.set_split_send_size(TLS_RECORD - YAMUX_HEADER);
    if alpn == Some(crate::tls::ALPN_JOIN) && matches!(mode, yamux::Mode::Server) {
        c.set_max_num_streams(JOIN_MAX_STREAMS);
        c.set_max_connection_receive_window(Some(256 * 1024 * JOIN_MAX_STREAMS));
        return c;
    }
    let max_streams = max_streams.clamp(1, MAX_STREAMS);
    // yamux checks the window against the stream count at each step: lift it, set the count,
    // then set the window that fits it.
    c.set_max_connection_receive_window(None);
    c.set_max_num_streams(max_streams);
    c.set_max_connection_receive_window(Some(256 * 1024 * max_streams + WINDOW_GROWTH));
    c
}

/// What a tunnel's streams may grow their receive windows by, beyond the 256 KiB each starts
/// with, all together. yamux doubles a stream's window whenever the sender used it up within
/// two round trips, so a busy stream's window climbs to the link's bandwidth-delay product
/// (a 50 Mbit/s link at 100 ms holds 625 KB in flight; 20 Mbit/s at 600 ms, 1.5 MB), and a
/// quiet one stays at 256 KiB. Without this room, every stream was held to 256 KiB: a fifth of
/// a continental link. 16 MiB covers 200 Mbit/s at 600 ms; it is also the most that one tunnel
/// can buffer beyond the 256 KiB per open stream when its readers stall.
pub const WINDOW_GROWTH: usize = 16 * 1024 * 1024;

/// Says which step an I/O error came from (`connect: …`, `TLS: …`).
fn ctx(what: &'static str) -> impl Fn(io::Error) -> io::Error {
    move |e| io::Error::new(e.kind(), format!("{what}: {e}"))
}

impl TcpTunnel {
    /// Dials `addr`, runs TLS as a client (verifying the server as `name`) and yamux on top.
    pub async fn connect(
        addr: SocketAddr,
        name: &str,
        tls: Arc<rustls::ClientConfig>,
        liveness: Liveness,
        max_streams: usize,
    ) -> io::Result<Self> {
        let tcp = TcpStream::connect(addr).await.map_err(ctx("connect"))?;
        Self::connect_over(tcp, addr, name, tls, liveness, max_streams).await
    }

    /// Runs TLS as a client, and yamux on top, on `tcp`: a connection to the server at `addr`,
    /// made directly or through an HTTP proxy's `CONNECT`.
    pub async fn connect_over(
        tcp: TcpStream,
        addr: SocketAddr,
        name: &str,
        tls: Arc<rustls::ClientConfig>,
        liveness: Liveness,
        max_streams: usize,
    ) -> io::Result<Self> {
        tune(&tcp, liveness).map_err(ctx("socket options"))?;
        let traffic = Arc::new(Traffic::default());
        let tcp = Counted {
            inner: tcp,
            traffic: traffic.clone(),
        };
        let server_name = rustls::pki_types::ServerName::try_from(name.to_string())
            .map_err(|e| io::Error::new(io::ErrorKind::InvalidInput, e))?;
        let tls = tokio_rustls::TlsConnector::from(tls)
            .connect(server_name, tcp)
            .await
            .map_err(ctx("TLS"))?;
        let session = session_info(tls.get_ref().1);
        Ok(Self::start(
            Box::new(Coalesce::new(tls).compat()),
            yamux::Mode::Client,
            addr,
            session,
            max_streams,
            traffic,
        ))
    }

    /// Runs TLS as a server on an accepted connection, and yamux on top.
    pub async fn accept(
        tcp: TcpStream,
        acceptor: tokio_rustls::TlsAcceptor,
        liveness: Liveness,
        max_streams: usize,
    ) -> io::Result<Self> {
        let remote = tcp.peer_addr()?;
        tune(&tcp, liveness)?;
        let traffic = Arc::new(Traffic::default());
        let tcp = Counted {
            inner: tcp,
            traffic: traffic.clone(),
        };
        let tls = acceptor.accept(tcp).await?;
        let session = session_info(tls.get_ref().1);
        Ok(Self::start(
            Box::new(Coalesce::new(tls).compat()),
            yamux::Mode::Server,
            remote,
            session,
            max_streams,
            traffic,
        ))
    }

    fn start(
        io: Io,
        mode: yamux::Mode,
        remote: SocketAddr,
        session: Session,
        max_streams: usize,
        traffic: Arc<Traffic>,
    ) -> Self {
        let Session {
            peer_certs,
            alpn,
            key_exchange,
        } = session;
        let config = yamux_config(alpn.as_deref(), mode, max_streams);
        let conn = yamux::Connection::new(io, config, mode);
        let (open_tx, open_rx) = mpsc::channel(64);
        let (inbound_tx, inbound_rx) = mpsc::channel(ACCEPT_QUEUE);
        let (closed_tx, closed) = watch::channel(None);
        let (close_tx, close_rx) = mpsc::channel(1);
        tokio::spawn(drive(conn, open_rx, inbound_tx, closed_tx, close_rx));
        TcpTunnel {
            open_tx,
            inbound: Mutex::new(inbound_rx),
            closed,
            close_tx,
            remote,
            id: next_id(),
            peer_certs,
            alpn,
            key_exchange,
            traffic,
        }
    }

    pub async fn open(&self) -> Result<(SendHalf, RecvHalf), CloseReason> {
        let (tx, rx) = oneshot::channel();
        self.open_tx.send(tx).await.map_err(|_| self.reason())?;
        let stream = rx
            .await
            .map_err(|_| self.reason())?
            .map_err(|e| CloseReason::Failed(e.to_string()))?;
        Ok(split(stream, self.closed.clone()))
    }

    pub async fn accept_stream(&self) -> Result<(SendHalf, RecvHalf), CloseReason> {
        let mut rx = self.inbound.lock().await;
        match rx.recv().await {
            Some(s) => Ok(split(s, self.closed.clone())),
            None => Err(self.reason()),
        }
    }

    pub fn close(&self, reason: &str) {
        let _ = self.close_tx.try_send(reason.to_string());
    }

    pub async fn closed(&self) -> CloseReason {
        let mut rx = self.closed.clone();
        let reason = match rx.wait_for(|r| r.is_some()).await {
            Ok(r) => r.clone(),
            Err(_) => None,
        };
        reason.unwrap_or_else(Self::driver_gone)
    }

    pub fn close_reason(&self) -> Option<CloseReason> {
        self.closed.borrow().clone()
    }

    fn reason(&self) -> CloseReason {
        self.close_reason().unwrap_or_else(Self::driver_gone)
    }

    /// The driver task ended without saying why (the runtime is shutting down).
    fn driver_gone() -> CloseReason {
        CloseReason::Failed("connection closed".into())
    }
}

/// Owns the connection: serves open requests, hands out inbound streams, drives the I/O.
async fn drive(
    mut conn: yamux::Connection<Io>,
    mut open_rx: mpsc::Receiver<oneshot::Sender<io::Result<yamux::Stream>>>,
    inbound_tx: mpsc::Sender<yamux::Stream>,
    closed_tx: watch::Sender<Option<CloseReason>>,
    mut close_rx: mpsc::Receiver<String>,
) {
    let mut pending: Option<oneshot::Sender<io::Result<yamux::Stream>>> = None;
    let end = std::future::poll_fn(|cx| {
        if let Poll::Ready(Some(why)) = close_rx.poll_recv(cx) {
            return Poll::Ready(CloseReason::Local(why));
        }
        loop {
            if pending.is_none() {
                match open_rx.poll_recv(cx) {
                    Poll::Ready(Some(tx)) => pending = Some(tx),
                    Poll::Ready(None) => {
                        return Poll::Ready(CloseReason::Local("tunnel dropped".into()))
                    }
                    Poll::Pending => break,
                }
            }
            match conn.poll_new_outbound(cx) {
                Poll::Ready(r) => {
                    if let Some(tx) = pending.take() {
                        let _ = tx.send(r.map_err(|e| io::Error::other(e.to_string())));
                    }
                }
                Poll::Pending => break,
            }
        }
        loop {
            match conn.poll_next_inbound(cx) {
                Poll::Ready(Some(Ok(s))) => {
                    // A full queue refuses the stream: dropping it resets it.
                    let _ = inbound_tx.try_send(s);
                }
                Poll::Ready(Some(Err(e))) => {
                    return Poll::Ready(CloseReason::Failed(e.to_string()))
                }
                Poll::Ready(None) => {
                    return Poll::Ready(CloseReason::Peer {
                        code: None,
                        reason: String::new(),
                    })
                }
                Poll::Pending => return Poll::Pending,
            }
        }
    })
    .await;
    let local = end.is_local();
    // The streams end first (see `tunnel_end`): a goodbye to a peer on a dark link may take the
    // whole second below, and they must not wait for it.
    closed_tx.send_replace(Some(end));
    if local {
        // Our close: say goodbye (yamux GoAway) and flush what is queued, so the peer sees an
        // orderly end rather than a dropped connection.
        let _ = tokio::time::timeout(
            std::time::Duration::from_secs(1),
            std::future::poll_fn(|cx| conn.poll_close(cx)),
        )
        .await;
    }
}

/// One yamux stream, shared by its two halves. Each poll holds the lock only for itself, and
/// yamux keeps the reader's and the writer's wake-ups apart, so the halves never wait on each
/// other. (futures' `split` would do the same with its own lock, but hides the stream's
/// frame-by-frame reading that [`RecvHalf`] uses.)
type Shared = Arc<std::sync::Mutex<yamux::Stream>>;

/// Polls the shared stream; a poisoned lock (a panic while polling) reads as a lost stream.
fn poll_shared<T>(
    s: &Shared,
    f: impl FnOnce(std::pin::Pin<&mut yamux::Stream>) -> Poll<io::Result<T>>,
) -> Poll<io::Result<T>> {
    match s.lock() {
        Ok(mut g) => f(std::pin::Pin::new(&mut *g)),
        Err(_) => Poll::Ready(Err(io::Error::other("stream lock poisoned"))),
    }
}

/// The tunnel's end, as every stream of it watches it.
type Closed = watch::Receiver<Option<CloseReason>>;

/// Resolves when the tunnel has closed, with why.
///
/// yamux does not end the streams of a connection it closes on our request: a stream waiting
/// to read (or for window to write) would wait forever. That was the TLS/TCP hang that the WAN
/// lab found: a tunnel closed while its link was dark left its streams neither carried nor
/// reset. So every stream also watches the tunnel, and ends with it.
async fn tunnel_end(closed: &mut Closed) -> StreamError {
    match closed.wait_for(|r| r.is_some()).await {
        Ok(r) => StreamError::ConnectionLost(
            r.as_ref()
                .map(|r| r.to_string())
                .unwrap_or_else(|| "tunnel closed".into()),
        ),
        Err(_) => StreamError::ConnectionLost("tunnel closed".into()),
    }
}

fn split(s: yamux::Stream, closed: Closed) -> (SendHalf, RecvHalf) {
    let s: Shared = Arc::new(std::sync::Mutex::new(s));
    (
        SendHalf {
            w: Some(s.clone()),
            closed: closed.clone(),
        },
        RecvHalf {
            r: Some(s),
            buf: BytesMut::new(),
            framing: framing::Decoder::default(),
            ended: None,
            closed,
        },
    )
}

/// Writes all of `data` to the shared stream, unless the tunnel ends first.
async fn write_all(w: &Shared, closed: &mut Closed, data: &[u8]) -> io::Result<()> {
    use futures_util::AsyncWrite;
    let mut at = 0;
    while at < data.len() {
        let write = std::future::poll_fn(|cx| poll_shared(w, |s| s.poll_write(cx, &data[at..])));
        let n = tokio::select! {
            biased;
            n = write => n?,
            e = tunnel_end(closed) => return Err(io::Error::other(e.to_string())),
        };
        if n == 0 {
            return Err(io::ErrorKind::WriteZero.into());
        }
        at += n;
    }
    Ok(())
}

/// Closes the shared stream's sending side (yamux FIN).
async fn close(w: &Shared) -> io::Result<()> {
    use futures_util::AsyncWrite;
    std::future::poll_fn(|cx| poll_shared(w, |s| s.poll_close(cx))).await
}

/// The sending half of a stream over TCP.
pub struct SendHalf {
    w: Option<Shared>,
    closed: Closed,
}

impl SendHalf {
    pub async fn write_chunk(&mut self, data: Bytes) -> Result<(), StreamError> {
        let w = self.w.as_ref().ok_or(StreamError::Closed)?;
        // Chunks come from the relay's bounded reads; one over 4 GiB would be a bug upstream.
        let len = u32::try_from(data.len())
            .map_err(|_| StreamError::ConnectionLost("chunk over 4 GiB".into()))?;
        // Header and data in one write: one yamux frame (and TLS record) instead of two. The
        // copy costs less than the frame it saves.
        let header = framing::data_header(len);
        let mut frame = Vec::with_capacity(header.len() + data.len());
        frame.extend_from_slice(&header);
        frame.extend_from_slice(&data);
        write_all(w, &mut self.closed, &frame)
            .await
            .map_err(write_err)
    }

    /// Writes FIN and closes. Awaited by the caller's own task: yamux wakes one task per
    /// stream, so writing from a task of its own could lose the reading task's wake-up.
    pub async fn finish(&mut self) {
        if let Some(w) = self.w.take() {
            if write_all(&w, &mut self.closed, &[framing::FIN])
                .await
                .is_ok()
            {
                let _ = close(&w).await;
            }
        }
    }

    /// Writes RESET and closes; a peer that does not read within a second gets a yamux reset
    /// instead (dropping an open stream resets it), which reads as a reset all the same.
    pub async fn reset(&mut self, code: u32) {
        if let Some(w) = self.w.take() {
            let m = framing::reset_frame(code);
            let closed = &mut self.closed;
            let _ = tokio::time::timeout(std::time::Duration::from_secs(1), async {
                let _ = write_all(&w, closed, &m).await;
                let _ = close(&w).await;
            })
            .await;
        }
    }
}

fn write_err(e: io::Error) -> StreamError {
    match e.kind() {
        io::ErrorKind::WriteZero | io::ErrorKind::BrokenPipe => StreamError::Stopped(0),
        _ => StreamError::ConnectionLost(e.to_string()),
    }
}

/// The receiving half of a stream over TCP.
pub struct RecvHalf {
    r: Option<Shared>,
    /// Bytes received and not yet decoded: kept here, so a cancelled read loses nothing.
    buf: BytesMut,
    framing: framing::Decoder,
    ended: Option<Result<(), StreamError>>,
    closed: Closed,
}

impl RecvHalf {
    /// Takes the next frame yamux has received into `buf`; false at the stream's end. yamux
    /// hands out each frame's body whole, so this copies it once and zeroes nothing (reading
    /// through `AsyncRead` zeroed a 16 KiB buffer for each read, 5% of the server's CPU in a
    /// bulk run), and an idle stream's buffer stays empty. Cancel-safe: a frame is taken only
    /// when it is ready, in one poll.
    async fn fill(&mut self) -> Result<bool, StreamError> {
        use futures_util::Stream as _;
        let RecvHalf { r, buf, closed, .. } = self;
        let r = r.as_ref().ok_or(StreamError::Closed)?;
        let next =
            std::future::poll_fn(|cx| poll_shared(r, |s| s.poll_next(cx).map(Option::transpose)));
        // What yamux already holds for the stream (the last bytes and the FIN before the peer
        // closed the tunnel) is read first; only a stream with nothing more to read ends with
        // the tunnel.
        let frame = tokio::select! {
            biased;
            f = next => f,
            e = tunnel_end(closed) => return Err(e),
        };
        match frame {
            Ok(Some(packet)) => {
                buf.extend_from_slice(packet.as_ref());
                Ok(true)
            }
            Ok(None) => Ok(false),
            Err(e) => Err(StreamError::ConnectionLost(e.to_string())),
        }
    }

    pub async fn read_chunk(&mut self, max: usize) -> Result<Option<Bytes>, StreamError> {
        loop {
            if let Some(end) = &self.ended {
                return end.clone().map(|_| None);
            }
            match self.framing.decode(&mut self.buf, max) {
                Ok(Some(framing::Event::Data(chunk))) => {
                    if self.buf.is_empty() {
                        // Idle streams hold no buffer.
                        self.buf = BytesMut::new();
                    }
                    return Ok(Some(chunk));
                }
                Ok(Some(framing::Event::Fin)) => self.ended = Some(Ok(())),
                Ok(Some(framing::Event::Reset(code))) => {
                    self.ended = Some(Err(StreamError::Reset(code)))
                }
                Ok(None) => {
                    if !self.fill().await? {
                        // Ended without FIN: the peer went away or dropped the stream.
                        self.ended = Some(Err(StreamError::Reset(0)));
                    }
                }
                Err(e) => self.ended = Some(Err(StreamError::ConnectionLost(e.to_string()))),
            }
        }
    }

    pub fn stop(&mut self, _code: u32) {
        // Dropping our read half, with the write half gone too, resets the yamux stream: the
        // peer's writes fail from then on.
        self.r = None;
        self.ended = Some(Err(StreamError::Closed));
    }
}

/// Two ends of a yamux connection over an in-memory pipe, without TLS: for unit tests of what
/// runs on streams (the relay, the open), with the real framing and flow control.
#[cfg(test)]
pub(crate) fn pair() -> (TcpTunnel, TcpTunnel) {
    let (a, b) = tokio::io::duplex(1 << 20);
    let addr = SocketAddr::from(([127, 0, 0, 1], 1));
    let end = |io: tokio::io::DuplexStream, mode| {
        TcpTunnel::start(
            Box::new(io.compat()),
            mode,
            addr,
            Session {
                peer_certs: Vec::new(),
                alpn: None,
                key_exchange: None,
            },
            64,
            Arc::default(),
        )
    };
    (end(a, yamux::Mode::Client), end(b, yamux::Mode::Server))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::transport::Tunnel;
    use std::time::Duration;

    /// The hang the WAN lab found over TLS/TCP: a tunnel closed by its own side (the agent's
    /// verdict on a silent link) left its streams waiting forever, because yamux does not end
    /// the streams of a connection it closes on request. Each end of each stream must end with
    /// the tunnel: a waiting read, and a write blocked on a full window.
    #[tokio::test]
    async fn the_streams_of_a_tunnel_closed_here_end_at_once() {
        let (ta, tb) = pair();
        let (ta, tb) = (Tunnel::from_tcp(ta), Tunnel::from_tcp(tb));
        let mut opened = ta.open_stream().await.unwrap();
        let hello = tether_proto::Message::Drain;
        opened.send.write_message(&hello).await.unwrap();
        let mut accepted = tb.accept_stream().await.unwrap();
        assert_eq!(accepted.recv.read_message().await.unwrap(), Some(hello));
        // Fill the peer's window: the peer reads nothing, so a write waits for credit.
        let mut writer = ta.open_stream().await.unwrap();
        let blocked = tokio::spawn(async move {
            let chunk = Bytes::from(vec![7u8; 64 * 1024]);
            loop {
                if let Err(e) = writer.send.write_chunk(chunk.clone()).await {
                    return e;
                }
            }
        });
        let reading = tokio::spawn(async move { opened.recv.read_chunk(1024).await });
        tokio::time::sleep(Duration::from_millis(100)).await;
        ta.close(0, "the link is silent");
        let read = tokio::time::timeout(Duration::from_secs(2), reading)
            .await
            .expect("a read on a closed tunnel ends")
            .unwrap();
        assert!(read.is_err(), "{read:?}");
        // The write ends with an error (the loop has no other way out).
        tokio::time::timeout(Duration::from_secs(2), blocked)
            .await
            .expect("a write on a closed tunnel ends")
            .unwrap();
        drop(tb);
    }
}
