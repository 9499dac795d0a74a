//! A real etcd cluster: Debian's `etcd` binary, members on loopback ports, TLS with client
//! certificates on the client and the peer ports (as kubeadm's stacked etcd), each member a
//! process that can be killed (`kill -9`) and started again on its data.
//!
//! The cluster does not wait for itself to answer: the tests wait with tether's own etcd
//! client, the soak with the first `tether-server` command that needs it.

use crate::process::{free_port, Proc};
use crate::KitError;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::sync::{Mutex, MutexGuard};

/// Whether an `etcd` binary is on the PATH (Debian's etcd-server; `.ci/run` installs it).
pub fn available() -> bool {
    std::env::var_os("PATH")
        .map(|p| std::env::split_paths(&p).any(|d| d.join("etcd").is_file()))
        .unwrap_or(false)
}

/// etcd's heartbeat and election timeout, in milliseconds.
#[derive(Debug, Clone, Copy)]
pub struct Timing {
    pub heartbeat_ms: u32,
    pub election_ms: u32,
}

impl Timing {
    /// Short elections, for tests that kill members and wait for the rest.
    pub const FAST: Timing = Timing {
        heartbeat_ms: 50,
        election_ms: 500,
    };
    /// Elections within a second, for the soak, where a killed leader is replaced while
    /// everything runs on two shared cores.
    pub const STEADY: Timing = Timing {
        heartbeat_ms: 100,
        election_ms: 1000,
    };
}

struct Member {
    name: String,
    client_port: u16,
    args: Vec<String>,
    dir: PathBuf,
    proc: Option<Proc>,
    starts: u32,
}

impl Member {
    fn log(&self) -> PathBuf {
        self.dir.join(format!("{}.{}.log", self.name, self.starts))
    }

    fn start(&mut self) -> Result<(), KitError> {
        self.starts += 1;
        self.proc = Some(Proc::spawn(
            &self.name,
            Path::new("etcd"),
            &self.args,
            &self.log(),
        )?);
        Ok(())
    }
}

fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|p| p.into_inner())
}

/// A running etcd cluster; its members are killed when it is dropped.
pub struct EtcdCluster {
    members: Vec<Mutex<Member>>,
    /// The CA of the members' certificates, and a client certificate and key it signed.
    pub ca: PathBuf,
    pub client_cert: PathBuf,
    pub client_key: PathBuf,
}

impl EtcdCluster {
    /// Starts `n` members with their data, certificates and logs under `dir`.
    pub fn start(dir: &Path, n: usize, timing: Timing) -> Result<EtcdCluster, KitError> {
        let pki = dir.join("pki");
        std::fs::create_dir_all(&pki).map_err(KitError::io(format!("create {}", pki.display())))?;
        let life = tether_trust::Lifetime::days(10);
        let ca = tether_trust::Ca::generate("etcd-ca", life)?;
        let names = ["127.0.0.1".to_string(), "localhost".to_string()];
        let path = |f: &str| pki.join(f);
        let s = |p: PathBuf| p.to_string_lossy().into_owned();
        std::fs::write(path("ca.crt"), ca.cert_pem()).map_err(KitError::io("write the etcd CA"))?;
        // One certificate for the members, as server and as peer.
        ca.issue_server(&names, life)?
            .save(&path("server.crt"), &path("server.key"))?;
        ca.issue_agent("tether-etcd-client", life)?
            .save(&path("client.crt"), &path("client.key"))?;
        let ports = (0..n)
            .map(|_| Ok((free_port()?, free_port()?)))
            .collect::<Result<Vec<_>, KitError>>()?;
        let initial = ports
            .iter()
            .enumerate()
            .map(|(i, (_, peer))| format!("m{i}=https://127.0.0.1:{peer}"))
            .collect::<Vec<_>>()
            .join(",");
        let mut members = Vec::new();
        for (i, &(client_port, peer_port)) in ports.iter().enumerate() {
            let client = format!("https://127.0.0.1:{client_port}");
            let peer = format!("https://127.0.0.1:{peer_port}");
            let args: Vec<String> = [
                "--name",
                &format!("m{i}"),
                "--data-dir",
                &s(dir.join(format!("m{i}"))),
                "--listen-client-urls",
                &client,
                "--advertise-client-urls",
                &client,
                "--listen-peer-urls",
                &peer,
                "--initial-advertise-peer-urls",
                &peer,
                "--initial-cluster",
                &initial,
                "--initial-cluster-state",
                "new",
                "--initial-cluster-token",
                "tether-test",
                "--cert-file",
                &s(path("server.crt")),
                "--key-file",
                &s(path("server.key")),
                "--trusted-ca-file",
                &s(path("ca.crt")),
                "--client-cert-auth",
                "--peer-cert-file",
                &s(path("server.crt")),
                "--peer-key-file",
                &s(path("server.key")),
                "--peer-trusted-ca-file",
                &s(path("ca.crt")),
                "--peer-client-cert-auth",
                "--heartbeat-interval",
                &timing.heartbeat_ms.to_string(),
                "--election-timeout",
                &timing.election_ms.to_string(),
                "--log-level",
                "warn",
            ]
            .map(String::from)
            .to_vec();
            let mut m = Member {
                name: format!("etcd-m{i}"),
                client_port,
                args,
                dir: dir.to_path_buf(),
                proc: None,
                starts: 0,
            };
            m.start()?;
            members.push(Mutex::new(m));
        }
        Ok(EtcdCluster {
            members,
            ca: path("ca.crt"),
            client_cert: path("client.crt"),
            client_key: path("client.key"),
        })
    }

    pub fn members(&self) -> usize {
        self.members.len()
    }

    /// The loopback address of member `i`'s client port.
    pub fn client_addr(&self, i: usize) -> SocketAddr {
        SocketAddr::from(([127, 0, 0, 1], lock(&self.members[i]).client_port))
    }

    /// Every member's client address.
    pub fn client_addrs(&self) -> Vec<SocketAddr> {
        (0..self.members.len())
            .map(|i| self.client_addr(i))
            .collect()
    }

    /// The client URLs of every member.
    pub fn endpoints(&self) -> Vec<String> {
        self.client_addrs()
            .iter()
            .map(|a| format!("https://{a}"))
            .collect()
    }

    /// `kill -9` of member `i`.
    pub fn kill(&self, i: usize) {
        if let Some(mut p) = lock(&self.members[i]).proc.take() {
            p.kill();
        }
    }

    /// Starts member `i` again on its data (nothing when it runs).
    pub fn restart(&self, i: usize) -> Result<(), KitError> {
        let mut m = lock(&self.members[i]);
        if m.proc.is_some() {
            return Ok(());
        }
        m.start()
    }

    /// The last `lines` lines of each member's current log, to explain a cluster that does not
    /// answer.
    pub fn logs_tail(&self, lines: usize) -> String {
        self.members
            .iter()
            .map(|m| {
                let m = lock(m);
                let text = std::fs::read_to_string(m.log()).unwrap_or_default();
                let mut tail: Vec<&str> = text.lines().rev().take(lines).collect();
                tail.reverse();
                format!("--- {}:\n{}\n", m.name, tail.join("\n"))
            })
            .collect()
    }
}
