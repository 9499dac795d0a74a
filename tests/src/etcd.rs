//! A real etcd cluster for the datastore tests: Debian's `etcd` binary, members on loopback
//! ports, TLS with client certificates on the client port (as kubeadm's stacked etcd) and
//! between the members, each member a process that can be killed and started again on the
//! same data. And a TCP proxy that can cut one tether server off from etcd while everything
//! else keeps running.

use crate::process::{free_port, Proc};
use crate::TempDir;
use std::path::PathBuf;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;
use tether_server::datastore::etcd::EtcdSettings;
use tokio::net::{TcpListener, TcpStream};

/// Whether the etcd tests can run: an `etcd` binary on the PATH. Without one they print
/// SKIPPED loudly, except under CI (`CI=true`), where that is a failure: `.ci/run` installs
/// Debian's etcd-server.
pub fn etcd_or_skip(test: &str) -> bool {
    let found = std::env::var_os("PATH")
        .map(|p| std::env::split_paths(&p).any(|d| d.join("etcd").is_file()))
        .unwrap_or(false);
    if found {
        return true;
    }
    if std::env::var("CI").as_deref() == Ok("true") {
        panic!("{test}: no etcd binary on the PATH under CI (install Debian's etcd-server)");
    }
    eprintln!(
        "\n**********\n*** SKIPPED: {test}: no etcd binary on the PATH.\n*** Install Debian's etcd-server (.ci/run does).\n**********\n"
    );
    false
}

struct Member {
    name: String,
    client_port: u16,
    peer_port: u16,
    data: PathBuf,
    proc: Option<Proc>,
}

/// A running etcd cluster.
pub struct EtcdCluster {
    pub dir: TempDir,
    members: Vec<Member>,
    initial: String,
    /// The CA of the members' certificates, and a client certificate and key it signed.
    pub ca: PathBuf,
    pub client_cert: PathBuf,
    pub client_key: PathBuf,
    server_cert: PathBuf,
    server_key: PathBuf,
}

impl EtcdCluster {
    /// Starts `n` members and waits until the cluster answers.
    pub async fn start(n: usize) -> Self {
        let dir = TempDir::new("etcd");
        let pki = dir.path().join("pki");
        std::fs::create_dir_all(&pki).expect("pki dir");
        let ca = tether_trust::Ca::generate("etcd-ca", tether_trust::Lifetime::days(10))
            .expect("etcd CA");
        let names = ["127.0.0.1".to_string(), "localhost".to_string()];
        let server = ca
            .issue_server(&names, tether_trust::Lifetime::days(10))
            .expect("etcd server certificate");
        let client = ca
            .issue_agent("tether-etcd-client", tether_trust::Lifetime::days(10))
            .expect("etcd client certificate");
        let path = |f: &str| pki.join(f);
        std::fs::write(path("ca.crt"), ca.cert_pem()).expect("write");
        server
            .save(&path("server.crt"), &path("server.key"))
            .expect("write");
        client
            .save(&path("client.crt"), &path("client.key"))
            .expect("write");
        let members: Vec<Member> = (0..n)
            .map(|i| Member {
                name: format!("m{i}"),
                client_port: free_port(),
                peer_port: free_port(),
                data: dir.path().join(format!("m{i}")),
                proc: None,
            })
            .collect();
        let initial = members
            .iter()
            .map(|m| format!("{}=https://127.0.0.1:{}", m.name, m.peer_port))
            .collect::<Vec<_>>()
            .join(",");
        let mut c = EtcdCluster {
            members,
            initial,
            ca: path("ca.crt"),
            client_cert: path("client.crt"),
            client_key: path("client.key"),
            server_cert: path("server.crt"),
            server_key: path("server.key"),
            dir,
        };
        for i in 0..n {
            c.start_member(i);
        }
        c.wait_healthy().await;
        c
    }

    fn start_member(&mut self, i: usize) {
        let m = &self.members[i];
        let client = format!("https://127.0.0.1:{}", m.client_port);
        let peer = format!("https://127.0.0.1:{}", m.peer_port);
        let (cert, key, ca) = (
            self.server_cert.to_string_lossy().into_owned(),
            self.server_key.to_string_lossy().into_owned(),
            self.ca.to_string_lossy().into_owned(),
        );
        let data = m.data.to_string_lossy().into_owned();
        let args: Vec<&str> = vec![
            "--name",
            &m.name,
            "--data-dir",
            &data,
            "--listen-client-urls",
            &client,
            "--advertise-client-urls",
            &client,
            "--listen-peer-urls",
            &peer,
            "--initial-advertise-peer-urls",
            &peer,
            "--initial-cluster",
            &self.initial,
            "--initial-cluster-state",
            "new",
            "--initial-cluster-token",
            "tether-test",
            "--cert-file",
            &cert,
            "--key-file",
            &key,
            "--trusted-ca-file",
            &ca,
            "--client-cert-auth",
            "--peer-cert-file",
            &cert,
            "--peer-key-file",
            &key,
            "--peer-trusted-ca-file",
            &ca,
            "--peer-client-cert-auth",
            // Short elections: the tests kill members and wait for the rest.
            "--heartbeat-interval",
            "50",
            "--election-timeout",
            "500",
            "--log-level",
            "warn",
        ];
        let log = self.dir.path().join(format!("{}.log", m.name));
        let proc = Proc::spawn(&m.name, std::path::Path::new("etcd"), &args, log);
        self.members[i].proc = Some(proc);
    }

