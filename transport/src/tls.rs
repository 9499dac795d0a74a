//! TLS and QUIC endpoint setup shared by the agent and the server.
//!
//! Both sides use TLS 1.3 only, the `aws-lc-rs` crypto provider (set explicitly, never picked up
//! from process-wide defaults), and mutual authentication against the cluster CA: the server
//! requires a client certificate signed by the CA, and the agent trusts only servers whose
//! certificate the CA signed. Nothing else is trusted: no system roots.
//!
//! The key exchange prefers the post-quantum hybrid X25519MLKEM768 (X25519 and ML-KEM-768
//! together: as strong as the stronger of the two), so that traffic recorded today (`kubectl
//! exec`, secrets in API responses) cannot be decrypted by a quantum computer later. X25519
//! alone stays allowed, for peers of 0.2, unless [`PostQuantum::Require`] is set. `ring`, the
//! provider before, has no ML-KEM; aws-lc-rs seals as fast on this CPU (docs/performance.md).

use rustls::crypto::CryptoProvider;
use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, PrivateKeyDer};
use rustls::server::WebPkiClientVerifier;
use rustls::RootCertStore;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

/// ALPN protocol name of tether tunnels; a peer speaking anything else fails the handshake.
pub const ALPN: &[u8] = b"tether/1";
/// ALPN protocol name of a join: the one connection an agent makes without a certificate, to
/// exchange a token for one. Nothing else is served on it.
pub const ALPN_JOIN: &[u8] = b"tether-join/1";

/// Why TLS material could not be loaded or used.
#[derive(Debug, thiserror::Error)]
pub enum TlsError {
    #[error("cannot read {path}: {source}")]
    Read {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("{path} holds no PEM certificate ({detail})")]
    NoCertificate { path: PathBuf, detail: String },
    #[error("{path} holds no PEM private key ({detail})")]
    NoKey { path: PathBuf, detail: String },
    #[error("the CA certificate in {path} is not usable: {detail}")]
    BadCa { path: PathBuf, detail: String },
    #[error("TLS configuration: {0}")]
    Config(String),
}

/// Whether a tunnel's key exchange must be post-quantum (`--post-quantum`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum PostQuantum {
    /// X25519MLKEM768 first; X25519 (and the NIST curves) for peers without it.
    #[default]
    Prefer,
    /// X25519MLKEM768 only: a peer without it fails the handshake.
    Require,
}

impl std::str::FromStr for PostQuantum {
    type Err = tether_process::units::UnknownChoice;
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        match s {
            "prefer" => Ok(PostQuantum::Prefer),
            "require" => Ok(PostQuantum::Require),
            other => Err(tether_process::units::UnknownChoice {
                what: "post-quantum",
                got: other.to_string(),
                choices: "prefer or require",
            }),
        }
    }
}

impl std::fmt::Display for PostQuantum {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            PostQuantum::Prefer => "prefer",
            PostQuantum::Require => "require",
        })
    }
}

/// The crypto provider of every TLS context of tether but the tunnels' own (the egress proxy,
/// the apiserver and etcd clients, joins): the hybrid key exchange preferred.
pub fn provider() -> Arc<CryptoProvider> {
    provider_for(PostQuantum::Prefer)
}

/// The crypto provider with the key exchanges `pq` allows, the hybrid first.
pub fn provider_for(pq: PostQuantum) -> Arc<CryptoProvider> {
    use rustls::crypto::aws_lc_rs::{self, kx_group};
    let kx_groups = match pq {
        PostQuantum::Prefer => vec![
            kx_group::X25519MLKEM768,
            kx_group::X25519,
            kx_group::SECP256R1,
            kx_group::SECP384R1,
        ],
        PostQuantum::Require => vec![kx_group::X25519MLKEM768],
    };
    Arc::new(CryptoProvider {
        kx_groups,
        ..aws_lc_rs::default_provider()
    })
}

