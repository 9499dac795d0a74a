//! Server membership in etcd: each server keeps one key, `PREFIX servers/ID`, under a lease of
//! [`MEMBER_TTL`] seconds, holding the address agents and peers dial it by and its health. The
//! others find it there (no `--peer` needed) and pass it to their agents in the server lists
//! they already send; a server that stops leaves when its lease ends, or at once when it shuts
//! down cleanly (it revokes the lease).

use super::etcd::{Etcd, EtcdError, Op};
use super::SERVERS;
use crate::announce::Announcer;
use serde::{Deserialize, Serialize};
use std::sync::Arc;
use std::time::Duration;
use tether_process::shutdown::ShutdownSignal;
use tracing::{info, warn};

/// Seconds a server stays listed after its last keepalive.
pub const MEMBER_TTL: u64 = 5;
/// How often the lease is renewed: three tries before it ends.
const KEEPALIVE: Duration = Duration::from_millis(1500);

/// What a server's membership key holds.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Member {
    pub address: String,
    pub healthy: bool,
    pub draining: bool,
}

/// One step: renew (or take) the lease and write the key when it changed.
async fn step(
    etcd: &Etcd,
    key: &str,
    me: &Member,
    lease: &mut i64,
    written: &mut Option<Member>,
) -> Result<(), EtcdError> {
    if *lease != 0 && etcd.lease_keepalive(*lease).await? <= 0 {
        *lease = 0;
    }
    if *lease == 0 {
        *lease = etcd.lease_grant(MEMBER_TTL).await?;
        *written = None;
    }
    if written.as_ref() != Some(me) {
        let value = serde_json::to_vec(me).map_err(|e| EtcdError::Malformed(e.to_string()))?;
        let put = Op::Put {
            key: key.to_string(),
            value,
            lease: *lease,
        };
        etcd.txn(&[], &[put]).await?;
        *written = Some(me.clone());
    }
    Ok(())
}

/// Keeps this server's membership key until `stop`, then removes it.
pub async fn keep(etcd: Arc<Etcd>, id: String, announcer: Announcer, mut stop: ShutdownSignal) {
    let Some(address) = announcer.advertise().map(String::from) else {
        warn!("this server has no address to announce (set --advertise): it is not listed in etcd, so peers and agents do not learn of it");
        return;
    };
    let key = format!("{SERVERS}{id}");
    let mut rx = announcer.subscribe();
    let (mut lease, mut written) = (0i64, None);
    let mut failing = false;
    loop {
        let a = rx.borrow_and_update().clone();
        let me = Member {
            address: address.clone(),
            healthy: a.healthy,
            draining: a.draining,
        };
        match step(&etcd, &key, &me, &mut lease, &mut written).await {
            Ok(()) if failing => {
                failing = false;
                info!(address = %address, "listed in etcd again");
            }
            Ok(()) => {}
            Err(e) => {
                if !failing {
                    warn!(error = %e, "cannot keep this server's membership in etcd; retrying");
                }
                failing = true;
            }
        }
        tokio::select! {
            _ = tokio::time::sleep(KEEPALIVE) => {}
            r = rx.changed() => if r.is_err() { return },
            _ = stop.wait() => {
                if lease != 0 {
                    let _ = tokio::time::timeout(Duration::from_secs(2), etcd.lease_revoke(lease)).await;
                }
                return;
            }
        }
    }
}
