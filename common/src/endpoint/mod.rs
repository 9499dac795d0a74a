//! Local HTTP/1 endpoints: the [`http`] request parser (the only one), [`client_slots`] that bound
//! what each client may hold, and the [`admin`] endpoint built on both. The server's egress proxy
//! uses the same two.

pub mod admin;
pub mod client_slots;
pub mod http;
