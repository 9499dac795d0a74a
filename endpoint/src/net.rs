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
/// default.
pub fn host_addresses() -> Vec<std::net::IpAddr> {
    interface_addresses(|_| true)
}

/// The addresses of the interfaces `keep` names, loopback and link-local excluded, IPv4 first
/// (it is what most clusters dial).
fn interface_addresses(keep: impl Fn(&str) -> bool) -> Vec<std::net::IpAddr> {
    let mut v: Vec<_> = if_addrs::get_if_addrs()
        .unwrap_or_default()
        .into_iter()
        .filter(|i| !i.is_loopback() && keep(&i.name))
        .map(|i| i.ip())
        .filter(|ip| match ip {
            std::net::IpAddr::V4(a) => !a.is_link_local(),
            std::net::IpAddr::V6(a) => (a.segments()[0] & 0xffc0) != 0xfe80,
        })
        .collect();
    v.sort_by_key(|ip| ip.is_ipv6());
    v.dedup();
    v
}

/// The node's own addresses, as the control plane should reach it: those of the interfaces that
/// carry a default route (IPv4 first), read from `/proc/net/route` and `/proc/net/ipv6_route`.
/// Container bridges (docker0, cni0), IPVS's dummy interface holding every Service ClusterIP,
/// and the like carry no default route, so they are never included: reaching one of those
/// addresses would forward into other pods or nodes. Empty when there is no default route.
pub fn default_route_addresses() -> Vec<std::net::IpAddr> {
    let mut ifaces: Vec<String> = Vec::new();
    if let Ok(text) = std::fs::read_to_string("/proc/net/route") {
        // Iface Destination Gateway ...: a default route has destination 00000000.
        for l in text.lines().skip(1) {
            let f: Vec<&str> = l.split_whitespace().collect();
            if f.len() > 1 && f[1] == "00000000" && !ifaces.iter().any(|i| i == f[0]) {
                ifaces.push(f[0].to_string());
            }
        }
    }
    if let Ok(text) = std::fs::read_to_string("/proc/net/ipv6_route") {
        // dest prefix-len src src-len next-hop metric refcnt use flags iface.
        for l in text.lines() {
            let f: Vec<&str> = l.split_whitespace().collect();
            let default = f.len() == 10 && f[0].bytes().all(|b| b == b'0') && f[1] == "00";
            if default && f[9] != "lo" && !ifaces.iter().any(|i| i == f[9]) {
                ifaces.push(f[9].to_string());
            }
        }
    }
    interface_addresses(|name| ifaces.iter().any(|i| i == name))
}

/// Which process holds a local TCP port in the listening state, as `PID (COMMAND)`, where
/// `/proc` lets this user read it: the inode of the listening socket in `/proc/net/tcp{,6}`,
/// then the process whose descriptors include it. `None` when it cannot be told (another
/// user's process, with no permission to read its descriptors).
pub fn port_holder(port: u16) -> Option<String> {
    let mut inodes = Vec::new();
    for table in ["/proc/net/tcp", "/proc/net/tcp6"] {
        let Ok(text) = std::fs::read_to_string(table) else {
            continue;
        };
        for l in text.lines().skip(1) {
            let f: Vec<&str> = l.split_whitespace().collect();
            // sl local_address rem_address st ... inode (10th field); 0A is LISTEN.
            if f.len() < 10 || f[3] != "0A" {
                continue;
            }
            let local_port = f[1]
                .rsplit_once(':')
                .and_then(|(_, p)| u16::from_str_radix(p, 16).ok());
            if local_port == Some(port) {
                inodes.push(format!("socket:[{}]", f[9]));
            }
        }
    }
    if inodes.is_empty() {
        return None;
    }
    for proc_dir in std::fs::read_dir("/proc").ok()?.flatten() {
        let name = proc_dir.file_name();
        let Some(pid) = name
            .to_str()
            .filter(|n| n.bytes().all(|b| b.is_ascii_digit()))
        else {
            continue;
        };
        let Ok(fds) = std::fs::read_dir(proc_dir.path().join("fd")) else {
            continue;
        };
        for fd in fds.flatten() {
            let held = std::fs::read_link(fd.path())
                .ok()
                .is_some_and(|t| inodes.iter().any(|i| t.as_os_str() == i.as_str()));
            if held {
                let comm = std::fs::read_to_string(proc_dir.path().join("comm"))
                    .map(|c| c.trim().to_string())
                    .unwrap_or_default();
                return Some(format!("{pid} ({comm})"));
            }
        }
    }
    None
}

/// How long an accept loop pauses after a failed accept.
pub const ACCEPT_PAUSE: std::time::Duration = std::time::Duration::from_millis(50);

