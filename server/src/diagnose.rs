//! `tether-server diagnose`: what stands between this master and its job, with the settings
//! of `run`, one check at a time: the certificates, the datastore (the data directory, or
//! etcd), the upstream apiserver and named services, the listener, the peers, the egress
//! proxy and the running server's admin endpoint. Nothing is changed; a link dialed to a
//! peer is closed at once.

use crate::config::ServerConfig;
use crate::datastore::{self, Datastore};
use crate::upstream::Upstream;
use std::sync::Arc;
use std::time::{Duration, SystemTime};
use tether_process::diagnose::{Check, Report};
use tether_transport::tls;
use tether_transport::transport::tcp::TcpTunnel;
use tether_transport::transport::Tunnel;
use tether_trust::files;

/// A certificate closer than this to its expiry is a warning: servers do not renew their own.
const EXPIRY_WARN: i64 = 30 * 86_400;

/// Runs every check against `config` (the settings `run` would use).
pub async fn diagnose(config: &ServerConfig) -> Report {
    let mut r = Report::default();
    r.push(Check::ok(
        "settings",
        format!(
            "listen {}; upstream {}; data in {}",
            config.listen,
            config.upstream,
            config.data_dir.display()
        ),
    ));
    let peer_tls = certificates(config, &mut r);
    datastore(config, &mut r).await;
    upstream(config, &mut r).await;
    r.push(tether_process::diagnose::listener(
        config.listen,
        "tether-server",
        "--listen",
    ));
    if let Some(tls_config) = peer_tls {
        for peer in &config.peers {
            peer_link(config, peer, &tls_config, &mut r).await;
        }
    }
    egress(config, &mut r);
    let admin = config.admin;
    r.push(
        tokio::task::spawn_blocking(move || {
            tether_process::diagnose::admin(admin, "tether-server", "127.0.0.1:8181")
        })
        .await
        .unwrap_or_else(|e| Check::fail("admin", e.to_string(), "a bug: report it")),
    );
    r
}

/// The CA and the server certificate: present, matching, and not about to expire. Returns the
/// TLS a peer link dials with.
fn certificates(config: &ServerConfig, r: &mut Report) -> Option<rustls::ClientConfig> {
    let dir = &config.data_dir;
    let read = |f: &str| std::fs::read_to_string(dir.join(f));
    let (cert, ca) = match (read(files::SERVER_CERT), read(files::CA_CERT)) {
        (Ok(c), Ok(a)) => (c, a),
        _ => {
            r.push(Check::fail(
                "certificates",
                format!("no server.crt and ca.crt in {}", dir.display()),
                "`tether-server init --data-dir DIR --san NAME` makes them",
            ));
            return None;
        }
    };
    let now = tether_process::units::unix_seconds(SystemTime::now()) as i64;
    let info = tether_trust::pem_to_der(&cert, &dir.join(files::SERVER_CERT))
        .ok()
        .and_then(|der| tls::peer_info(&der.into()));
    let ca_info = tether_trust::pem_to_der(&ca, &dir.join(files::CA_CERT))
        .ok()
        .and_then(|der| tls::peer_info(&der.into()));
    let (Some(info), Some(ca_info)) = (info, ca_info) else {
        r.push(Check::fail(
            "certificates",
            "server.crt or ca.crt is not a certificate",
            "make them again with `tether-server init`",
        ));
        return None;
    };
    let roots = tls::load_roots(&dir.join(files::CA_CERT));
    let id = tls::Identity::load(&dir.join(files::SERVER_CERT), &dir.join(files::SERVER_KEY));
    let (roots, id) = match (roots, id) {
        (Ok(roots), Ok(id)) => (roots, id),
        (Err(e), _) | (_, Err(e)) => {
            r.push(Check::fail(
                "certificates",
                e.to_string(),
                "the data directory must hold ca.crt, server.crt and server.key, readable by this user",
            ));
            return None;
        }
    };
    // The server's own TLS settings, built as `run` builds them: a key that does not match
    // the certificate fails here.
    if let Err(e) = tls::server_config(roots.clone(), id.clone(), config.limits.post_quantum) {
        r.push(Check::fail(
            "certificates",
            e.to_string(),
            "server.key must be the key of server.crt",
        ));
        return None;
    }
    let expires = |t: i64| tether_process::units::format_unix(t);
    let detail = format!(
        "server certificate {} until {}, CA until {}",
        info.common_name,
        expires(info.not_after),
        expires(ca_info.not_after)
    );
    let soonest = info.not_after.min(ca_info.not_after);
    r.push(if soonest < now {
        Check::fail("certificates", detail, "expired: `tether-server init` issues a new server certificate from the same CA")
    } else if soonest - now < EXPIRY_WARN {
        Check::warn("certificates", detail, "expires within 30 days: `tether-server init` issues a new one from the same CA, and the running server reloads it")
    } else {
        Check::ok("certificates", detail)
    });
    tls::client_config(roots, id, config.limits.post_quantum).ok()
}

