//! A real etcd cluster for the datastore tests (the kit's, `tether_testkit::etcd`: members on
//! loopback ports, TLS with client certificates, each member a process that can be killed and
//! started again on its data), and the gate that cuts one tether server off from etcd while
//! everything else keeps running (`tether_testkit::gate`).

use crate::TempDir;
use std::path::PathBuf;
use std::time::Duration;
use tether_server::datastore::etcd::EtcdSettings;
use tether_testkit::etcd::Timing;
pub use tether_testkit::gate::Gate;

/// Whether the etcd tests can run: an `etcd` binary on the PATH. Without one they print
/// SKIPPED loudly, except under CI (`CI=true`), where that is a failure: `.ci/run` installs
/// Debian's etcd-server.
pub fn etcd_or_skip(test: &str) -> bool {
    if tether_testkit::etcd::available() {
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

/// A running etcd cluster, in a directory of its own.
pub struct EtcdCluster {
    cluster: tether_testkit::etcd::EtcdCluster,
    /// The CA of the members' certificates, and a client certificate and key it signed.
    pub ca: PathBuf,
    pub client_cert: PathBuf,
    pub client_key: PathBuf,
    // Dropped last: the members go first.
    pub dir: TempDir,
}

impl EtcdCluster {
    /// Starts `n` members and waits until the cluster answers.
    pub async fn start(n: usize) -> Self {
        let dir = TempDir::new("etcd");
        let cluster = tether_testkit::etcd::EtcdCluster::start(dir.path(), n, Timing::FAST)
            .unwrap_or_else(|e| panic!("cannot start etcd: {e}"));
        let c = EtcdCluster {
            ca: cluster.ca.clone(),
            client_cert: cluster.client_cert.clone(),
            client_key: cluster.client_key.clone(),
            cluster,
            dir,
        };
        c.wait_healthy().await;
        c
    }

    /// The client URLs of every member.
    pub fn endpoints(&self) -> Vec<String> {
        self.cluster.endpoints()
    }

    /// The loopback address of member `i`'s client port.
    pub fn client_addr(&self, i: usize) -> std::net::SocketAddr {
        self.cluster.client_addr(i)
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
    pub fn kill(&self, i: usize) {
        self.cluster.kill(i);
    }

    /// Starts member `i` again on its data.
    pub fn restart(&self, i: usize) {
        self.cluster
            .restart(i)
            .unwrap_or_else(|e| panic!("cannot start etcd member {i} again: {e}"));
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
            panic!(
                "etcd did not become healthy in 30 s\n{}",
                self.cluster.logs_tail(10)
            );
        }
    }
}
