//! The server's way to its kube-apiserver: connecting for a stream, and checking its health.
//!
//! The check runs every second. Without `--upstream-ca` it is a TCP connect, which notices a
//! dead process or host. With it, it is an HTTPS `GET /readyz` verified against that CA, which
//! also notices an apiserver that is up but not ready (etcd lost, still starting): the case a
//! TCP check misses and the one that hurts most.

use std::io;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::Duration;
use tether_endpoint::http;
use tokio::net::{lookup_host, TcpStream};

/// Where streams go, and whether the last check found it healthy.
pub struct Upstream {
    addr: String,
    connect_timeout: Duration,
    healthy: AtomicBool,
    https: Option<tokio_rustls::TlsConnector>,
}

impl std::fmt::Debug for Upstream {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Upstream")
            .field("addr", &self.addr)
            .finish()
    }
}

/// Why a health check failed.
#[derive(Debug, thiserror::Error)]
pub enum Unhealthy {
    #[error("{0}")]
    Connect(io::Error),
    #[error("bad upstream name {0:?}")]
    BadName(String),
    #[error("TLS: {0}")]
    Tls(io::Error),
    #[error("/readyz gave no HTTP answer: {0}")]
    NoAnswer(io::Error),
    #[error("/readyz answered {0}")]
    NotReady(u16),
    #[error("/readyz did not answer in time")]
    Slow,
}

impl Upstream {
    /// `ca`: the CA that signed the apiserver's certificate, to check `/readyz` over HTTPS.
    pub fn new(
        addr: String,
        connect_timeout: Duration,
        ca: Option<rustls::RootCertStore>,
    ) -> Result<Self, tether_transport::tls::TlsError> {
        let https = match ca {
            Some(roots) => {
                let cfg =
                    rustls::ClientConfig::builder_with_provider(tether_transport::tls::provider())
                        .with_safe_default_protocol_versions()
                        .map_err(|e| tether_transport::tls::TlsError::Config(e.to_string()))?
                        .with_root_certificates(roots)
                        .with_no_client_auth();
                Some(tokio_rustls::TlsConnector::from(Arc::new(cfg)))
            }
            None => None,
        };
        Ok(Upstream {
            addr,
            connect_timeout,
            healthy: AtomicBool::new(false),
            https,
        })
    }

    pub fn addr(&self) -> &str {
        &self.addr
    }

    pub fn is_healthy(&self) -> bool {
        self.healthy.load(Ordering::Relaxed)
    }

    /// Connects to the upstream (every address its name resolves to, in order) within the
    /// connect timeout.
    pub async fn connect(&self) -> io::Result<TcpStream> {
        let attempt = async {
            let mut last = io::Error::new(io::ErrorKind::NotFound, "name resolved to no address");
            for addr in lookup_host(&self.addr).await? {
                match TcpStream::connect(addr).await {
                    Ok(s) => {
                        let _ = s.set_nodelay(true);
                        return Ok(s);
                    }
                    Err(e) => last = e,
                }
            }
            Err(last)
        };
        match tokio::time::timeout(self.connect_timeout, attempt).await {
            Ok(r) => r,
            Err(_) => Err(io::Error::new(
                io::ErrorKind::TimedOut,
                format!("no connection within {:?}", self.connect_timeout),
            )),
        }
    }

    /// One health check: a connect, and `GET /readyz` when a CA was given.
    pub async fn check(&self) -> Result<(), Unhealthy> {
        let tcp = self.connect().await.map_err(Unhealthy::Connect)?;
        let Some(https) = &self.https else {
            return Ok(());
        };
        let host = tether_link::reconnect::host_of(&self.addr).to_string();
        let name = rustls::pki_types::ServerName::try_from(host.clone())
            .map_err(|_| Unhealthy::BadName(host.clone()))?;
        let probe = async {
            let mut tls = https.connect(name, tcp).await.map_err(Unhealthy::Tls)?;
            let (code, _) = http::get(&mut tls, &host, "/readyz", 64 * 1024)
                .await
                .map_err(Unhealthy::NoAnswer)?;
            match code {
                200 => Ok(()),
                code => Err(Unhealthy::NotReady(code)),
            }
        };
        tokio::time::timeout(self.connect_timeout, probe)
            .await
            .unwrap_or(Err(Unhealthy::Slow))
    }

    /// Checks the upstream every `interval` until the task is dropped, logging each change.
    pub async fn watch(self: Arc<Self>, interval: Duration, on_change: impl Fn(bool)) {
        let mut first = true;
        loop {
            let ok = match self.check().await {
                Ok(()) => true,
                Err(e) => {
                    if self.is_healthy() || first {
                        tracing::warn!(upstream = %self.addr, error = %e, "upstream unhealthy");
                    }
                    false
                }
            };
            let was = self.healthy.swap(ok, Ordering::Relaxed);
            if ok && (!was || first) {
                tracing::info!(upstream = %self.addr, "upstream healthy");
            }
            if was != ok || first {
                on_change(ok);
            }
            first = false;
            tokio::time::sleep(interval).await;
        }
    }
}
