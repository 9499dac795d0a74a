//! `tether-agent diagnose`: why this node cannot connect, found by doing what `run` does one
//! step at a time, with the same settings, and saying where it stops: the settings, the data
//! directory and certificate, DNS for each server, QUIC then TCP, the TLS handshake and the CA
//! pin, the proxy, the clock against each server, the local listener, and the running agent's
//! admin endpoint. Each is a [`Check`] (ok, warn or fail, with a hint); nothing is changed on
//! the node, and a tunnel dialed here is closed at once.

use crate::config::AgentConfig;
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::SystemTime;
use tether_link::reconnect::{self, DialTarget, TransportChoice};
use tether_process::diagnose::{Check, Report};
use tether_proto::{capability, Message, MIN_PROTOCOL_VERSION, PROTOCOL_VERSION};
use tether_transport::tls;
use tether_transport::transport::tcp::TcpTunnel;
use tether_transport::transport::Tunnel;

/// How far a server's clock may be from this node's before the check warns.
const CLOCK_WARN_MS: i64 = 30_000;
/// And before it fails: certificates made by a server that far ahead are not valid yet here.
const CLOCK_FAIL_MS: i64 = 300_000;
/// A certificate closer than this to its expiry is a warning (renewal comes at two thirds of
/// its life, so a healthy agent never gets here).
const EXPIRY_WARN: i64 = 7 * 86_400;

/// The identity this node has: its TLS client settings for tunnels, or for a join.
enum Identity {
    Joined(rustls::ClientConfig),
    /// Not joined yet: the join's TLS, pinned to the token's CA.
    Joining(rustls::ClientConfig),
    None,
}

/// Runs every check against `config` (the settings `run` would use).
pub async fn diagnose(config: &AgentConfig) -> Report {
    let mut r = Report::default();
    let servers = config.servers.join(", ");
    r.push(Check::ok(
        "settings",
        format!(
            "servers {servers}; transport {}; data in {}",
            config.transport,
            config
                .cert
                .parent()
                .map_or("?".into(), |p| p.display().to_string())
        ),
    ));
    let identity = certificate(config, &mut r);
    let endpoint = tether_endpoint::net::quic_endpoint(SocketAddr::from(([0u8; 4], 0)), None).ok();
    let mut reached = 0;
    for (rank, server) in config.servers.iter().enumerate() {
        let targets = match reconnect::resolve(server, rank).await {
            Ok(t) if !t.is_empty() => {
                let addrs: Vec<String> = t.iter().map(|t| t.addr.to_string()).collect();
                r.push(Check::ok(format!("dns {server}"), addrs.join(", ")));
                t
            }
            Ok(_) | Err(_) => {
                r.push(Check::fail(
                    format!("dns {server}"),
                    "the name does not resolve",
                    "check /etc/resolv.conf and the name; or give the server's address",
                ));
                continue;
            }
        };
        let t = &targets[0];
        if reach(config, &identity, endpoint.as_ref(), t, &mut r).await {
            reached += 1;
        }
    }
    proxy(config, &mut r).await;
    if reached == 0 && !config.servers.is_empty() {
        r.push(Check::fail(
            "servers",
            "no server could be reached",
            "see the checks above; the node cannot connect until one can",
        ));
    }
    r.push(tether_process::diagnose::listener(
        config.listen,
        "tether-agent",
        "--listen",
    ));
    let admin = config.admin;
    r.push(
        tokio::task::spawn_blocking(move || {
            tether_process::diagnose::admin(admin, "tether-agent", "127.0.0.1:8182")
        })
        .await
        .unwrap_or_else(|e| Check::fail("admin", e.to_string(), "a bug: report it")),
    );
    r
}

