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
//! Windows: yamux grows each stream's receive window on demand from 256 KiB; a tunnel carries
//! its configured stream limit (at most [`MAX_STREAMS`]), and its total window is 256 KiB for
//! each of them (a ceiling on data in flight: the relays read as data arrives). A join
//! connection carries one stream and one window. Liveness: TCP keepalives (every second
//! on an idle connection, the kernel's finest step) and `TCP_USER_TIMEOUT` (the idle timeout, for
//! unacknowledged data) close a silent connection in about the same time as QUIC does.
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
}

fn next_id() -> usize {
    use std::sync::atomic::{AtomicUsize, Ordering};
    // Far above quinn's ids, so the two never collide.
    static N: AtomicUsize = AtomicUsize::new(1 << 40);
    N.fetch_add(1, Ordering::Relaxed)
}

/// TCP settings that notice a silent peer: keepalive probes on an idle connection, and a user
/// timeout on unacknowledged data.
fn tune(tcp: &TcpStream, liveness: Liveness) -> io::Result<()> {
    tcp.set_nodelay(true)?;
    let sock = socket2::SockRef::from(tcp);
    // The kernel counts keepalive times in whole seconds, at least one.
    let interval = liveness
        .keepalive_interval
        .max(std::time::Duration::from_secs(1));
    let ka = socket2::TcpKeepalive::new()
        .with_time(interval)
        .with_interval(interval)
        .with_retries(
            (liveness.idle_timeout.as_millis() / interval.as_millis().max(1)).clamp(1, 30) as u32,
        );
    sock.set_tcp_keepalive(&ka)?;
    sock.set_tcp_user_timeout(Some(liveness.idle_timeout))?;
    Ok(())
}

/// Streams one TCP tunnel carries at once.
pub const MAX_STREAMS: usize = 2048;

/// The peer's certificates and the agreed ALPN protocol of a finished TLS handshake.
fn session_info<D>(
    session: &rustls::ConnectionCommon<D>,
) -> (Vec<CertificateDer<'static>>, Option<Vec<u8>>) {
    let certs = session
        .peer_certificates()
        .map(|c| c.iter().map(|c| c.clone().into_owned()).collect())
        .unwrap_or_default();
    (certs, session.alpn_protocol().map(|a| a.to_vec()))
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
    c.set_max_connection_receive_window(Some(256 * 1024 * max_streams));
    c
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
        let ctx = |what: &'static str| {
            move |e: io::Error| io::Error::new(e.kind(), format!("{what}: {e}"))
        };
        let tcp = TcpStream::connect(addr).await.map_err(ctx("connect"))?;
        tune(&tcp, liveness).map_err(ctx("socket options"))?;
        let server_name = rustls::pki_types::ServerName::try_from(name.to_string())
            .map_err(|e| io::Error::new(io::ErrorKind::InvalidInput, e))?;
        let tls = tokio_rustls::TlsConnector::from(tls)
            .connect(server_name, tcp)
            .await
            .map_err(ctx("TLS"))?;
        let (peer_certs, alpn) = session_info(tls.get_ref().1);
        Ok(Self::start(
            Box::new(Coalesce::new(tls).compat()),
            yamux::Mode::Client,
            addr,
            (peer_certs, alpn),
            max_streams,
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
        let tls = acceptor.accept(tcp).await?;
        let (peer_certs, alpn) = session_info(tls.get_ref().1);
        Ok(Self::start(
            Box::new(Coalesce::new(tls).compat()),
            yamux::Mode::Server,
            remote,
            (peer_certs, alpn),
            max_streams,
        ))
    }

    fn start(
        io: Io,
        mode: yamux::Mode,
        remote: SocketAddr,
        (peer_certs, alpn): (Vec<CertificateDer<'static>>, Option<Vec<u8>>),
        max_streams: usize,
    ) -> Self {
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
        }
    }

    pub async fn open(&self) -> Result<(SendHalf, RecvHalf), CloseReason> {
        let (tx, rx) = oneshot::channel();
        self.open_tx.send(tx).await.map_err(|_| self.reason())?;
        let stream = rx
            .await
            .map_err(|_| self.reason())?
            .map_err(|e| CloseReason::Failed(e.to_string()))?;
        Ok(split(stream))
    }

    pub async fn accept_stream(&self) -> Result<(SendHalf, RecvHalf), CloseReason> {
        let mut rx = self.inbound.lock().await;
        match rx.recv().await {
            Some(s) => Ok(split(s)),
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
    if end.is_local() {
        // Our close: say goodbye (yamux GoAway) and flush what is queued, so the peer sees an
        // orderly end rather than a dropped connection.
        let _ = tokio::time::timeout(
            std::time::Duration::from_secs(1),
            std::future::poll_fn(|cx| conn.poll_close(cx)),
        )
        .await;
    }
    closed_tx.send_replace(Some(end));
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

fn split(s: yamux::Stream) -> (SendHalf, RecvHalf) {
    let s: Shared = Arc::new(std::sync::Mutex::new(s));
    (
        SendHalf { w: Some(s.clone()) },
        RecvHalf {
            r: Some(s),
            buf: BytesMut::new(),
            framing: framing::Decoder::default(),
            ended: None,
        },
    )
}

/// Writes all of `data` to the shared stream.
async fn write_all(w: &Shared, data: &[u8]) -> io::Result<()> {
    use futures_util::AsyncWrite;
    let mut at = 0;
    while at < data.len() {
        let n =
            std::future::poll_fn(|cx| poll_shared(w, |s| s.poll_write(cx, &data[at..]))).await?;
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
        write_all(w, &frame).await.map_err(write_err)
    }

    /// Writes FIN and closes. Awaited by the caller's own task: yamux wakes one task per
    /// stream, so writing from a task of its own could lose the reading task's wake-up.
    pub async fn finish(&mut self) {
        if let Some(w) = self.w.take() {
            let _ = write_all(&w, &[framing::FIN]).await;
            let _ = close(&w).await;
        }
    }

    /// Writes RESET and closes; a peer that does not read within a second gets a yamux reset
    /// instead (dropping an open stream resets it), which reads as a reset all the same.
    pub async fn reset(&mut self, code: u32) {
        if let Some(w) = self.w.take() {
            let m = framing::reset_frame(code);
            let _ = tokio::time::timeout(std::time::Duration::from_secs(1), async {
                let _ = write_all(&w, &m).await;
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
}

impl RecvHalf {
    /// Takes the next frame yamux has received into `buf`; false at the stream's end. yamux
    /// hands out each frame's body whole, so this copies it once and zeroes nothing (reading
    /// through `AsyncRead` zeroed a 16 KiB buffer for each read, 5% of the server's CPU in a
    /// bulk run), and an idle stream's buffer stays empty. Cancel-safe: a frame is taken only
    /// when it is ready, in one poll.
    async fn fill(&mut self) -> Result<bool, StreamError> {
        use futures_util::Stream as _;
        let RecvHalf { r, buf, .. } = self;
        let r = r.as_ref().ok_or(StreamError::Closed)?;
        let frame =
            std::future::poll_fn(|cx| poll_shared(r, |s| s.poll_next(cx).map(Option::transpose)))
                .await;
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
        TcpTunnel::start(Box::new(io.compat()), mode, addr, (Vec::new(), None), 64)
    };
    (end(a, yamux::Mode::Client), end(b, yamux::Mode::Server))
}
