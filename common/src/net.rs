//! Socket helpers.

use std::io;
use std::net::SocketAddr;
use tokio::net::{TcpListener, TcpSocket};

/// Accept backlog of every listener tether opens. The default of the standard library and mio
/// (128) overflows when many clients connect at once (all kubelets after a network blip, a
/// benchmark): the kernel then drops or resets connections before tether sees them.
pub const LISTEN_BACKLOG: u32 = 4096;

/// Binds a TCP listener with [`LISTEN_BACKLOG`] and `SO_REUSEADDR` (so that a restarted process
/// can bind again while old connections linger in TIME_WAIT).
pub fn listen_tcp(addr: SocketAddr) -> io::Result<TcpListener> {
    let socket = if addr.is_ipv4() {
        TcpSocket::new_v4()?
    } else {
        TcpSocket::new_v6()?
    };
    socket.set_reuseaddr(true)?;
    socket.bind(addr)?;
    socket.listen(LISTEN_BACKLOG)
}
