/// Normal close.
pub const OK: u32 = 0;
/// The TCP connection at the other end was reset; the reset travels on.
pub const RESET: u32 = 1;
/// The peer broke the protocol.
pub const PROTOCOL: u32 = 2;
/// The process is shutting down.
pub const SHUTDOWN: u32 = 3;
/// A limit was reached.
pub const LIMIT: u32 = 4;
/// The node was revoked.
pub const REVOKED: u32 = 5;
/// The peer's credentials were refused.
pub const REFUSED: u32 = 6;