/// The name of a key-exchange group, as status, metrics and logs show it.
pub fn group_name(g: rustls::NamedGroup) -> &'static str {
    use rustls::NamedGroup;
    match g {
        NamedGroup::X25519MLKEM768 => "X25519MLKEM768",
        NamedGroup::X25519 => "X25519",
        NamedGroup::secp256r1 => "secp256r1",
        NamedGroup::secp384r1 => "secp384r1",
        NamedGroup::secp521r1 => "secp521r1",
        _ => "other",
    }
}

/// Whether a key-exchange group (by [`group_name`]) is post-quantum.
pub fn is_post_quantum(name: &str) -> bool {
    name == "X25519MLKEM768"
}

/// A certificate chain and its key, as loaded from PEM files.
#[derive(Debug)]
pub struct Identity {
    pub chain: Vec<CertificateDer<'static>>,
    pub key: PrivateKeyDer<'static>,
}

impl Clone for Identity {
    fn clone(&self) -> Self {
        Identity {
            chain: self.chain.clone(),
            key: self.key.clone_key(),
        }
    }
}

impl Identity {
    /// An identity from PEM text, for certificates made in memory (tests, the benchmark's
    /// simulated agents) rather than read from files.
    pub fn from_pem(cert_pem: &str, key_pem: &str) -> Result<Self, TlsError> {
        let what = || std::path::PathBuf::from("(in memory)");
        let chain: Vec<_> = CertificateDer::pem_slice_iter(cert_pem.as_bytes())
            .collect::<Result<_, _>>()
            .map_err(|e| TlsError::NoCertificate {
                path: what(),
                detail: e.to_string(),
            })?;
        let key =
            PrivateKeyDer::from_pem_slice(key_pem.as_bytes()).map_err(|e| TlsError::NoKey {
                path: what(),
                detail: e.to_string(),
            })?;
        Ok(Identity { chain, key })
    }

    pub fn load(cert: &Path, key: &Path) -> Result<Self, TlsError> {
        Ok(Identity {
            chain: load_certs(cert)?,
            key: load_key(key)?,
        })
    }
}

fn read(path: &Path) -> Result<Vec<u8>, TlsError> {
    std::fs::read(path).map_err(|source| TlsError::Read {
        path: path.to_owned(),
        source,
    })
}

/// Loads every certificate of a PEM file; at least one is required.
pub fn load_certs(path: &Path) -> Result<Vec<CertificateDer<'static>>, TlsError> {
    let data = read(path)?;
    let certs: Vec<_> = CertificateDer::pem_slice_iter(&data)
        .collect::<Result<_, _>>()
        .map_err(|e| TlsError::NoCertificate {
            path: path.to_owned(),
            detail: e.to_string(),
        })?;
    if certs.is_empty() {
        return Err(TlsError::NoCertificate {
            path: path.to_owned(),
            detail: "the file has no CERTIFICATE block".into(),
        });
    }
    Ok(certs)
}

/// Loads the first private key of a PEM file.
pub fn load_key(path: &Path) -> Result<PrivateKeyDer<'static>, TlsError> {
    let data = read(path)?;
    PrivateKeyDer::from_pem_slice(&data).map_err(|e| TlsError::NoKey {
        path: path.to_owned(),
        detail: e.to_string(),
    })
}

/// Loads the CA certificate(s) that anchor all trust.
pub fn load_roots(path: &Path) -> Result<RootCertStore, TlsError> {
    let mut roots = RootCertStore::empty();
    for cert in load_certs(path)? {
        roots.add(cert).map_err(|e| TlsError::BadCa {
            path: path.to_owned(),
            detail: e.to_string(),
        })?;
    }
    Ok(roots)
}