/// The next connection from `accept` (a listener's accept, called anew each try). A failed
/// accept (out of file descriptors, mostly) is passed to `on_error` to log, and the loop pauses
/// [`ACCEPT_PAUSE`] rather than spin on an error that persists. Cancel-safe: every listener's
/// accept loop uses it under a `select!` with its stop signal.
pub async fn accept_retrying<T, F, Fut>(accept: F, on_error: impl Fn(&io::Error)) -> T
where
    F: Fn() -> Fut,
    Fut: std::future::Future<Output = io::Result<T>>,
{
    loop {
        match accept().await {
            Ok(c) => return c,
            Err(e) => {
                on_error(&e);
                tokio::time::sleep(ACCEPT_PAUSE).await;
            }
        }
    }
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

/// What QUIC sockets ask for as send and receive buffers. Linux's default (208 KiB) overflows
/// at a few hundred megabits per second and every overflow is a lost packet, which QUIC's
/// congestion control answers by slowing down; the kernel caps the request at
/// `net.core.rmem_max` / `wmem_max` (see docs/performance.md).
pub const UDP_BUFFER: usize = 8 * 1024 * 1024;

/// Largest UDP payload a tether endpoint receives: an Ethernet frame's, over IPv4.
pub const MAX_UDP_PAYLOAD: u16 = 1472;

/// A QUIC endpoint on a UDP socket with large buffers: a server when `server` is given.
pub fn quic_endpoint(
    addr: SocketAddr,
    server: Option<quinn::ServerConfig>,
) -> io::Result<quinn::Endpoint> {
    let sock = udp_socket(addr)?;
    log_offload(&sock);
    let runtime =
        quinn::default_runtime().ok_or_else(|| io::Error::other("no async runtime for QUIC"))?;
    quinn::Endpoint::new(endpoint_config()?, server, sock, runtime)
}

/// Says once per process whether the kernel batches QUIC's datagrams: GSO (one send of many
/// datagrams) and GRO (one receive of many) cut the per-packet system calls that dominate a
/// QUIC bulk transfer, so an operator chasing throughput wants to know.
fn log_offload(sock: &std::net::UdpSocket) {
    static ONCE: std::sync::Once = std::sync::Once::new();
    ONCE.call_once(|| match quinn::udp::UdpSocketState::new(sock.into()) {
        Ok(state) => tracing::info!(
            gso_segments = state.max_gso_segments(),
            gro_segments = state.gro_segments(),
            "UDP offload for QUIC (segments per send and per receive; 1 means none)"
        ),
        Err(e) => tracing::debug!(error = %e, "cannot read the UDP offload settings"),
    });
}

/// The endpoint settings every tether QUIC endpoint shares.
pub fn endpoint_config() -> io::Result<quinn::EndpointConfig> {
    // quinn sizes each endpoint's receive buffers by the largest datagram it accepts (64 KiB
    // by default, for every slot of a receive batch: megabytes per agent). Paths carry at most
    // Ethernet-sized datagrams, and MTU discovery stops at 1452 bytes anyway.
    let mut config = quinn::EndpointConfig::default();
    config
        .max_udp_payload_size(MAX_UDP_PAYLOAD)
        .map_err(|e| io::Error::other(e.to_string()))?;
    Ok(config)
}

/// A non-blocking UDP socket for QUIC, bound to `addr`, with buffers of [`UDP_BUFFER`] where
/// the kernel grants them (a warning, once, where it does not).
pub fn udp_socket(addr: SocketAddr) -> io::Result<std::net::UdpSocket> {
    use socket2::{Domain, Protocol, Socket, Type};
    let domain = if addr.is_ipv6() {
        Domain::IPV6
    } else {
        Domain::IPV4
    };
    let sock = Socket::new(domain, Type::DGRAM, Some(Protocol::UDP))?;
    if addr.is_ipv6() {
        // One socket for both families when bound to [::].
        let _ = sock.set_only_v6(false);
    }
    // Best effort: the kernel silently caps both at its maximum.
    let _ = sock.set_recv_buffer_size(UDP_BUFFER);
    let _ = sock.set_send_buffer_size(UDP_BUFFER);
    sock.bind(&addr.into())?;
    sock.set_nonblocking(true)?;
    if let Ok(got) = sock.recv_buffer_size() {
        // Linux reports twice what it grants.
        if got / 2 < UDP_BUFFER / 4 {
            static ONCE: std::sync::Once = std::sync::Once::new();
            ONCE.call_once(|| {
                tracing::warn!(
                    granted_kib = got / 2 / 1024,
                    wanted_kib = UDP_BUFFER / 1024,
                    "the kernel caps the UDP receive buffer; QUIC throughput will suffer: \
                     raise net.core.rmem_max and net.core.wmem_max (docs/performance.md)"
                )
            });
        }
    }
    Ok(sock.into())
}