/// The data directory and the certificate: present, this node's, signed by the CA it holds,
/// and not about to expire. Returns what TLS to dial with.
fn certificate(config: &AgentConfig, r: &mut Report) -> Identity {
    let token = config
        .token
        .as_deref()
        .and_then(|t| t.parse::<tether_trust::token::Token>().ok());
    if !config.cert.exists() {
        return match (&config.token, &token) {
            (Some(_), Some(tok)) => {
                r.push(Check::warn(
                    "certificate",
                    format!("none in {} yet", config.cert.display()),
                    "`run` joins with the token first; the checks below use the join's TLS",
                ));
                match tls::join_client_config(&tok.ca_hash, config.limits.post_quantum) {
                    Ok(c) => Identity::Joining(c),
                    Err(_) => Identity::None,
                }
            }
            (Some(_), None) => {
                r.push(Check::fail(
                    "certificate",
                    "no certificate, and the token is not a tether join token",
                    "copy the token again from `tether-server token create`",
                ));
                Identity::None
            }
            (None, _) => {
                r.push(Check::fail(
                    "certificate",
                    format!("no certificate at {}, and no token", config.cert.display()),
                    "join with `--token-file FILE` (a token from `tether-server token create`)",
                ));
                Identity::None
            }
        };
    }
    let read = |p: &std::path::Path| std::fs::read_to_string(p);
    let (cert, key, ca) = match (read(&config.cert), read(&config.key), read(&config.ca)) {
        (Ok(c), Ok(k), Ok(a)) => (c, k, a),
        (c, k, a) => {
            let missing: Vec<String> = [(&c, &config.cert), (&k, &config.key), (&a, &config.ca)]
                .iter()
                .filter_map(|(r, p)| r.as_ref().err().map(|e| format!("{}: {e}", p.display())))
                .collect();
            r.push(Check::fail(
                "certificate",
                format!("cannot read {}", missing.join("; ")),
                "the data directory must hold ca.crt, agent.crt and agent.key, readable by this user",
            ));
            return Identity::None;
        }
    };
    let info = tether_trust::pem_to_der(&cert, &config.cert)
        .ok()
        .and_then(|der| tls::peer_info(&der.into()));
    let Some(info) = info else {
        r.push(Check::fail(
            "certificate",
            format!("{} is not a certificate", config.cert.display()),
            "join again: remove the data directory's agent.crt and agent.key and start with a token",
        ));
        return Identity::None;
    };
    let now = tether_process::units::unix_seconds(SystemTime::now()) as i64;
    if let Err(e) = tether_trust::check_issued(&cert, &ca, &info.common_name, &key, now) {
        r.push(Check::fail(
            "certificate",
            format!("node {}: {e}", info.common_name),
            "join again with a new token (`tether-server token create`)",
        ));
        return Identity::None;
    }
    let left = info.not_after - now;
    let when = tether_process::units::format_unix(info.not_after);
    if left < EXPIRY_WARN {
        r.push(Check::warn(
            "certificate",
            format!("node {}, expires {when}", info.common_name),
            "renewal is due: is a server reachable? (checks below)",
        ));
    } else {
        r.push(Check::ok(
            "certificate",
            format!(
                "node {}, expires {when}, signed by the CA in {}",
                info.common_name,
                config.ca.display()
            ),
        ));
    }
    if let Some(tok) = &token {
        let pinned = tether_trust::pem_to_der(&ca, &config.ca)
            .map(|der| tether_trust::token::ca_hash(&der) == tok.ca_hash)
            .unwrap_or(false);
        if pinned {
            r.push(Check::ok("ca pin", "the token pins the CA in ca.crt"));
        } else {
            r.push(Check::warn(
                "ca pin",
                "the token pins another CA than the one in ca.crt",
                "the token is of another cluster, or the CA was replaced: the certificate is used, the token is not",
            ));
        }
    }
    let roots = tls::load_roots(&config.ca);
    let id = tls::Identity::load(&config.cert, &config.key);
    match (roots, id) {
        (Ok(roots), Ok(id)) => tls::client_config(roots, id, config.limits.post_quantum)
            .map_or(Identity::None, Identity::Joined),
        _ => Identity::None,
    }
}

