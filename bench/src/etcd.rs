//! The soak's etcd, for `soak --datastore etcd`: three members of Debian's `etcd` on loopback
//! with TLS and client certificates on both ports (as kubeadm's stacked etcd), each of which a
//! fault can `kill -9` and start again on its data; and in front of it one [`Gate`] per tether
//! server, through which that server alone reaches etcd, so that a fault can cut one server
//! off while the others and the soak's own commands carry on.

use crate::load::free_port;
use crate::procs::{run_ok, wait_until, Proc};
use anyhow::{bail, Context, Result};
use std::io::{ErrorKind, Read, Write};
use std::net::{Shutdown, SocketAddr, TcpListener, TcpStream};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

/// Whether an `etcd` binary is on the PATH (Debian's etcd-server; `.ci/run` installs it).
pub fn available() -> bool {
    std::env::var_os("PATH")
        .map(|p| std::env::split_paths(&p).any(|d| d.join("etcd").is_file()))
        .unwrap_or(false)
}

struct Member {
    name: String,
    args: Vec<String>,
    log: PathBuf,
    proc: Option<Proc>,
    starts: u32,
}

impl Member {
    fn start(&mut self) -> Result<()> {
        let log = self.log.with_extension(format!("{}.log", self.starts));
        self.starts += 1;
        self.proc = Some(Proc::spawn(
            &self.name,
            Path::new("etcd"),
            &self.args,
            &log,
        )?);
        Ok(())
    }
}

/// Three etcd members and a gate per tether server.
pub struct Etcd {
    members: Vec<Mutex<Member>>,
    clients: Vec<SocketAddr>,
    pub gates: Vec<Gate>,
    ca: PathBuf,
    cert: PathBuf,
    key: PathBuf,
}

/// etcd's members.
const MEMBERS: usize = 3;

/// The prefix of every key the soak's servers keep in etcd.
const PREFIX: &str = "/tether-soak/";