/// Server side TLS: present `identity`; a client certificate, when presented, must be signed by
/// `roots`. A connection without one is let through the handshake only so that the server can
/// serve a join on it (ALPN `tether-join/1`) or refuse it with a log line naming the peer; it
/// never gets a tunnel.
pub fn server_config(
    roots: RootCertStore,
    identity: Identity,
    pq: PostQuantum,
) -> Result<rustls::ServerConfig, TlsError> {
    let provider = provider_for(pq);
    let verifier = WebPkiClientVerifier::builder_with_provider(Arc::new(roots), provider.clone())
        .allow_unauthenticated()
        .build()
        .map_err(|e| TlsError::Config(e.to_string()))?;
    let mut cfg = rustls::ServerConfig::builder_with_provider(provider)
        .with_protocol_versions(&[&rustls::version::TLS13])
        .map_err(|e| TlsError::Config(e.to_string()))?
        .with_client_cert_verifier(verifier)
        .with_single_cert(identity.chain, identity.key)
        .map_err(|e| TlsError::Config(e.to_string()))?;
    cfg.alpn_protocols = vec![ALPN.to_vec(), ALPN_JOIN.to_vec()];
    // No session resumption: a resumed session skips the client certificate's verification,
    // so it could bring back a certificate that has expired since. Every tunnel does a full
    // handshake (tunnels are long-lived; the cost is one signature per connect).
    cfg.session_storage = Arc::new(rustls::server::NoServerSessionStorage {});
    cfg.send_tls13_tickets = 0;
    Ok(cfg)
}

/// Client side TLS for a join: no client certificate; the server is trusted only if its chain
/// carries a CA whose SHA-256 (of the DER) is `ca_hash`, and its certificate verifies against
/// that CA for the dialed name.
pub fn join_client_config(
    ca_hash: &str,
    pq: PostQuantum,
) -> Result<rustls::ClientConfig, TlsError> {
    let verifier = Arc::new(PinnedCa {
        pin: ca_hash.to_ascii_lowercase(),
        provider: provider_for(pq),
    });
    let mut cfg = rustls::ClientConfig::builder_with_provider(provider_for(pq))
        .with_protocol_versions(&[&rustls::version::TLS13])
        .map_err(|e| TlsError::Config(e.to_string()))?
        .dangerous()
        .with_custom_certificate_verifier(verifier)
        .with_no_client_auth();
    cfg.alpn_protocols = vec![ALPN_JOIN.to_vec()];
    Ok(cfg)
}

/// Hex SHA-256 of a DER certificate.
pub fn cert_hash(der: &[u8]) -> String {
    let d = ring::digest::digest(&ring::digest::SHA256, der);
    d.as_ref().iter().map(|b| format!("{b:02x}")).collect()
}

/// Trusts a server only through the CA that a join token pins.
#[derive(Debug)]
struct PinnedCa {
    pin: String,
    provider: Arc<CryptoProvider>,
}

impl rustls::client::danger::ServerCertVerifier for PinnedCa {
    fn verify_server_cert(
        &self,
        end_entity: &CertificateDer<'_>,
        intermediates: &[CertificateDer<'_>],
        server_name: &rustls::pki_types::ServerName<'_>,
        ocsp_response: &[u8],
        now: rustls::pki_types::UnixTime,
    ) -> Result<rustls::client::danger::ServerCertVerified, rustls::Error> {
        let Some(ca) = intermediates.iter().find(|c| cert_hash(c) == self.pin) else {
            let sent: Vec<String> = intermediates.iter().map(|c| cert_hash(c)).collect();
            return Err(rustls::Error::General(format!(
                "the server's CA does not match the join token: the token pins {}, the server presented {}; check the token, or the server is not the one it claims to be",
                self.pin,
                if sent.is_empty() { "no CA".to_string() } else { sent.join(", ") }
            )));
        };
        let mut roots = RootCertStore::empty();
        roots
            .add(ca.clone().into_owned())
            .map_err(|e| rustls::Error::General(format!("pinned CA unusable: {e}")))?;
        let inner = rustls::client::WebPkiServerVerifier::builder_with_provider(
            Arc::new(roots),
            self.provider.clone(),
        )
        .build()
        .map_err(|e| rustls::Error::General(e.to_string()))?;
        // Through the chain the server sent: while a CA rotation runs, the server's certificate
        // is the new CA's, and a token made before it pins the old CA, which signed the new
        // one's key (the cross-signed certificate in the chain).
        inner.verify_server_cert(end_entity, intermediates, server_name, ocsp_response, now)
    }

    fn verify_tls12_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &rustls::DigitallySignedStruct,
    ) -> Result<rustls::client::danger::HandshakeSignatureValid, rustls::Error> {
        rustls::crypto::verify_tls12_signature(
            message,
            cert,
            dss,
            &self.provider.signature_verification_algorithms,
        )
    }

