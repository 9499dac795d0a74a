//! The soak's etcd, for `soak --datastore etcd`: the kit's cluster of three members of Debian's
//! `etcd` on loopback (TLS and client certificates on both ports, as kubeadm's stacked etcd),
//! each of which a fault can `kill -9` and start again on its data; and in front of it one
//! [`Gate`] per tether server, through which that server alone reaches etcd, so that a fault
//! can cut one server off (a black hole, [`Gate::cut`]) while the others and the soak's own
//! commands carry on.

use crate::procs::{run_ok, wait_until};
use anyhow::{Context, Result};
use std::net::SocketAddr;
use std::path::Path;
use std::time::Duration;
pub use tether_testkit::etcd::available;
use tether_testkit::etcd::{EtcdCluster, Timing};
pub use tether_testkit::gate::Gate;

/// Three etcd members (the kit's cluster) and a gate per tether server.
pub struct Etcd {
    cluster: EtcdCluster,
    pub gates: Vec<Gate>,
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
        let cluster = EtcdCluster::start(work, MEMBERS, Timing::STEADY)?;
        let gates = (0..servers)
            .map(|_| Gate::start(&cluster.client_addrs()))
            .collect::<Result<_, _>>()?;
        let etcd = Etcd { cluster, gates };
        let mut args = vec!["token", "create", "--data-dir"];
        let dir = ca_dir.to_string_lossy().into_owned();
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
        .with_context(|| {
            format!(
                "{}\n{}",
                last.map(|e| e.to_string()).unwrap_or_default(),
                etcd.cluster.logs_tail(10)
            )
        })?;
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
            &s(&self.cluster.ca),
            "--etcd-cert",
            &s(&self.cluster.client_cert),
            "--etcd-key",
            &s(&self.cluster.client_key),
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
        self.flags(&self.cluster.client_addrs())
    }

    pub fn members(&self) -> usize {
        self.cluster.members()
    }

    /// `kill -9` of member `i`.
    pub fn kill(&self, i: usize) {
        self.cluster.kill(i);
    }

    /// Starts member `i` again on its data.
    pub fn restart(&self, i: usize) -> Result<()> {
        Ok(self.cluster.restart(i)?)
    }
}
