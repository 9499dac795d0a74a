//! One small interface over the transports a tunnel can ride on.
//!
//! Agent and server logic sees a [`Tunnel`] that opens and accepts [`Stream`]s, and a stream that
//! moves chunks of bytes, finishes, and resets. Which transport carries the tunnel is a detail of
//! this module, so that QUIC ([`quic`]) and the TLS-over-TCP fallback ([`tcp`]) behave the same to
//! everything above. Each adapter imports only [`error`]; this file wires them.

mod coalesce;
mod error;
mod quic;
pub mod tcp;

pub use error::{CloseReason, FrameError, StreamError, TransportError};

use bytes::{Bytes, BytesMut};
use rustls::pki_types::CertificateDer;
use std::fmt;
use std::net::SocketAddr;
use std::time::Duration;
use tether_proto::{self as protocol, Message};

/// Which transport carries a tunnel.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum TransportKind {
    Quic,
    Tcp,
}

impl TransportKind {
    /// The name in status, metrics, logs and flags.
    pub fn as_str(self) -> &'static str {
        match self {
            TransportKind::Quic => "quic",
            TransportKind::Tcp => "tcp",
        }
    }
}

impl fmt::Display for TransportKind {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

impl serde::Serialize for TransportKind {
    fn serialize<S: serde::Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.serialize_str(self.as_str())
    }
}

/// A multiplexed, authenticated connection between an agent and a server (or two servers).
#[derive(Clone, Debug)]
pub struct Tunnel {
    inner: Inner,
}

#[derive(Clone, Debug)]
enum Inner {
    Quic(quic::QuicTunnel),
    Tcp(std::sync::Arc<tcp::TcpTunnel>),
}

impl Tunnel {
    /// `max_streams`: the most streams the peer may ever have open at once on this tunnel.
    pub fn from_quic(conn: quinn::Connection, max_streams: u32) -> Self {
        Tunnel {
            inner: Inner::Quic(quic::QuicTunnel::new(conn, max_streams)),
        }
    }

    pub fn from_tcp(t: tcp::TcpTunnel) -> Self {
        Tunnel {
            inner: Inner::Tcp(std::sync::Arc::new(t)),
        }
    }

    /// The ALPN protocol agreed in the handshake.
    pub fn alpn(&self) -> Option<Vec<u8>> {
        match &self.inner {
            Inner::Quic(q) => crate::tls::alpn_of(&q.conn),
            Inner::Tcp(t) => t.alpn.clone(),
        }
    }

    /// Opens a bidirectional stream. The peer sees it once the first frame is written.
    pub async fn open_stream(&self) -> Result<Stream, TransportError> {
        match &self.inner {
            Inner::Quic(q) => {
                let (send, recv) = q.open().await?;
                Ok(Stream::quic(send, recv, None))
            }
            Inner::Tcp(t) => {
                let (send, recv) = t.open().await.map_err(TransportError::Closed)?;
                Ok(Stream::tcp(send, recv))
            }
        }
    }

    /// Waits for the peer's next stream; an error means the tunnel is gone.
    pub async fn accept_stream(&self) -> Result<Stream, TransportError> {
        match &self.inner {
            Inner::Quic(q) => {
                let (send, recv, credit) = q.accept().await?;
                Ok(Stream::quic(send, recv, Some(credit)))
            }
            Inner::Tcp(t) => {
                let (send, recv) = t.accept_stream().await.map_err(TransportError::Closed)?;
                Ok(Stream::tcp(send, recv))
            }
        }
    }

    /// Closes the tunnel at once; open streams are reset.
    pub fn close(&self, code: u32, reason: &str) {
        match &self.inner {
            Inner::Quic(q) => q
                .conn
                .close(quinn::VarInt::from_u32(code), reason.as_bytes()),
            Inner::Tcp(t) => t.close(&format!("code {code}: {reason}")),
        }
    }

    /// Resolves when the tunnel is closed, for whatever reason.
    pub async fn closed(&self) -> CloseReason {
        match &self.inner {
            Inner::Quic(q) => quic::close_reason(q.conn.closed().await),
            Inner::Tcp(t) => t.closed().await,
        }
    }