/// The datastore: the records file, or etcd answering a read.
async fn datastore(config: &ServerConfig, r: &mut Report) {
    let store = match config.datastore {
        datastore::Kind::Dir => Datastore::Dir(config.data_dir.clone()),
        datastore::Kind::Etcd => match datastore::etcd::Etcd::new(&config.etcd) {
            Ok(e) => Datastore::Etcd(Arc::new(e)),
            Err(e) => {
                r.push(Check::fail(
                    "datastore",
                    format!("etcd settings: {e}"),
                    "check --etcd-endpoints, --etcd-ca, --etcd-cert and --etcd-key",
                ));
                return;
            }
        },
    };
    let what = match &store {
        Datastore::Dir(d) => d.display().to_string(),
        Datastore::Etcd(_) => format!("etcd ({})", config.etcd.endpoints.join(", ")),
    };
    match tokio::time::timeout(Duration::from_secs(5), store.load_records()).await {
        Ok(Ok((records, _))) => {
            r.push(Check::ok(
                "datastore",
                format!("{what}: {} node records", records.by_name.len()),
            ));
            if let Ok(report) = crate::rotate::status(&config.data_dir, &store).await {
                r.push(rotation_check(&report));
            }
        }
        Ok(Err(e)) => r.push(Check::fail(
            "datastore",
            format!("{what}: {e}"),
            "with etcd: are the endpoints reachable and the client certificate accepted? A running server serves from its cached records meanwhile",
        )),
        Err(_) => r.push(Check::fail(
            "datastore",
            format!("{what}: no answer within 5 s"),
            "etcd does not answer: a partition, or etcd down",
        )),
    }
}

/// A CA rotation that runs is a warning until it finishes; a master without its new CA fails.
fn rotation_check(report: &crate::rotate::CaReport) -> Check {
    match &report.rotation {
        Some(rot) if rot.finished.is_none() && report.issuer != rot.new => Check::fail(
            "ca rotation",
            "a CA rotation runs and this master does not hold its new CA: it signs no join or renewal",
            "`tether-server ca rotate --from` with a copy of the data directory of the master that started it",
        ),
        Some(rot) if rot.finished.is_none() => Check::warn(
            "ca rotation",
            format!(
                "a CA rotation runs; {} node(s) on the old CA",
                report.nodes_on_old_ca.len()
            ),
            "`tether-server ca status` lists them; `ca finish` ends the rotation once none is left",
        ),
        _ => Check::ok("ca rotation", "none runs"),
    }
}

