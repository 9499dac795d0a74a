//! Opening a relayed stream: the one exchange every stream begins with.
//!
//! The side that wants a connection opens a stream, writes [`Message::Open`] naming the target,
//! and waits for [`Message::Status`]; the other side reaches the target and answers with
//! [`answer`]. Only after an `Ok` status do raw bytes flow, so an opener that is refused (or
//! hears nothing before its deadline) can try another tunnel having lost no byte. The agent's
//! forward path (with [`begin`] and [`verdict`], its hedges and early bytes around them), the
//! server's peer relay and the egress proxy (with [`open`]) all open this way.

use crate::transport::{FrameError, Stream, StreamError, Tunnel};
use std::time::Duration;
use tether_proto::{code, Message, StatusCode, Target, PROTOCOL_VERSION};
use tokio::time::{timeout_at, Instant};

/// Why a stream could not be opened.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum OpenError {
    /// The tunnel failed before the other side answered; another tunnel may work.
    #[error("tunnel failed: {0}")]
    Tunnel(String),
    /// The other side answered with a refusal.
    #[error("{code}: {message}")]
    Refused { code: StatusCode, message: String },
    /// The other side answered with something other than a status.
    #[error("bad answer: {0}")]
    Protocol(String),
    /// No answer before the deadline; the stream was reset.
    #[error("no answer within {0:?}")]
    TimedOut(Duration),
    /// The other side reset the stream with the relay's code ([`code::RESET`]) before its
    /// answer arrived: it answered `Ok`, its target then reset the connection, and the reset
    /// took the answer with it (QUIC drops what a reset stream had not delivered). Not a
    /// tunnel failure: the target may have had the early bytes, so no other server may be
    /// asked with them; the client's connection is reset, as a reset travels.
    #[error("the target reset the connection as it was answered")]
    Reset,
}

/// Opens a stream on `tunnel` to `target` and waits up to `wait` in all for an `Ok` status.
/// `hops` counts the servers the stream has already passed (a server relays at most one hop).
///
/// The one-shot form of [`begin`] and [`verdict`], for an opener with nothing else to do
/// meanwhile (a server relaying through a peer, the egress proxy).
pub async fn open(
    tunnel: &Tunnel,
    target: Target,
    hops: u8,
    wait: Duration,
) -> Result<Stream, OpenError> {
    let deadline = Instant::now() + wait;
    let mut stream = timeout_at(deadline, begin(tunnel, target, hops))
        .await
        .unwrap_or(Err(OpenError::TimedOut(wait)))?;
    match timeout_at(deadline, stream.recv.read_message()).await {
        Ok(read) => verdict(&mut stream, read).await.map(|()| stream),
        Err(_) => {
            stream.reset(code::RESET).await;
            Err(OpenError::TimedOut(wait))
        }
    }
}

/// Opens a stream on `tunnel` and writes the `Open` naming `target`; the answer is the
/// caller's to wait for, then to judge with [`verdict`].
///
/// Split from [`open`] for the agent's forward path, which waits on several opens at once (a
/// hedge), sends the client's first bytes right behind an `Open` (early data), and keeps its
/// own deadlines: reading the answer is cancel-safe (a partial frame stays in the stream), so
/// the wait can sit in a `select!` with the client and the timers.
pub async fn begin(tunnel: &Tunnel, target: Target, hops: u8) -> Result<Stream, OpenError> {
    let header = Message::Open {
        version: PROTOCOL_VERSION,
        target,
        hops,
    };
    let mut stream = tunnel
        .open_stream()
        .await
        .map_err(|e| OpenError::Tunnel(e.to_string()))?;
    stream
        .send
        .write_message(&header)
        .await
        .map_err(|e| OpenError::Tunnel(e.to_string()))?;
    Ok(stream)
}

/// Judges the first message read on a stream [`begin`] opened: `Ok(())` for an `Ok` status,
/// after which raw bytes flow. A stream that broke the protocol is reset here, so that the
/// other side stops too; a refusal already finished it.
pub async fn verdict(
    stream: &mut Stream,
    read: Result<Option<Message>, FrameError>,
) -> Result<(), OpenError> {
    match read {
        Ok(Some(Message::Status {
            code: StatusCode::Ok,
            ..
        })) => Ok(()),
        Ok(Some(Message::Status { code, message })) => Err(OpenError::Refused { code, message }),
        Ok(Some(other)) => {
            stream.reset(code::PROTOCOL).await;
            Err(OpenError::Protocol(format!(
                "unexpected {} message",
                other.name()
            )))
        }
        Ok(None) => Err(OpenError::Tunnel("stream closed before its status".into())),
        Err(FrameError::Stream(StreamError::Reset(code::RESET))) => Err(OpenError::Reset),
        Err(e) => {
            stream.reset(code::PROTOCOL).await;
            Err(OpenError::Tunnel(e.to_string()))
        }
    }
}

/// Answers an [`Message::Open`] with a status. A refusal also finishes the stream: nothing
/// follows it. After `Ok`, the caller relays.
pub async fn answer(
    stream: &mut Stream,
    code: StatusCode,
    message: impl Into<String>,
) -> Result<(), StreamError> {
    let status = Message::Status {
        code,
        message: message.into(),
    };
    let written = stream.send.write_message(&status).await;
    if code != StatusCode::Ok {
        stream.send.finish().await;
    }
    written
}