    /// The reason the tunnel closed, if it has.
    pub fn close_reason(&self) -> Option<CloseReason> {
        match &self.inner {
            Inner::Quic(q) => q.conn.close_reason().map(quic::close_reason),
            Inner::Tcp(t) => t.close_reason(),
        }
    }

    pub fn remote_addr(&self) -> SocketAddr {
        match &self.inner {
            Inner::Quic(q) => q.conn.remote_address(),
            Inner::Tcp(t) => t.remote,
        }
    }

    /// Smoothed round-trip time, as the transport measures it.
    pub fn rtt(&self) -> Duration {
        match &self.inner {
            Inner::Quic(q) => q.conn.rtt(),
            Inner::Tcp(_) => Duration::ZERO,
        }
    }

    /// What the tunnel has received and sent so far, as counts that only grow (see [`Traffic`]).
    /// The agent's liveness watch samples them.
    pub fn traffic(&self) -> Traffic {
        match &self.inner {
            Inner::Quic(q) => {
                let s = q.conn.stats();
                Traffic {
                    heard: s.udp_rx.datagrams,
                    answers: s.path.rtt.as_nanos() as u64,
                    questions: s.frame_tx.stream + s.frame_tx.ping,
                    lost: s.path.lost_packets,
                }
            }
            Inner::Tcp(t) => {
                let read = t
                    .traffic
                    .received
                    .load(std::sync::atomic::Ordering::Relaxed);
                Traffic {
                    heard: read,
                    answers: read,
                    questions: t.traffic.sent.load(std::sync::atomic::Ordering::Relaxed),
                    lost: 0,
                }
            }
        }
    }

    /// Which transport carries the tunnel.
    pub fn kind(&self) -> TransportKind {
        match &self.inner {
            Inner::Quic(_) => TransportKind::Quic,
            Inner::Tcp(_) => TransportKind::Tcp,
        }
    }

    /// Identifies this tunnel among all of the process's tunnels.
    pub fn id(&self) -> usize {
        match &self.inner {
            Inner::Quic(q) => q.conn.stable_id(),
            Inner::Tcp(t) => t.id,
        }
    }

    /// The key-exchange group the handshake agreed (`X25519MLKEM768`, `X25519`, ...; see
    /// [`crate::tls::group_name`]).
    pub fn key_exchange(&self) -> Option<&'static str> {
        match &self.inner {
            Inner::Quic(q) => crate::tls::key_exchange_of(&q.conn),
            Inner::Tcp(t) => t.key_exchange,
        }
    }

    /// The certificate chain the peer presented during the handshake.
    pub fn peer_certificates(&self) -> Option<Vec<CertificateDer<'static>>> {
        match &self.inner {
            Inner::Quic(q) => q.peer_certificates(),
            Inner::Tcp(t) => (!t.peer_certs.is_empty()).then(|| t.peer_certs.clone()),
        }
    }
}

/// A tunnel's traffic so far, as the liveness watch reads it.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Traffic {
    /// Anything received: QUIC datagrams, or bytes over TCP.
    pub heard: u64,
    /// What proves the peer hears us, as a value that changes with each proof (only a change
    /// means anything): over QUIC, the smoothed round-trip time in nanoseconds, which moves only
    /// when the peer acknowledges a packet of ours it had not acknowledged before (on a link
    /// that lost our direction, the peer's packets still arrive, with its old acknowledgements
    /// in them, and move nothing); over TCP, bytes received (new data flows only while our
    /// acknowledgements reach the peer).
    pub answers: u64,
    /// What asks for an answer: QUIC STREAM and PING frames (acknowledgements do not), or bytes
    /// sent over TCP.
    pub questions: u64,
    /// Packets the transport declared lost (QUIC; TCP's losses stay in the kernel: 0): a link
    /// that loses packets is one where a live server can be silent for seconds.
    pub lost: u64,
}

/// Both directions of one relayed connection.
pub struct Stream {
    pub send: SendHalf,
    pub recv: RecvHalf,
}