impl Etcd {
    /// Starts the members in `work` with a gate for each of `servers` tether servers, and waits
    /// until they answer: the first of `server_bin`'s commands against them (a join token for
    /// the agents, made in the data directory `ca_dir`) succeeds. Returns the token too.
    pub fn start(
        work: &Path,
        servers: usize,
        server_bin: &Path,
        ca_dir: &Path,
    ) -> Result<(Etcd, String)> {
        let pki = work.join("pki");
        std::fs::create_dir_all(&pki).with_context(|| format!("create {}", pki.display()))?;
        let life = tether_trust::Lifetime::days(10);
        let ca = tether_trust::Ca::generate("soak-etcd-ca", life)?;
        let names = ["127.0.0.1".to_string(), "localhost".to_string()];
        let (ca_crt, crt, key) = (
            pki.join("ca.crt"),
            pki.join("etcd.crt"),
            pki.join("etcd.key"),
        );
        std::fs::write(&ca_crt, ca.cert_pem())?;
        // One certificate for the members (server and peer) and the clients, as a lab may.
        let both = ca.issue_server(&names, life)?;
        both.save(&crt, &key)?;
        let client = ca.issue_agent("tether-soak", life)?;
        let (client_crt, client_key) = (pki.join("client.crt"), pki.join("client.key"));
        client.save(&client_crt, &client_key)?;

        let ports: Vec<(u16, u16)> = (0..MEMBERS)
            .map(|_| Ok((free_port()?, free_port()?)))
            .collect::<Result<_>>()?;
        let initial = ports
            .iter()
            .enumerate()
            .map(|(i, (_, peer))| format!("m{i}=https://127.0.0.1:{peer}"))
            .collect::<Vec<_>>()
            .join(",");
        let s = |p: &Path| p.to_string_lossy().into_owned();
        let mut members = Vec::new();
        let mut clients = Vec::new();
        for (i, (client_port, peer_port)) in ports.iter().enumerate() {
            let client_url = format!("https://127.0.0.1:{client_port}");
            let peer_url = format!("https://127.0.0.1:{peer_port}");
            let data = work.join(format!("m{i}"));
            let args: Vec<String> = [
                "--name",
                &format!("m{i}"),
                "--data-dir",
                &s(&data),
                "--listen-client-urls",
                &client_url,
                "--advertise-client-urls",
                &client_url,
                "--listen-peer-urls",
                &peer_url,
                "--initial-advertise-peer-urls",
                &peer_url,
                "--initial-cluster",
                &initial,
                "--initial-cluster-state",
                "new",
                "--initial-cluster-token",
                "tether-soak",
                "--cert-file",
                &s(&crt),
                "--key-file",
                &s(&key),
                "--trusted-ca-file",
                &s(&ca_crt),
                "--client-cert-auth",
                "--peer-cert-file",
                &s(&crt),
                "--peer-key-file",
                &s(&key),
                "--peer-trusted-ca-file",
                &s(&ca_crt),
                "--peer-client-cert-auth",
                // Elections within a second: a killed leader is replaced while the soak runs.
                "--heartbeat-interval",
                "100",
                "--election-timeout",
                "1000",
                "--log-level",
                "warn",
            ]
            .map(String::from)
            .to_vec();
            let mut m = Member {
                name: format!("etcd-m{i}"),
                args,
                log: work.join(format!("etcd-m{i}")),
                proc: None,
                starts: 0,
            };
            m.start()?;
            members.push(Mutex::new(m));
            clients.push(SocketAddr::from(([127, 0, 0, 1], *client_port)));
        }
        let gates = (0..servers)
            .map(|_| Gate::start(&clients))
            .collect::<Result<_>>()?;
        let etcd = Etcd {
            members,
            clients,
            gates,
            ca: ca_crt,
            cert: client_crt,
            key: client_key,
        };
        let mut args = vec!["token", "create", "--data-dir"];
        let dir = s(ca_dir);
        args.push(&dir);
        let flags = etcd.command_flags();
        args.extend(flags.iter().map(String::as_str));
        let mut token = String::new();
        let mut last = None;
        wait_until("etcd answers", Duration::from_secs(60), || {
            match run_ok(server_bin, &args) {
                Ok(out) => {
                    token = out.trim().to_string();
                    true
                }
                Err(e) => {
                    last = Some(e);
                    std::thread::sleep(Duration::from_millis(500));
                    false
                }
            }
        })
        .with_context(|| format!("{:#}", last.map(|e| e.to_string()).unwrap_or_default()))?;
        Ok((etcd, token))
    }

    /// `--datastore etcd` and how to reach etcd, through `endpoints`.
    fn flags(&self, endpoints: &[SocketAddr]) -> Vec<String> {
        let list = endpoints
            .iter()
            .map(|a| format!("https://{a}"))
            .collect::<Vec<_>>()
            .join(",");
        let s = |p: &Path| p.to_string_lossy().into_owned();
        [
            "--datastore",
            "etcd",
            "--etcd-endpoints",
            &list,
            "--etcd-ca",
            &s(&self.ca),
            "--etcd-cert",
            &s(&self.cert),
            "--etcd-key",
            &s(&self.key),
            "--etcd-prefix",
            PREFIX,
        ]
        .map(String::from)
        .to_vec()
    }

    /// The flags of server `i`'s `run`: etcd through its own gate.
    pub fn server_flags(&self, i: usize) -> Vec<String> {
        self.flags(&self.gates[i].addrs)
    }

    /// The flags of the soak's own commands (tokens, revocations): etcd directly.
    pub fn command_flags(&self) -> Vec<String> {
        self.flags(&self.clients)
    }

    pub fn members(&self) -> usize {
        self.members.len()
    }

    /// `kill -9` of member `i`.
    pub fn kill(&self, i: usize) {
        if let Some(mut p) = crate::procs::lock(&self.members[i]).proc.take() {
            p.kill();
        }
    }

    /// Starts member `i` again on its data.
    pub fn restart(&self, i: usize) -> Result<()> {
        let mut m = crate::procs::lock(&self.members[i]);
        if m.proc.is_some() {
            bail!("{} is running", m.name);
        }
        m.start()
    }
}

