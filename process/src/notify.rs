//! systemd's readiness protocol (`Type=notify`): one datagram to `$NOTIFY_SOCKET` saying
//! `READY=1` once the process serves, and `STOPPING=1` when it starts to drain. Without the
//! variable (not under systemd) every call does nothing.

use std::os::unix::net::UnixDatagram;

/// Sends `state` (for example `READY=1\nSTATUS=serving`) to systemd, if it is listening.
pub fn notify(state: &str) {
    let Some(path) = std::env::var_os("NOTIFY_SOCKET") else {
        return;
    };
    let Ok(sock) = UnixDatagram::unbound() else {
        return;
    };
    let bytes = path.as_encoded_bytes();
    let sent = if let Some(name) = bytes.strip_prefix(b"@") {
        // An abstract socket (Linux): the name after '@'.
        use std::os::linux::net::SocketAddrExt;
        std::os::unix::net::SocketAddr::from_abstract_name(name)
            .and_then(|addr| sock.send_to_addr(state.as_bytes(), &addr))
    } else {
        sock.send_to(state.as_bytes(), std::path::Path::new(&path))
    };
    if let Err(e) = sent {
        tracing::warn!(error = %e, "cannot notify systemd");
    }
}

/// The service is ready.
pub fn ready(status: &str) {
    notify(&format!("READY=1\nSTATUS={status}"));
}

/// The service is stopping (draining).
pub fn stopping(status: &str) {
    notify(&format!("STOPPING=1\nSTATUS={status}"));
}

#[cfg(test)]
mod tests {
    #[test]
    fn the_datagram_reaches_the_socket() {
        let dir = std::env::temp_dir().join(format!("tether-notify-{}", std::process::id()));
        let _ = std::fs::create_dir_all(&dir);
        let path = dir.join("notify.sock");
        let _ = std::fs::remove_file(&path);
        let Ok(listener) = std::os::unix::net::UnixDatagram::bind(&path) else {
            return;
        };
        std::env::set_var("NOTIFY_SOCKET", &path);
        super::ready("serving");
        std::env::remove_var("NOTIFY_SOCKET");
        let mut buf = [0u8; 128];
        let n = listener.recv(&mut buf).unwrap_or(0);
        assert_eq!(&buf[..n], b"READY=1\nSTATUS=serving");
        let _ = std::fs::remove_dir_all(&dir);
    }
}