impl Stream {
    fn tcp(send: tcp::SendHalf, recv: tcp::RecvHalf) -> Self {
        Stream {
            send: SendHalf {
                inner: SendInner::Tcp(send),
            },
            recv: RecvHalf {
                inner: RecvInner::Tcp(recv),
                _credit: None,
                partial: BytesMut::new(),
            },
        }
    }

    fn quic(
        send: quinn::SendStream,
        recv: quinn::RecvStream,
        credit: Option<quic::CreditGuard>,
    ) -> Self {
        Stream {
            send: SendHalf {
                inner: SendInner::Quic(send),
            },
            recv: RecvHalf {
                inner: RecvInner::Quic(recv),
                _credit: credit,
                partial: BytesMut::new(),
            },
        }
    }

    /// Whether the stream's transport notices a silent peer by itself. QUIC does (its
    /// keepalives and idle timeout are end to end); TCP's keepalives are answered by whatever
    /// terminates the TCP connection, which may be a middlebox, so a control stream over TCP
    /// carries heartbeats of its own.
    pub fn needs_heartbeat(&self) -> bool {
        matches!(self.send.inner, SendInner::Tcp(_))
    }

    /// Abandons the stream in both directions; the peer sees a reset.
    pub async fn reset(&mut self, code: u32) {
        self.send.reset(code).await;
        self.recv.stop(code);
    }
}

/// The sending half of a stream.
pub struct SendHalf {
    inner: SendInner,
}

enum SendInner {
    Quic(quinn::SendStream),
    Tcp(tcp::SendHalf),
}

impl SendHalf {
    /// Queues a chunk; waits while the peer's flow-control window is full.
    pub async fn write_chunk(&mut self, data: Bytes) -> Result<(), StreamError> {
        match &mut self.inner {
            SendInner::Quic(s) => quic::write(s, data).await,
            SendInner::Tcp(s) => s.write_chunk(data).await,
        }
    }

    /// Writes one protocol frame.
    pub async fn write_message(&mut self, msg: &Message) -> Result<(), StreamError> {
        let bytes = protocol::encode_to_bytes(msg).map_err(|_| StreamError::Closed)?;
        self.write_chunk(bytes).await
    }

    /// Ends the stream cleanly: the peer reads end-of-stream after the data.
    pub async fn finish(&mut self) {
        match &mut self.inner {
            SendInner::Quic(s) => {
                let _ = s.finish();
            }
            SendInner::Tcp(s) => s.finish().await,
        }
    }

    /// After [`SendHalf::finish`], waits until the peer has acknowledged all the stream's data
    /// (or stopped the stream, or the tunnel is lost), for at most `limit`.
    ///
    /// QUIC delivers a finished stream's data in the background, and closing its connection
    /// discards what is not acknowledged yet: a tunnel retired the moment its last stream ended
    /// cut that stream's last bytes, and the far end lost the stream instead of reading its
    /// end. The soak across a cellular link lost a reverse stream's whole answer so, at a
    /// certificate renewal. So a relay counts its stream open until this returns. Over TCP the
    /// tunnel's close flushes what it holds first: nothing to wait for.
    pub async fn delivered(&mut self, limit: Duration) {
        if let SendInner::Quic(s) = &self.inner {
            let _ = tokio::time::timeout(limit, s.stopped()).await;
        }
    }

    /// Abandons the stream: the peer reads a reset, and unsent data is dropped.
    pub async fn reset(&mut self, code: u32) {
        match &mut self.inner {
            SendInner::Quic(s) => {
                let _ = s.reset(quinn::VarInt::from_u32(code));
            }
            SendInner::Tcp(s) => s.reset(code).await,
        }
    }
}

/// Most chunks [`RecvHalf::read_chunks`] takes at once (the kernel's `writev` takes 1,024).
pub const MAX_GATHER: usize = 64;

/// The receiving half of a stream.
pub struct RecvHalf {
    inner: RecvInner,
    /// Holds a place in the tunnel's stream count while the stream is open.
    _credit: Option<quic::CreditGuard>,
    /// The start of a frame that [`RecvHalf::read_message`] has read but not finished: kept
    /// here rather than in the call, so a read that a `select!` cancels loses nothing.
    partial: BytesMut,
}

