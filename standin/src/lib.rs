//! A stand-in kube-apiserver for the demo and the tests: HTTPS on loopback, answering
//! `/version`, `/readyz`, and a long-running chunked watch (`/api/v1/watch/...`), which is the
//! traffic that matters most to a tunnel: kubelet keeps such watches open for minutes.

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;
use tether_endpoint::http;
use tether_transport::tls::{self, Identity};
use tokio::io::AsyncWriteExt;
use tokio::net::TcpListener;

/// A running stand-in apiserver. Stops when dropped.
pub struct StandIn {
    pub addr: SocketAddr,
    pub name: String,
    task: tokio::task::JoinHandle<()>,
}

impl Drop for StandIn {
    fn drop(&mut self) {
        self.task.abort();
    }
}

/// Interval between watch events.
pub const WATCH_INTERVAL: Duration = Duration::from_millis(200);

impl StandIn {
    /// Serves HTTPS with `identity` on an ephemeral loopback port.
    pub async fn start(name: &str, identity: Identity) -> Result<Self, tls::TlsError> {
        Self::start_on(
            name,
            identity,
            "127.0.0.1:0"
                .parse()
                .map_err(|_| tls::TlsError::Config("addr".into()))?,
        )
        .await
    }

    /// Serves HTTPS with `identity` on `addr`.
    pub async fn start_on(
        name: &str,
        identity: Identity,
        addr: std::net::SocketAddr,
    ) -> Result<Self, tls::TlsError> {
        let mut cfg = rustls::ServerConfig::builder_with_provider(tls::provider())
            .with_safe_default_protocol_versions()
            .map_err(|e| tls::TlsError::Config(e.to_string()))?
            .with_no_client_auth()
            .with_single_cert(identity.chain, identity.key)
            .map_err(|e| tls::TlsError::Config(e.to_string()))?;
        cfg.alpn_protocols = vec![b"http/1.1".to_vec()];
        let acceptor = tokio_rustls::TlsAcceptor::from(Arc::new(cfg));
        let listener = TcpListener::bind(addr)
            .await
            .map_err(|e| tls::TlsError::Config(format!("bind: {e}")))?;
        let addr = listener
            .local_addr()
            .map_err(|e| tls::TlsError::Config(e.to_string()))?;
        let label = name.to_string();
        let task = tokio::spawn(async move {
            while let Ok((tcp, _)) = listener.accept().await {
                let acceptor = acceptor.clone();
                let label = label.clone();
                tokio::spawn(async move {
                    if let Ok(Ok(tls)) =
                        tokio::time::timeout(Duration::from_secs(5), acceptor.accept(tcp)).await
                    {
                        let _ = serve(tls, &label).await;
                    }
                });
            }
        });
        Ok(StandIn {
            addr,
            name: name.to_string(),
            task,
        })
    }
}

async fn serve<S: tokio::io::AsyncRead + tokio::io::AsyncWrite + Unpin>(
    mut s: S,
    name: &str,
) -> std::io::Result<()> {
    let Ok((head, _)) = http::read_head(&mut s).await else {
        return Ok(());
    };
    let Some((_, path)) = http::parse_request(&head) else {
        return http::respond(&mut s, 400, "text/plain", b"bad request\n").await;
    };
    if path.starts_with("/api/v1/watch") {
        s.write_all(b"HTTP/1.1 200 OK\r\ncontent-type: application/json\r\ntransfer-encoding: chunked\r\n\r\n")
            .await?;
        for n in 0u64.. {
            let event = format!(
                "{{\"type\":\"MODIFIED\",\"object\":{{\"apiserver\":\"{name}\",\"n\":{n}}}}}\n"
            );
            s.write_all(format!("{:x}\r\n{event}\r\n", event.len()).as_bytes())
                .await?;
            s.flush().await?;
            tokio::time::sleep(WATCH_INTERVAL).await;
        }
        return Ok(());
    }
    let (code, body) = match path.as_str() {
        "/version" => (
            200,
            format!("{{\"gitVersion\":\"v1.31.0-standin\",\"apiserver\":\"{name}\"}}"),
        ),
        "/readyz" | "/healthz" | "/livez" => (200, "ok".to_string()),
        _ => (404, "{\"kind\":\"Status\",\"code\":404}".to_string()),
    };
    http::respond(&mut s, code, "application/json", body.as_bytes()).await
}
