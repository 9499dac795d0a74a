//! Failover figures: how long new connections fail after the server in use is killed, and how
//! long an agent takes to notice a server whose packets silently vanish while another server
//! answers (a silence of every server is a link blackout, held for the tolerance instead).
//!
//! Silence is made without root by a relay the bench owns between the agent and the server
//! (UDP for QUIC, TCP for the fallback): it forwards until told to drop everything.

use crate::load::{listen, probe, Upstream};
use crate::path::{Agent, Pki, Server};
use crate::procs::wait_until;
use anyhow::{Context, Result};
use std::io::{Read, Write};
use std::net::{SocketAddr, TcpStream, UdpSocket};
use std::path::Path;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::thread;
use std::time::{Duration, Instant};

/// What one transport's failover runs measured.
#[derive(Debug, Clone, serde::Serialize)]
pub struct Failover {
    pub transport: String,
    /// From `kill -9` of the server in use to the first new connection that got its echo.
    pub kill_to_first_success_ms: f64,
    /// Connection attempts that failed in between.
    pub failed_attempts: u64,
    /// From the moment every packet of a tunnel is dropped, with a request in flight on it and
    /// another server answering, to the agent closing that tunnel.
    pub silent_drop_detected_ms: f64,
}

pub fn measure(work: &Path, pki: &Pki, up: &Upstream, transport: &str) -> Result<Failover> {
    let (kill_ms, failed) = kill_server_in_use(work, pki, up, transport)?;
    let drop_ms = silent_drop(work, pki, up, transport)?;
    Ok(Failover {
        transport: transport.into(),
        kill_to_first_success_ms: kill_ms,
        failed_attempts: failed,
        silent_drop_detected_ms: drop_ms,
    })
}

fn kill_server_in_use(
    work: &Path,
    pki: &Pki,
    up: &Upstream,
    transport: &str,
) -> Result<(f64, u64)> {
    let mut a = Server::start(
        work,
        pki,
        &format!("fo-a-{transport}"),
        up.echo,
        up.sink,
        &[],
    )?;
    let b = Server::start(
        work,
        pki,
        &format!("fo-b-{transport}"),
        up.echo,
        up.sink,
        &[],
    )?;
    let agent = Agent::start(
        work,
        pki,
        &format!("fo-agent-{transport}"),
        &[a.addr.to_string(), b.addr.to_string()],
        transport,
        &["--policy".into(), "ordered".into()],
    )?;
    // Ordered: every connection goes to the first server until it fails.
    probe(agent.api, Duration::from_secs(3)).context("echo before the kill")?;
    let start = Instant::now();
    a.proc.kill();
    let mut failed = 0;
    loop {
        if probe(agent.api, Duration::from_secs(5)).is_ok() {
            break;
        }
        failed += 1;
        if start.elapsed() > Duration::from_secs(30) {
            anyhow::bail!("no connection succeeded within 30 s of the kill");
        }
        thread::sleep(Duration::from_millis(5));
    }
    let ms = start.elapsed().as_secs_f64() * 1000.0;
    drop((agent, b));
    Ok((ms, failed))
}

fn silent_drop(work: &Path, pki: &Pki, up: &Upstream, transport: &str) -> Result<f64> {
    let relay = Relay::new()?;
    // The server announces the relay's address, so that the agent never learns its own.
    let server = Server::start(
        work,
        pki,
        &format!("drop-server-{transport}"),
        up.echo,
        up.sink,
        &["--advertise".into(), relay.addr.to_string()],
    )?;
    relay.start(server.addr)?;
    // A second server that keeps answering: without it, the silence would be the link's.
    let witness = Server::start(
        work,
        pki,
        &format!("drop-witness-{transport}"),
        up.echo,
        up.sink,
        &[],
    )?;
    let agent = Agent::start(
        work,
        pki,
        &format!("drop-agent-{transport}"),
        &[relay.addr.to_string(), witness.addr.to_string()],
        transport,
        &["--policy".into(), "ordered".into()],
    )?;
    // A connection on the relayed server (first in order), proven, then the silence, and a
    // request on the connection: the question nobody answers.
    let mut held = TcpStream::connect_timeout(&agent.api, Duration::from_secs(3))?;
    held.set_read_timeout(Some(Duration::from_secs(5)))?;
    let mut back = [0u8; 8];
    held.write_all(b"request!")?;
    held.read_exact(&mut back)
        .context("echo before the silence")?;
    let start = Instant::now();
    relay.blackhole.store(true, Ordering::Relaxed);
    held.write_all(b"request!")?;
    wait_until(
        "the agent notices the silence",
        Duration::from_secs(20),
        || agent.tunnels_up() == 1.0,
    )?;
    let ms = start.elapsed().as_secs_f64() * 1000.0;
    drop((agent, server, witness, held));
    Ok(ms)
}

