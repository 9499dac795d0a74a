//! The QUIC transport: quinn's connections and streams, with the stream credit that lets an idle
//! tunnel hold little state, and quinn's errors in this module's terms.

use super::error::{CloseReason, StreamError, TransportError};
use bytes::Bytes;
use std::sync::atomic::{AtomicU32, Ordering::Relaxed};
use std::sync::Arc;
use tether_process::telemetry::{Counted, Tally};

/// A QUIC connection and the credit of streams its peer may open.
#[derive(Clone, Debug)]
pub(super) struct QuicTunnel {
    pub(super) conn: quinn::Connection,
    credit: Arc<Credit>,
}

/// How many streams the peer may open on a QUIC tunnel: it starts at
/// [`crate::tls::INITIAL_STREAMS`] and doubles, up to `max`, whenever half of it is in use, so
/// that an idle tunnel holds little state and a busy one is not throttled.
#[derive(Debug)]
pub(super) struct Credit {
    open: AtomicU32,
    limit: AtomicU32,
    max: u32,
}

/// Holds a place in the tunnel's stream count while an accepted stream is open.
pub(super) type CreditGuard = Counted<Arc<Credit>>;

impl Tally for Credit {
    fn up(&self) {
        self.open.up();
    }
    fn down(&self) {
        self.open.down();
    }
}

impl QuicTunnel {
    /// `max_streams`: the most streams the peer may ever have open at once on this tunnel.
    pub(super) fn new(conn: quinn::Connection, max_streams: u32) -> Self {
        let credit = Credit {
            open: 0.into(),
            limit: max_streams.min(crate::tls::INITIAL_STREAMS).into(),
            max: max_streams,
        };
        QuicTunnel {
            conn,
            credit: Arc::new(credit),
        }
    }

    pub(super) async fn open(
        &self,
    ) -> Result<(quinn::SendStream, quinn::RecvStream), TransportError> {
        self.conn.open_bi().await.map_err(conn_err)
    }

    /// Accepts the peer's next stream and grows the credit when half of it is in use.
    pub(super) async fn accept(
        &self,
    ) -> Result<(quinn::SendStream, quinn::RecvStream, CreditGuard), TransportError> {
        let (send, recv) = self.conn.accept_bi().await.map_err(conn_err)?;
        let credit = &self.credit;
        let guard = Counted::new(credit.clone());
        let open = credit.open.load(Relaxed);
        let limit = credit.limit.load(Relaxed);
        if open * 2 > limit && limit < credit.max {
            let grown = limit.saturating_mul(2).min(credit.max);
            credit.limit.store(grown, Relaxed);
            self.conn.set_max_concurrent_bi_streams(grown.into());
        }
        Ok((send, recv, guard))
    }

    pub(super) fn peer_certificates(
        &self,
    ) -> Option<Vec<rustls::pki_types::CertificateDer<'static>>> {
        self.conn
            .peer_identity()?
            .downcast::<Vec<rustls::pki_types::CertificateDer<'static>>>()
            .ok()
            .map(|b| *b)
    }
}

pub(super) fn close_reason(e: quinn::ConnectionError) -> CloseReason {
    use quinn::ConnectionError as E;
    match e {
        E::ApplicationClosed(c) => CloseReason::Peer {
            code: Some(c.error_code.into_inner()),
            reason: String::from_utf8_lossy(&c.reason).into_owned(),
        },
        E::LocallyClosed => CloseReason::Local(String::new()),
        E::TimedOut => CloseReason::TimedOut,
        other => CloseReason::Failed(other.to_string()),
    }
}

pub(super) fn conn_err(e: quinn::ConnectionError) -> TransportError {
    TransportError::Closed(close_reason(e))
}

pub(super) async fn write(s: &mut quinn::SendStream, data: Bytes) -> Result<(), StreamError> {
    use quinn::WriteError as E;
    s.write_chunk(data).await.map_err(|e| match e {
        E::Stopped(code) => StreamError::Stopped(varint_code(code)),
        E::ConnectionLost(c) => StreamError::ConnectionLost(close_reason(c).to_string()),
        E::ClosedStream | E::ZeroRttRejected => StreamError::Closed,
    })
}

pub(super) async fn read(
    s: &mut quinn::RecvStream,
    max: usize,
) -> Result<Option<Bytes>, StreamError> {
    use quinn::ReadError as E;
    match s.read_chunk(max, true).await {
        Ok(chunk) => Ok(chunk.map(|c| c.bytes)),
        Err(E::Reset(code)) => Err(StreamError::Reset(varint_code(code))),
        Err(E::ConnectionLost(c)) => Err(StreamError::ConnectionLost(close_reason(c).to_string())),
        Err(E::ClosedStream | E::IllegalOrderedRead | E::ZeroRttRejected) => {
            Err(StreamError::Closed)
        }
    }
}

fn varint_code(v: quinn::VarInt) -> u32 {
    u32::try_from(v.into_inner()).unwrap_or(u32::MAX)
}