    fn verify_tls13_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &rustls::DigitallySignedStruct,
    ) -> Result<rustls::client::danger::HandshakeSignatureValid, rustls::Error> {
        rustls::crypto::verify_tls13_signature(
            message,
            cert,
            dss,
            &self.provider.signature_verification_algorithms,
        )
    }

    fn supported_verify_schemes(&self) -> Vec<rustls::SignatureScheme> {
        self.provider
            .signature_verification_algorithms
            .supported_schemes()
    }
}

/// Client side TLS: trust only `roots`, present `identity` as the client certificate.
pub fn client_config(
    roots: RootCertStore,
    identity: Identity,
    pq: PostQuantum,
) -> Result<rustls::ClientConfig, TlsError> {
    let mut cfg = rustls::ClientConfig::builder_with_provider(provider_for(pq))
        .with_protocol_versions(&[&rustls::version::TLS13])
        .map_err(|e| TlsError::Config(e.to_string()))?
        .with_root_certificates(roots)
        .with_client_auth_cert(identity.chain, identity.key)
        .map_err(|e| TlsError::Config(e.to_string()))?;
    cfg.alpn_protocols = vec![ALPN.to_vec()];
    Ok(cfg)
}

/// Liveness settings.
///
/// Two kinds of link, two rules. Server-to-server links sit on the masters' LAN: a keepalive
/// every `keepalive_interval` (500 ms) and a peer silent for `idle_timeout` (1.5 s: three
/// keepalives) is gone; the servers that survive a peer tell their agents at once
/// (`ServerDown`). That report is how an agent on a slow link, where silence alone proves
/// little, resets a dead server's streams within 3 s: at 2.5 s the report came 2.6 to 2.8 s
/// after the death and the streams were reset 3.0 to 3.2 s after it. Tunnels between an
/// agent and a server cross the edge link: the agent probes them (every `keepalive_interval`
/// when idle, 25 s by its default, for NAT bindings) and tells a dead server (silent for
/// `idle_timeout` while another server answers) from a dead link (every server silent), which it
/// holds for `blackout_tolerance` (`link::liveness` has the rules). Both transports hold a
/// silent tunnel that long, a little more, before they give up on their own.
#[derive(Debug, Clone, Copy)]
pub struct Liveness {
    pub keepalive_interval: Duration,
    pub idle_timeout: Duration,
    /// How long a tunnel whose whole link is silent is kept, with its streams.
    pub blackout_tolerance: Duration,
}

impl Default for Liveness {
    fn default() -> Self {
        Liveness {
            keepalive_interval: Duration::from_millis(500),
            idle_timeout: Duration::from_millis(1500),
            blackout_tolerance: Duration::from_secs(30),
        }
    }
}

impl Liveness {
    /// What the transports hold a silent tunnel for: the tolerance and a margin, so that the
    /// agent's own verdict (at the tolerance) comes first and names the cause.
    pub fn tunnel_idle_timeout(&self) -> Duration {
        self.blackout_tolerance.max(self.idle_timeout) + TUNNEL_IDLE_MARGIN
    }
}

/// See [`Liveness::tunnel_idle_timeout`].
pub const TUNNEL_IDLE_MARGIN: Duration = Duration::from_secs(5);

/// The congestion controller of QUIC tunnels (what this end sends with).
///
/// BBR is the default: it paces to the bottleneck's measured rate and round-trip time instead of
/// halving its window at every loss, so a link that drops one packet in a hundred at random
/// (radio, a busy uplink) still carries near its rate; with the window cap of
/// [`crate::congestion::CappedBbrConfig`] it also keeps the bottleneck's queue short, so a small
/// request behind a bulk transfer is not held up. Cubic and NewReno back off on every
/// loss: on the WAN lab's continental profile (100 ms, 1% loss) Cubic carried a twentieth of the
/// link (docs/performance.md, "Edge links"). They are kept for comparison and for links where
/// loss truly means congestion. TLS over TCP uses the kernel's controller.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum Congestion {
    #[default]
    Bbr,
    Cubic,
    NewReno,
}