/// QUIC, then TCP (directly or through the proxy), then TLS and the hello on what worked;
/// true when a tunnel could be had.
async fn reach(
    config: &AgentConfig,
    identity: &Identity,
    endpoint: Option<&quinn::Endpoint>,
    t: &DialTarget,
    r: &mut Report,
) -> bool {
    let (tls_config, joined) = match identity {
        Identity::Joined(c) => (c.clone(), true),
        Identity::Joining(c) => (c.clone(), false),
        Identity::None => return tcp_only(config, t, r).await,
    };
    let wait = config.handshake_timeout;
    let mut tunnel = None;
    if config.transport != TransportChoice::Tcp {
        let name = format!("quic {}", t.label);
        let client = tls::quic_client_config(
            tls_config.clone(),
            tls::quic_transport(config.liveness, config.limits),
        );
        let dial = async {
            let ep = endpoint.ok_or("no UDP socket")?;
            let client = client.map_err(|_| "no QUIC settings")?;
            let connecting = ep
                .connect_with(client, t.addr, &t.name)
                .map_err(|_| "cannot start a QUIC handshake")?;
            Ok::<_, &str>(connecting)
        };
        match dial.await {
            Ok(connecting) => match tokio::time::timeout(wait, connecting).await {
                Ok(Ok(conn)) => {
                    let tun = Tunnel::from_quic(conn, tls::INITIAL_STREAMS);
                    r.push(Check::ok(name, handshake(&tun)));
                    tunnel = Some(tun);
                }
                Ok(Err(e)) => r.push(quic_failed(config, name, e.to_string())),
                Err(_) => r.push(quic_failed(
                    config,
                    name,
                    format!("no answer within {wait:?}"),
                )),
            },
            Err(e) => r.push(quic_failed(config, name, e.to_string())),
        }
    }
    if config.transport != TransportChoice::Quic {
        let name = format!("tcp {}", t.label);
        let proxy = config
            .proxy
            .as_ref()
            .filter(|p| p.applies_to(reconnect::host_of(&t.label)));
        let tcp = match proxy {
            Some(p) => p.connect(&t.label, wait).await.map_err(|e| e.to_string()),
            None => tokio::time::timeout(wait, tokio::net::TcpStream::connect(t.addr))
                .await
                .map_err(|_| format!("no answer within {wait:?}"))
                .and_then(|c| c.map_err(|e| e.to_string())),
        };
        let via = proxy.map_or(String::new(), |p| format!(" through the proxy {p}"));
        match tcp {
            Ok(s) => {
                r.push(Check::ok(name, format!("connected{via}")));
                let shake = TcpTunnel::connect_over(
                    s,
                    t.addr,
                    &t.name,
                    Arc::new(tls_config),
                    config.liveness,
                    tls::INITIAL_STREAMS as usize,
                );
                let name = format!("tls {}", t.label);
                match tokio::time::timeout(wait, shake).await {
                    Ok(Ok(tun)) => {
                        let tun = Tunnel::from_tcp(tun);
                        r.push(Check::ok(name, handshake(&tun)));
                        tunnel.get_or_insert(tun);
                    }
                    Ok(Err(e)) => r.push(tls_failed(name, e.to_string())),
                    Err(_) => r.push(Check::fail(
                        name,
                        format!("no TLS answer within {wait:?}"),
                        "something on the way holds the connection without answering: a firewall or a proxy",
                    )),
                }
            }
            Err(e) => r.push(Check::fail(
                name,
                format!("{e}{via}"),
                "a firewall between the node and the server, or no server listening on that port",
            )),
        }
    }
    let Some(tunnel) = tunnel else {
        return false;
    };
    if joined {
        clock(config, &tunnel, t, r).await;
    }
    tunnel.close(tether_proto::code::OK, "diagnose");
    true
}

/// With no identity to handshake with: only whether the server's port answers over TCP.
async fn tcp_only(config: &AgentConfig, t: &DialTarget, r: &mut Report) -> bool {
    let name = format!("tcp {}", t.label);
    let wait = config.handshake_timeout;
    match tokio::time::timeout(wait, tokio::net::TcpStream::connect(t.addr)).await {
        Ok(Ok(_)) => {
            r.push(Check::ok(
                name,
                "connected (no TLS check without a certificate or a token)",
            ));
            true
        }
        _ => {
            r.push(Check::fail(
                name,
                "no connection",
                "a firewall between the node and the server, or no server listening on that port",
            ));
            false
        }
    }
}

fn handshake(t: &Tunnel) -> String {
    format!(
        "TLS 1.3 in {:.0} ms, server certificate verified, key exchange {}",
        t.rtt().as_secs_f64() * 1000.0,
        t.key_exchange().unwrap_or("unknown")
    )
}

