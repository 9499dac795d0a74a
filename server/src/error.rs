//! Why a server could not start (or reload): each variant says what to do about it.

use std::net::SocketAddr;
use tether_transport::tls;

/// Why a server could not start.
#[derive(Debug, thiserror::Error)]
pub enum ServerError {
    #[error("{0}; run `tether-server init --data-dir DIR` to create the certificates")]
    Tls(#[from] tls::TlsError),
    #[error("cannot listen on UDP {addr}: {source}")]
    Listen {
        addr: SocketAddr,
        source: std::io::Error,
    },
    #[error("cannot serve the admin endpoint on {addr}: {source}")]
    Admin {
        addr: SocketAddr,
        source: std::io::Error,
    },
    #[error("the egress proxy would listen on {0}, which is not loopback, without client certificates: anyone who reaches it could reach every node's kubelet. Add --egress-tls-cert, --egress-tls-key and --egress-client-ca, listen on 127.0.0.1, or use --egress-uds (kube-apiserver's EgressSelectorConfiguration supports a Unix socket)")]
    EgressUnauthenticated(SocketAddr),
    #[error("cannot read the node records: {0}")]
    Records(#[from] tether_trust::CertError),
    #[error("datastore: {0}")]
    Datastore(#[from] crate::datastore::etcd::EtcdError),
    #[error("cannot read the datastore: {0}")]
    Store(crate::datastore::DatastoreError),
    #[error("cannot serve the egress proxy on {what}: {source}")]
    Egress {
        what: String,
        source: std::io::Error,
    },
}
