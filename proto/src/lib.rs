//! tether's wire protocol as pure codecs: bytes in, frames out, no I/O.
//!
//! This crate depends on `bytes` and `thiserror` alone, so the fuzz targets and anyone
//! reading the protocol need nothing else. It holds the protocol's messages (this module) and the
//! per-stream framing of the TLS-over-TCP transport ([`stream_framing`]).
//!
//! Everything that crosses a tunnel between an agent and a server, or between two servers, is a
//! frame:
//!
//! ```text
//! +---------+-----------------+------------------------+
//! | type u8 | length u16 (BE) | body (length bytes)    |
//! +---------+-----------------+------------------------+
//! ```
//!
//! A tunnel carries one control stream, which opens with [`Message::Hello`], and one stream per
//! relayed TCP connection, which opens with [`Message::Open`] and is answered by
//! [`Message::Status`] before any payload flows. After the status, the stream carries raw bytes.
//!
//! The decoder is written for hostile input: it never panics, never allocates more than one frame
//! ([`MAX_FRAME_BODY`]) and reports the first thing that is wrong. Frame types it does not know
//! decode as [`Message::Unknown`], so that a newer peer can add control messages without breaking
//! an older one. See `docs/protocol.md` for the full specification.

#![forbid(unsafe_code)]

/// Capabilities: the named features a side announces in its [`Message::Hello`] or
/// [`Message::Welcome`].
///
/// A behaviour that an older release does not know is used only when the other side announced
/// its capability, so agents and servers one minor release apart keep working together (the
/// promise in `docs/protocol.md`). Names a side does not know are kept but mean nothing to it.
pub mod capability;
/// Application error codes used when a stream is reset or a tunnel is closed.
pub mod code;
mod codec;
mod message;
pub mod stream_framing;

/// The buffer types of the codecs' signatures, for users (the fuzz targets) that need no other crate.
pub use bytes;

pub use codec::{bytes_needed, decode, encode, encode_to_bytes, DecodeError, EncodeError};
pub use message::*;

#[cfg(test)]
mod tests;