fn quic_failed(config: &AgentConfig, name: String, why: String) -> Check {
    if why.contains("certificate") || why.contains("join token") {
        return tls_failed(name, why);
    }
    if config.transport == TransportChoice::Auto {
        Check::warn(
            name,
            format!("no QUIC: {why}"),
            "UDP is blocked on the way, most likely; the agent uses TLS over TCP (checked next)",
        )
    } else {
        Check::fail(
            name,
            format!("no QUIC: {why}"),
            "UDP is blocked on the way, most likely: allow UDP to the server's port, or use --transport auto",
        )
    }
}

fn tls_failed(name: String, why: String) -> Check {
    let hint = if why.contains("join token") {
        "the server's CA is not the one the token pins: a token of another cluster, or a server impersonated"
    } else if why.contains("certificate") {
        "the server's certificate is not signed by this node's CA, or does not name the address dialed (the server's --san)"
    } else {
        "see the server's log for the other side of the handshake"
    };
    Check::fail(name, why, hint)
}

/// The hello on a tunnel, and the server's clock from it (servers of 0.3 and later).
async fn clock(config: &AgentConfig, tunnel: &Tunnel, t: &DialTarget, r: &mut Report) {
    let name = format!("clock {}", t.label);
    let asked = async {
        let mut control = tunnel.open_stream().await.map_err(|e| e.to_string())?;
        let hello = Message::Hello {
            min_version: MIN_PROTOCOL_VERSION,
            max_version: PROTOCOL_VERSION,
            node_name: String::new(),
            capabilities: vec![capability::CLOCK.to_string()],
        };
        control
            .send
            .write_message(&hello)
            .await
            .map_err(|e| e.to_string())?;
        loop {
            match control.recv.read_message().await {
                Ok(Some(Message::Clock { unix_ms })) => return Ok(Some(unix_ms)),
                Ok(Some(Message::Welcome { .. })) => continue,
                // Anything else after the welcome: a server that says no clock.
                Ok(Some(_)) => return Ok(None),
                Ok(None) => return Err("the server closed the control stream".to_string()),
                Err(e) => return Err(e.to_string()),
            }
        }
    };
    match tokio::time::timeout(config.handshake_timeout, asked).await {
        Ok(Ok(Some(unix_ms))) => {
            let now = tether_process::units::unix_millis(SystemTime::now()) as i64;
            let half_rtt = (tunnel.rtt().as_millis() / 2) as i64;
            let skew = (unix_ms.min(i64::MAX as u64) as i64) + half_rtt - now;
            let detail = format!(
                "the server's clock is {:+.1} s from this node's",
                skew as f64 / 1000.0
            );
            let hint = "certificates, tokens and renewals are checked by the clock: set up NTP (chrony, systemd-timesyncd)";
            r.push(match skew.abs() {
                s if s >= CLOCK_FAIL_MS => Check::fail(name, detail, hint),
                s if s >= CLOCK_WARN_MS => Check::warn(name, detail, hint),
                _ => Check::ok(name, detail),
            });
        }
        Ok(Ok(None)) | Err(_) => r.push(Check::warn(
            name,
            "the server did not say its clock",
            "servers before 0.3 do not; upgrade them to see the clocks compared",
        )),
        Ok(Err(e)) => r.push(Check::fail(
            name,
            format!("the server refused the tunnel: {e}"),
            "a revoked or forgotten node, or a name another key owns: see the server's log",
        )),
    }
}

/// The proxy, when one is set: reachable, and whether servers go through it.
async fn proxy(config: &AgentConfig, r: &mut Report) {
    let Some(p) = &config.proxy else {
        r.push(Check::ok(
            "proxy",
            "none: TLS over TCP dials the servers directly",
        ));
        return;
    };
    let wait = config.handshake_timeout;
    match tokio::time::timeout(wait, tokio::net::TcpStream::connect(&p.addr)).await {
        Ok(Ok(_)) => {
            let through: Vec<&str> = config
                .servers
                .iter()
                .filter(|s| p.applies_to(reconnect::host_of(s)))
                .map(String::as_str)
                .collect();
            r.push(Check::ok(
                "proxy",
                format!(
                    "{p} answers; through it: {}",
                    if through.is_empty() {
                        "none (NO_PROXY)".into()
                    } else {
                        through.join(", ")
                    }
                ),
            ));
        }
        _ => r.push(Check::fail(
            "proxy",
            format!("{p} does not answer"),
            "check --proxy (or HTTPS_PROXY) and that the proxy runs",
        )),
    }
}
