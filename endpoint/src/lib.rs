//! Local endpoints: the one HTTP/1 module, per-client slots, the admin endpoint (`/metrics`,
//! `/healthz`, `/readyz`, `/status`) and the status document it serves, and the sockets a
//! process binds (TCP listeners, QUIC endpoints, the host's addresses).
#![forbid(unsafe_code)]

pub mod admin;
pub mod client_slots;
pub mod http;
pub mod net;
pub mod status;