/// The apiserver (`/readyz` over HTTPS with `--upstream-ca`, else a TCP connect), and each
/// named service.
async fn upstream(config: &ServerConfig, r: &mut Report) {
    let ca = config
        .upstream_ca
        .as_ref()
        .map(|p| tls::load_roots(p))
        .transpose();
    let ca = match ca {
        Ok(ca) => ca,
        Err(e) => {
            r.push(Check::fail(
                "upstream",
                e.to_string(),
                "--upstream-ca must name the apiserver's CA (kubeadm: /etc/kubernetes/pki/ca.crt)",
            ));
            return;
        }
    };
    let how = if ca.is_some() {
        "GET /readyz over HTTPS"
    } else {
        "TCP connect"
    };
    let services = config
        .services
        .iter()
        .map(|(name, addr)| (format!("service {name}"), addr.clone(), None));
    for (name, addr, ca) in
        std::iter::once(("upstream".to_string(), config.upstream.clone(), ca)).chain(services)
    {
        let up = match Upstream::new(addr.clone(), config.connect_timeout, ca) {
            Ok(u) => u,
            Err(e) => {
                r.push(Check::fail(name, e.to_string(), "check the address"));
                continue;
            }
        };
        match up.check().await {
            Ok(()) => r.push(Check::ok(name, format!("{addr}: healthy ({how})"))),
            Err(e) => r.push(Check::fail(
                name,
                format!("{addr}: {e}"),
                "is the apiserver running on this master? Agents' streams go to a peer's meanwhile",
            )),
        }
    }
}

/// A configured peer: reachable over TLS/TCP with this server's certificate.
async fn peer_link(
    config: &ServerConfig,
    peer: &str,
    tls_config: &rustls::ClientConfig,
    r: &mut Report,
) {
    let name = format!("peer {peer}");
    let targets = match tether_link::reconnect::resolve(peer, 0).await {
        Ok(t) if !t.is_empty() => t,
        _ => {
            r.push(Check::fail(
                name,
                "the name does not resolve",
                "check --peer and DNS",
            ));
            return;
        }
    };
    let t = &targets[0];
    let wait = config.handshake_timeout;
    let dial = TcpTunnel::connect(
        t.addr,
        &t.name,
        Arc::new(tls_config.clone()),
        config.liveness,
        tls::INITIAL_STREAMS as usize,
    );
    match tokio::time::timeout(wait, dial).await {
        Ok(Ok(tun)) => {
            let tun = Tunnel::from_tcp(tun);
            r.push(Check::ok(
                name,
                format!(
                    "TLS handshake ok, key exchange {}",
                    tun.key_exchange().unwrap_or("unknown")
                ),
            ));
            tun.close(tether_proto::code::OK, "diagnose");
        }
        Ok(Err(e)) => r.push(Check::fail(
            name,
            e.to_string(),
            "the peer is down, a firewall is in the way, or its certificate is not of this CA",
        )),
        Err(_) => r.push(Check::fail(
            name,
            format!("no answer within {wait:?}"),
            "a firewall between the masters drops the port",
        )),
    }
}

/// The egress proxy's settings: its TLS files, and its address.
fn egress(config: &ServerConfig, r: &mut Report) {
    let e = &config.egress;
    if e.listen.is_none() && e.uds.is_none() {
        r.push(Check::ok(
            "egress",
            "off (no --egress-listen or --egress-uds)",
        ));
        return;
    }
    if let Err(err) = crate::egress::tls_acceptor(e) {
        r.push(Check::fail(
            "egress",
            err.to_string(),
            "--egress-tls-cert, --egress-tls-key and --egress-client-ca must be readable PEM files",
        ));
        return;
    }
    let Some(addr) = e.listen else {
        r.push(Check::ok("egress", "Unix socket only"));
        return;
    };
    let loopback = addr.ip().is_loopback();
    if !loopback && (e.tls_cert.is_none() || e.client_ca.is_none()) {
        r.push(Check::fail(
            "egress",
            format!("{addr} is not loopback and has no TLS with client certificates"),
            "give --egress-tls-cert, --egress-tls-key and --egress-client-ca, or listen on loopback or --egress-uds",
        ));
        return;
    }
    r.push(Check::ok(
        "egress",
        format!(
            "{addr}{}",
            if e.tls_cert.is_some() {
                " with TLS"
            } else {
                ""
            }
        ),
    ));
}