/// A TCP relay to each etcd member that can be cut: one tether server's way to etcd.
///
/// Cut, it is a black hole, not a refusal: the connections open go silent (their sockets held
/// open, nothing relayed either way, never closed), and new ones are accepted and held the
/// same. That is what a partition, a firewall that loses its state or a member's host that
/// loses power look like from the server: no reset, no answer. Healed, new connections go
/// through again; the silent ones stay silent, as a connection whose state a firewall lost
/// does, so a server must notice for itself that its watch went dead.
pub struct Gate {
    pub addrs: Vec<SocketAddr>,
    cut: Arc<AtomicBool>,
}

/// Most silent connections a gate holds; beyond it the oldest are closed (a bound on the
/// soak's own descriptors: a server makes a few connections to etcd a second at most).
const HELD_MAX: usize = 512;

impl Gate {
    fn start(targets: &[SocketAddr]) -> Result<Gate> {
        let cut = Arc::new(AtomicBool::new(false));
        let held: Arc<Mutex<Vec<TcpStream>>> = Arc::default();
        let mut addrs = Vec::new();
        for &target in targets {
            let listener = TcpListener::bind("127.0.0.1:0")?;
            addrs.push(listener.local_addr()?);
            let (cut, held) = (cut.clone(), held.clone());
            std::thread::spawn(move || {
                for c in listener.incoming().flatten() {
                    if cut.load(Ordering::SeqCst) {
                        hold(&held, [Some(c), None]);
                        continue;
                    }
                    let (cut, held) = (cut.clone(), held.clone());
                    std::thread::spawn(move || {
                        if let Ok(out) = TcpStream::connect_timeout(&target, Duration::from_secs(1))
                        {
                            relay(c, out, &cut, &held);
                        }
                    });
                }
            });
        }
        Ok(Gate { addrs, cut })
    }

    pub fn cut(&self) {
        self.cut.store(true, Ordering::SeqCst);
    }

    pub fn heal(&self) {
        self.cut.store(false, Ordering::SeqCst);
    }
}

fn hold(held: &Mutex<Vec<TcpStream>>, streams: [Option<TcpStream>; 2]) {
    let mut h = crate::procs::lock(held);
    h.extend(streams.into_iter().flatten());
    let over = h.len().saturating_sub(HELD_MAX);
    h.drain(..over);
}

/// Relays both ways until either side ends, or the gate is cut (then both sockets are held).
fn relay(a: TcpStream, b: TcpStream, cut: &Arc<AtomicBool>, held: &Arc<Mutex<Vec<TcpStream>>>) {
    let (Ok(a2), Ok(b2)) = (a.try_clone(), b.try_clone()) else {
        return;
    };
    let (cut2, held2) = (cut.clone(), held.clone());
    let back = std::thread::spawn(move || pump(b2, a2, &cut2, &held2));
    pump(a, b, cut, held);
    let _ = back.join();
}

/// Copies `from` to `to`, checking the cut between reads; passes an end on as a half-close.
fn pump(mut from: TcpStream, mut to: TcpStream, cut: &AtomicBool, held: &Mutex<Vec<TcpStream>>) {
    if from
        .set_read_timeout(Some(Duration::from_millis(200)))
        .is_err()
    {
        return;
    }
    let mut buf = vec![0u8; 64 * 1024];
    loop {
        if cut.load(Ordering::SeqCst) {
            hold(held, [Some(from), Some(to)]);
            return;
        }
        match from.read(&mut buf) {
            Ok(0) => {
                let _ = to.shutdown(Shutdown::Write);
                return;
            }
            Ok(n) => {
                if cut.load(Ordering::SeqCst) {
                    continue;
                }
                if to.write_all(&buf[..n]).is_err() {
                    let _ = from.shutdown(Shutdown::Both);
                    return;
                }
            }
            Err(e) if matches!(e.kind(), ErrorKind::WouldBlock | ErrorKind::TimedOut) => {}
            Err(_) => {
                let _ = to.shutdown(Shutdown::Both);
                return;
            }
        }
    }
}