enum RecvInner {
    Quic(quinn::RecvStream),
    Tcp(tcp::RecvHalf),
}

impl RecvHalf {
    /// Reads up to `max` bytes; `None` means the peer finished the stream.
    pub async fn read_chunk(&mut self, max: usize) -> Result<Option<Bytes>, StreamError> {
        if !self.partial.is_empty() {
            // Bytes a cancelled read_message took: they come first, in order.
            let n = self.partial.len().min(max.max(1));
            return Ok(Some(self.partial.split_to(n).freeze()));
        }
        self.read_transport(max).await
    }

    /// One read from the transport itself. Cancel-safe: quinn's reads are, and the TCP
    /// transport keeps its buffer in its half.
    async fn read_transport(&mut self, max: usize) -> Result<Option<Bytes>, StreamError> {
        match &mut self.inner {
            RecvInner::Quic(s) => quic::read(s, max).await,
            RecvInner::Tcp(s) => s.read_chunk(max).await,
        }
    }

    /// Waits for data, then takes every chunk already received, up to `max` bytes in all, so
    /// that the caller can write them with one vectored call instead of one call per packet.
    /// `None` means the peer finished the stream (and nothing was left to take).
    pub async fn read_chunks(
        &mut self,
        out: &mut Vec<Bytes>,
        max: usize,
    ) -> Result<Option<usize>, StreamError> {
        let Some(first) = self.read_chunk(max).await? else {
            return Ok(None);
        };
        let mut total = first.len();
        out.push(first);
        while total < max && out.len() < MAX_GATHER {
            match self.ready_chunk(max - total).await {
                Some(Ok(Some(chunk))) => {
                    total += chunk.len();
                    out.push(chunk);
                }
                // Finished, failed or nothing more yet: the next call finds out.
                _ => break,
            }
        }
        Ok(Some(total))
    }

    /// A chunk that is there now, without waiting for one. The read is polled once with the
    /// task's own waker, never a no-op one: a transport keeps one waker per stream (yamux one
    /// for the reader and one for the window update it owes the peer), and a no-op waker in
    /// its place would leave the next wake-up with nobody to receive it. A read that is not
    /// ready is dropped, which every read here allows (they are cancel-safe).
    async fn ready_chunk(&mut self, max: usize) -> Option<Result<Option<Bytes>, StreamError>> {
        use std::future::Future;
        use std::task::Poll;
        let mut read = std::pin::pin!(self.read_chunk(max));
        std::future::poll_fn(|cx| {
            Poll::Ready(match read.as_mut().poll(cx) {
                Poll::Ready(r) => Some(r),
                Poll::Pending => None,
            })
        })
        .await
    }

    /// Reads exactly one frame and nothing after it, so that payload that follows stays unread.
    /// `Ok(None)` means the stream ended cleanly before the frame began.
    ///
    /// Cancel-safe: the part of a frame read so far stays in the half, and the next call goes
    /// on from it. The control streams read this way inside a `select!` with heartbeats and
    /// announcements, so a frame split across packets arrives whole.
    pub async fn read_message(&mut self) -> Result<Option<Message>, FrameError> {
        loop {
            let need = protocol::bytes_needed(&self.partial)?;
            if need == 0 {
                let frame = std::mem::take(&mut self.partial);
                return match protocol::decode(&frame)? {
                    Some((msg, _)) => Ok(Some(msg)),
                    None => Err(FrameError::Truncated),
                };
            }
            match self.read_transport(need).await? {
                Some(chunk) => self.partial.extend_from_slice(&chunk),
                None if self.partial.is_empty() => return Ok(None),
                None => return Err(FrameError::Truncated),
            }
        }
    }

    /// Tells the peer to stop sending; it sees its stream stopped.
    pub fn stop(&mut self, code: u32) {
        match &mut self.inner {
            RecvInner::Quic(s) => {
                let _ = s.stop(quinn::VarInt::from_u32(code));
            }
            RecvInner::Tcp(s) => s.stop(code),
        }
    }
}