impl std::str::FromStr for Congestion {
    type Err = UnknownCongestion;
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        match s {
            "bbr" => Ok(Congestion::Bbr),
            "cubic" => Ok(Congestion::Cubic),
            "newreno" => Ok(Congestion::NewReno),
            other => Err(UnknownCongestion(other.to_string())),
        }
    }
}

impl std::fmt::Display for Congestion {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            Congestion::Bbr => "bbr",
            Congestion::Cubic => "cubic",
            Congestion::NewReno => "newreno",
        })
    }
}

/// A congestion controller name that is not one of ours.
#[derive(Debug, thiserror::Error)]
#[error("unknown congestion controller {0:?}: use bbr, cubic or newreno")]
pub struct UnknownCongestion(String);

/// Limits of a tunnel: concurrent streams and flow-control windows.
#[derive(Debug, Clone, Copy)]
pub struct TunnelLimits {
    /// Most concurrent streams the peer may open towards us.
    pub max_streams: u32,
    /// Per stream receive window: what one stream may have in flight towards us.
    pub stream_window: u32,
    /// Connection window, receive and send: what all streams together may have in flight (and
    /// so what a tunnel may buffer at its peak; docs/performance.md has the trade-off).
    pub conn_window: u32,
    /// The QUIC congestion controller.
    pub congestion: Congestion,
    /// Whether the key exchange must be post-quantum (both transports, and joins).
    pub post_quantum: PostQuantum,
}

impl Default for TunnelLimits {
    fn default() -> Self {
        TunnelLimits {
            max_streams: 4096,
            stream_window: 2 * 1024 * 1024,
            conn_window: 4 * 1024 * 1024,
            congestion: Congestion::default(),
            post_quantum: PostQuantum::default(),
        }
    }
}

/// Streams a peer may open at first on a QUIC tunnel; doubled whenever half are in use.
pub const INITIAL_STREAMS: u32 = 64;

/// The QUIC transport settings of tunnels between agents and servers (both ends, and joins and
/// renewals): no keepalives of the transport's own (the agent probes, as seldom as NAT bindings
/// allow), and an idle timeout past the blackout tolerance. An older peer's keepalives and
/// shorter idle timeout still rule its tunnels: QUIC takes the shorter of the two ends' timeouts.
pub fn quic_transport(liveness: Liveness, limits: TunnelLimits) -> quinn::TransportConfig {
    let mut t = base_transport(limits);
    t.keep_alive_interval(None);
    if let Ok(idle) = quinn::IdleTimeout::try_from(liveness.tunnel_idle_timeout()) {
        t.max_idle_timeout(Some(idle));
    }
    t
}

/// The QUIC transport settings of a server's links to its peers: a keepalive every
/// `keepalive_interval`, and a peer silent for `idle_timeout` is gone (masters share a LAN, and
/// a dead peer must be known, and reported to agents, within seconds).
pub fn peer_quic_transport(liveness: Liveness, limits: TunnelLimits) -> quinn::TransportConfig {
    let mut t = base_transport(limits);
    t.keep_alive_interval(Some(liveness.keepalive_interval));
    if let Ok(idle) = quinn::IdleTimeout::try_from(liveness.idle_timeout) {
        t.max_idle_timeout(Some(idle));
    }
    t
}

fn base_transport(limits: TunnelLimits) -> quinn::TransportConfig {
    let mut t = quinn::TransportConfig::default();
    // Start small: QUIC implementations keep state for every stream the peer may open, about
    // 86 bytes each in quinn, whether used or not. The limit grows with use up to
    // `max_streams` (see `Tunnel::accept_stream`).
    t.max_concurrent_bidi_streams(limits.max_streams.min(INITIAL_STREAMS).into());
    t.max_concurrent_uni_streams(0u32.into());
    t.stream_receive_window(limits.stream_window.into());
    t.receive_window(limits.conn_window.into());
    t.send_window(u64::from(limits.conn_window));
    t.datagram_receive_buffer_size(None);
    match limits.congestion {
        Congestion::Bbr => {
            t.congestion_controller_factory(Arc::new(crate::congestion::CappedBbrConfig::default()))
        }
        Congestion::Cubic => {
            t.congestion_controller_factory(Arc::new(quinn::congestion::CubicConfig::default()))
        }
        Congestion::NewReno => {
            t.congestion_controller_factory(Arc::new(quinn::congestion::NewRenoConfig::default()))
        }
    };
    t
}

