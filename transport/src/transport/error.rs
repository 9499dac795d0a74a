//! Why tunnels close and streams fail, as types: callers decide on the variant (a local close, a
//! peer's close, a timeout), never on the words of a message.

use std::fmt;
use tether_proto::DecodeError;

/// How a tunnel ended.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum CloseReason {
    /// This side closed the tunnel, for this reason.
    Local(String),
    /// The peer closed it, with its code and words where the transport carries them (QUIC
    /// does; a yamux GoAway does not).
    Peer { code: Option<u64>, reason: String },
    /// The peer stopped answering for the idle timeout.
    TimedOut,
    /// The connection failed: an I/O, TLS or transport protocol error.
    Failed(String),
}

impl CloseReason {
    /// Whether this side chose to close (as opposed to losing the tunnel).
    pub fn is_local(&self) -> bool {
        matches!(self, CloseReason::Local(_))
    }
}

impl fmt::Display for CloseReason {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            CloseReason::Local(why) if why.is_empty() => write!(f, "closed locally"),
            CloseReason::Local(why) => write!(f, "closed locally ({why})"),
            CloseReason::Peer { code, reason } => {
                write!(f, "closed by peer")?;
                match (code, reason.is_empty()) {
                    (Some(c), true) => write!(f, " (code {c})"),
                    (Some(c), false) => write!(f, " (code {c}: {reason})"),
                    (None, true) => Ok(()),
                    (None, false) => write!(f, " ({reason})"),
                }
            }
            CloseReason::TimedOut => write!(f, "timed out: the peer stopped answering"),
            CloseReason::Failed(e) => write!(f, "{e}"),
        }
    }
}

/// Why a tunnel failed or closed.
#[derive(Debug, Clone, thiserror::Error)]
pub enum TransportError {
    #[error("tunnel closed: {0}")]
    Closed(CloseReason),
    #[error("stream limit of the tunnel reached")]
    StreamLimit,
}

/// Why a stream failed.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum StreamError {
    #[error("stream reset by peer (code {0})")]
    Reset(u32),
    #[error("peer stopped reading (code {0})")]
    Stopped(u32),
    #[error("tunnel lost: {0}")]
    ConnectionLost(String),
    #[error("stream already closed")]
    Closed,
}

/// Why a frame could not be read from a stream.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum FrameError {
    #[error(transparent)]
    Stream(#[from] StreamError),
    #[error("malformed frame: {0}")]
    Decode(#[from] DecodeError),
    #[error("stream ended in the middle of a frame")]
    Truncated,
}