/// Forwards UDP datagrams and TCP connections on one port to a server until `blackhole` is
/// set; from then on nothing passes either way, as when a link dies without a word.
struct Relay {
    addr: SocketAddr,
    udp: UdpSocket,
    tcp: std::net::TcpListener,
    blackhole: Arc<AtomicBool>,
}

impl Relay {
    fn new() -> Result<Relay> {
        // The TCP listener picks the port; the UDP socket takes the same number.
        for _ in 0..20 {
            let tcp = listen()?;
            let addr = tcp.local_addr()?;
            if let Ok(udp) = UdpSocket::bind(addr) {
                return Ok(Relay {
                    addr,
                    udp,
                    tcp,
                    blackhole: Arc::new(AtomicBool::new(false)),
                });
            }
        }
        anyhow::bail!("no port free for both UDP and TCP")
    }

    fn start(&self, server: SocketAddr) -> Result<()> {
        // UDP: one client (the agent); its address is learned from its first datagram.
        let front = self.udp.try_clone()?;
        let back = UdpSocket::bind("127.0.0.1:0")?;
        back.connect(server)?;
        let client: Arc<Mutex<Option<SocketAddr>>> = Arc::default();
        {
            let (front, back, client, hole) = (
                front.try_clone()?,
                back.try_clone()?,
                client.clone(),
                self.blackhole.clone(),
            );
            thread::spawn(move || {
                let mut buf = vec![0u8; 65536];
                while let Ok((n, from)) = front.recv_from(&mut buf) {
                    *client.lock().unwrap_or_else(|p| p.into_inner()) = Some(from);
                    if !hole.load(Ordering::Relaxed) {
                        let _ = back.send(&buf[..n]);
                    }
                }
            });
        }
        {
            let hole = self.blackhole.clone();
            thread::spawn(move || {
                let mut buf = vec![0u8; 65536];
                while let Ok(n) = back.recv(&mut buf) {
                    let to = *client.lock().unwrap_or_else(|p| p.into_inner());
                    if let (Some(to), false) = (to, hole.load(Ordering::Relaxed)) {
                        let _ = front.send_to(&buf[..n], to);
                    }
                }
            });
        }
        // TCP: a pair of copy threads per connection, which stop copying at the blackhole.
        let listener = self.tcp.try_clone()?;
        let hole = self.blackhole.clone();
        thread::spawn(move || {
            for c in listener.incoming().flatten() {
                let Ok(s) = TcpStream::connect(server) else {
                    continue;
                };
                for (from, to) in [
                    (c.try_clone(), s.try_clone()),
                    (s.try_clone(), c.try_clone()),
                ] {
                    if let (Ok(mut from), Ok(mut to)) = (from, to) {
                        let hole = hole.clone();
                        thread::spawn(move || {
                            let mut buf = vec![0u8; 65536];
                            while let Ok(n) = from.read(&mut buf) {
                                if n == 0 {
                                    let _ = to.shutdown(std::net::Shutdown::Write);
                                    return;
                                }
                                if hole.load(Ordering::Relaxed) {
                                    // Silent: keep the sockets open, pass nothing.
                                    while hole.load(Ordering::Relaxed) {
                                        thread::sleep(Duration::from_millis(100));
                                    }
                                    return;
                                }
                                if to.write_all(&buf[..n]).is_err() {
                                    return;
                                }
                            }
                        });
                    }
                }
            }
        });
        Ok(())
    }
}