/// Wraps a server TLS config for QUIC.
pub fn quic_server_config(
    tls: rustls::ServerConfig,
    transport: quinn::TransportConfig,
) -> Result<quinn::ServerConfig, TlsError> {
    let crypto = quinn::crypto::rustls::QuicServerConfig::try_from(tls)
        .map_err(|e| TlsError::Config(e.to_string()))?;
    let mut cfg = quinn::ServerConfig::with_crypto(Arc::new(crypto));
    cfg.transport_config(Arc::new(transport));
    Ok(cfg)
}

/// Wraps a client TLS config for QUIC.
pub fn quic_client_config(
    tls: rustls::ClientConfig,
    transport: quinn::TransportConfig,
) -> Result<quinn::ClientConfig, TlsError> {
    let crypto = quinn::crypto::rustls::QuicClientConfig::try_from(tls)
        .map_err(|e| TlsError::Config(e.to_string()))?;
    let mut cfg = quinn::ClientConfig::new(Arc::new(crypto));
    cfg.transport_config(Arc::new(transport));
    Ok(cfg)
}

/// What tether reads from a peer's certificate.
#[derive(Debug, Clone)]
pub struct PeerInfo {
    /// The subject common name: the node name of an agent, the server's name of a server.
    pub common_name: String,
    /// When the certificate became valid, in seconds since the Unix epoch.
    pub not_before: i64,
    /// When the certificate expires, in seconds since the Unix epoch.
    pub not_after: i64,
    /// Whether the certificate may serve as a TLS server: only server certificates can, so a
    /// client presenting one is a peer server, not a node.
    pub server_auth: bool,
    /// Hex SHA-256 of the certificate's SubjectPublicKeyInfo: what the peer proves it holds.
    pub key_hash: String,
}

/// The ALPN protocol a QUIC connection agreed on.
/// The key-exchange group a QUIC connection's handshake agreed. quinn reports it only with its
/// feature `__rustls-post-quantum-test` (enabled in the workspace; the lock file pins the
/// version that has it).
pub fn key_exchange_of(conn: &quinn::Connection) -> Option<&'static str> {
    let data = conn
        .handshake_data()?
        .downcast::<quinn::crypto::rustls::HandshakeData>()
        .ok()?;
    Some(group_name(data.negotiated_key_exchange_group))
}

pub fn alpn_of(conn: &quinn::Connection) -> Option<Vec<u8>> {
    conn.handshake_data()?
        .downcast::<quinn::crypto::rustls::HandshakeData>()
        .ok()?
        .protocol
}

/// Reads the subject common name and expiry of a DER certificate.
pub fn peer_info(cert: &CertificateDer<'_>) -> Option<PeerInfo> {
    let (_, parsed) = x509_parser::parse_x509_certificate(cert.as_ref()).ok()?;
    let cn = parsed
        .subject()
        .iter_common_name()
        .next()?
        .as_str()
        .ok()?
        .to_owned();
    let server_auth = matches!(
        parsed.extended_key_usage(),
        Ok(Some(eku)) if eku.value.server_auth
    );
    Some(PeerInfo {
        common_name: cn,
        not_before: parsed.validity().not_before.timestamp(),
        not_after: parsed.validity().not_after.timestamp(),
        server_auth,
        key_hash: ring::digest::digest(
            &ring::digest::SHA256,
            parsed.tbs_certificate.subject_pki.raw,
        )
        .as_ref()
        .iter()
        .map(|b| format!("{b:02x}"))
        .collect(),
    })
}