    /// The client URLs of every member.
    pub fn endpoints(&self) -> Vec<String> {
        self.members
            .iter()
            .map(|m| format!("https://127.0.0.1:{}", m.client_port))
            .collect()
    }

    /// The loopback address of member `i`'s client port.
    pub fn client_addr(&self, i: usize) -> std::net::SocketAddr {
        std::net::SocketAddr::from(([127, 0, 0, 1], self.members[i].client_port))
    }

    /// Settings that reach this cluster through `endpoints`, under `prefix`.
    pub fn settings_for(&self, endpoints: Vec<String>, prefix: &str) -> EtcdSettings {
        EtcdSettings {
            endpoints,
            ca: Some(self.ca.clone()),
            cert: Some(self.client_cert.clone()),
            key: Some(self.client_key.clone()),
            prefix: prefix.to_string(),
        }
    }

    pub fn settings(&self, prefix: &str) -> EtcdSettings {
        self.settings_for(self.endpoints(), prefix)
    }

    /// `kill -9` of member `i`.
    pub async fn kill(&mut self, i: usize) {
        if let Some(mut p) = self.members[i].proc.take() {
            let _ = p.child.kill().await;
        }
    }

    /// Starts member `i` again on its data.
    pub fn restart(&mut self, i: usize) {
        if self.members[i].proc.is_none() {
            self.start_member(i);
        }
    }

    /// Waits until a write through the members that run succeeds.
    pub async fn wait_healthy(&self) {
        let etcd = tether_server::datastore::etcd::Etcd::new(&self.settings("/health/"))
            .expect("etcd settings");
        let ok = crate::eventually(Duration::from_secs(30), || async {
            let put = tether_server::datastore::etcd::Op::Put {
                key: "probe".into(),
                value: b"1".to_vec(),
                lease: 0,
            };
            etcd.txn(&[], &[put]).await.is_ok()
        })
        .await;
        if !ok {
            let logs: String = self
                .members
                .iter()
                .map(|m| {
                    let log = self.dir.path().join(format!("{}.log", m.name));
                    let text = std::fs::read_to_string(log).unwrap_or_default();
                    let tail: Vec<&str> = text.lines().rev().take(10).collect();
                    format!("--- {}:\n{}\n", m.name, tail.join("\n"))
                })
                .collect();
            panic!("etcd did not become healthy in 30 s\n{logs}");
        }
    }
}

/// A TCP proxy to one address that can be cut (every connection closed, new ones refused)
/// and healed: a partition between one tether server and etcd. It can also silence the
/// connections open (nothing relayed either way, nothing closed, new ones unaffected), as a
/// firewall or NAT that lost their state does.
pub struct Cutter {
    pub addr: std::net::SocketAddr,
    cut: Arc<AtomicBool>,
    conns: Arc<Mutex<Vec<tokio::task::AbortHandle>>>,
    /// Bumped to silence the connections open at that moment.
    silence: tokio::sync::watch::Sender<u64>,
    task: tokio::task::JoinHandle<()>,
}

impl Cutter {
    pub async fn start(target: std::net::SocketAddr) -> Self {
        let listener = TcpListener::bind("127.0.0.1:0").await.expect("bind");
        let addr = listener.local_addr().expect("addr");
        let cut = Arc::new(AtomicBool::new(false));
        let conns: Arc<Mutex<Vec<tokio::task::AbortHandle>>> = Arc::default();
        let (c, list) = (cut.clone(), conns.clone());
        let (silence, _) = tokio::sync::watch::channel(0u64);
        let hush = silence.clone();
        let task = tokio::spawn(async move {
            while let Ok((mut inbound, _)) = listener.accept().await {
                if c.load(Ordering::SeqCst) {
                    continue;
                }
                let mut silenced = hush.subscribe();
                let relay = tokio::spawn(async move {
                    if let Ok(mut out) = TcpStream::connect(target).await {
                        tokio::select! {
                            _ = tokio::io::copy_bidirectional(&mut inbound, &mut out) => {}
                            // Both sockets stay open, and silent, until the proxy is cut or
                            // dropped.
                            _ = silenced.changed() => std::future::pending::<()>().await,
                        }
                    }
                });
                list.lock().expect("lock").push(relay.abort_handle());
            }
        });
        Cutter {
            addr,
            cut,
            conns,
            silence,
            task,
        }
    }

    /// Silences every connection open now; later ones go through.
    pub fn silence(&self) {
        self.silence.send_modify(|g| *g += 1);
    }

    pub fn cut(&self) {
        self.cut.store(true, Ordering::SeqCst);
        for c in self.conns.lock().expect("lock").drain(..) {
            c.abort();
        }
    }

    pub fn heal(&self) {
        self.cut.store(false, Ordering::SeqCst);
    }
}

impl Drop for Cutter {
    fn drop(&mut self) {
        self.task.abort();
        self.cut();
    }
}
