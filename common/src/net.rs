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

/// The host's own addresses, loopback and link-local excluded: what a server advertises by
/// default and what an agent reports as its node's addresses.
pub fn host_addresses() -> Vec<std::net::IpAddr> {
    let mut v: Vec<_> = if_addrs::get_if_addrs()
        .unwrap_or_default()
        .into_iter()
        .filter(|i| !i.is_loopback())
        .map(|i| i.ip())
        .filter(|ip| match ip {
            std::net::IpAddr::V4(a) => !a.is_link_local(),
            std::net::IpAddr::V6(a) => (a.segments()[0] & 0xffc0) != 0xfe80,
        })
        .collect();
    // IPv4 first: it is what most clusters dial.
    v.sort_by_key(|ip| ip.is_ipv6());
    v.dedup();
    v
}

/// Raises the soft limit on open files to the hard limit and returns the new soft limit.
///
/// A server on TLS over TCP holds one descriptor per agent and per relayed stream, and the
/// default soft limit (often 1,024) would cap it far below what it can carry; the hard limit is
/// what the operator (or systemd's `LimitNOFILE`) allows.
pub fn raise_fd_limit() -> std::io::Result<u64> {
    let (soft, hard) = rlimit::Resource::NOFILE.get()?;
    if soft < hard {
        rlimit::Resource::NOFILE.set(hard, hard)?;
    }
    Ok(hard.max(soft))
}
