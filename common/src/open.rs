//! Opening a relayed stream: the one exchange every stream begins with.
//!
//! The side that wants a connection opens a stream, writes [`Message::Open`] naming the target,
//! and waits for [`Message::Status`]; the other side reaches the target and answers with
//! [`answer`]. Only after an `Ok` status do raw bytes flow, so an opener that is refused (or
//! hears nothing before its deadline) can try another tunnel having lost no byte. The agent's
//! forward path, the server's peer relay and the egress proxy all open this way.

use crate::transport::{Stream, StreamError, Tunnel};
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
}

/// Opens a stream on `tunnel` to `target` and waits up to `wait` in all for an `Ok` status.
/// `hops` counts the servers the stream has already passed (a server relays at most one hop).
pub async fn open(
    tunnel: &Tunnel,
    target: Target,
    hops: u8,
    wait: Duration,
) -> Result<Stream, OpenError> {
    let deadline = Instant::now() + wait;
    let header = Message::Open {
        version: PROTOCOL_VERSION,
        target,
        hops,
    };
    let sent = async {
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
    };
    let mut stream = timeout_at(deadline, sent)
        .await
        .unwrap_or(Err(OpenError::TimedOut(wait)))?;
    match timeout_at(deadline, stream.recv.read_message()).await {
        Ok(Ok(Some(Message::Status {
            code: StatusCode::Ok,
            ..
        }))) => Ok(stream),
        Ok(Ok(Some(Message::Status { code, message }))) => {
            Err(OpenError::Refused { code, message })
        }
        Ok(Ok(Some(other))) => {
            stream.reset(code::PROTOCOL).await;
            Err(OpenError::Protocol(format!(
                "unexpected {} message",
                other.name()
            )))
        }
        Ok(Ok(None)) => Err(OpenError::Tunnel("stream closed before its status".into())),
        Ok(Err(e)) => {
            stream.reset(code::PROTOCOL).await;
            Err(OpenError::Tunnel(e.to_string()))
        }
        Err(_) => {
            stream.reset(code::RESET).await;
            Err(OpenError::TimedOut(wait))
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
