//! The shared harness of tether's integration and end-to-end tests.
//!
//! Everything here is real: certificates made by `tether-trust`, servers and agents started
//! in-process through their libraries (or as processes from the built binaries), TCP and UDP
//! sockets on loopback, TLS end to end. Nothing is mocked. Waits are for conditions, each with a
//! deadline, never bare sleeps.

use ring::digest::{Context, SHA256};
use std::future::Future;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};
use tether_agent::config::AgentConfig;
use tether_agent::AgentHandle;
use tether_endpoint::http;
use tether_server::config::ServerConfig;
use tether_server::ServerHandle;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};

pub mod etcd;
pub mod netns;
pub mod process;

/// Logs of the code under test show up in failing tests' output.
pub fn init_logging() {
    let _ = tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_default_env()
                .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("warn")),
        )
        .with_test_writer()
        .try_init();
}

/// A directory removed when dropped.
pub struct TempDir(PathBuf);

impl TempDir {
    pub fn new(tag: &str) -> Self {
        static N: AtomicU64 = AtomicU64::new(0);
        let n = N.fetch_add(1, Ordering::Relaxed);
        let p = std::env::temp_dir().join(format!(
            "tether-test-{tag}-{}-{n}-{}",
            std::process::id(),
            fastrand::u32(..)
        ));
        std::fs::create_dir_all(&p).expect("create temp dir");
        TempDir(p)
    }

    pub fn path(&self) -> &Path {
        &self.0
    }
}

impl Drop for TempDir {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

/// A cluster's certificates: a server data directory and agent directories, all from one CA.
pub struct Pki {
    pub dir: TempDir,
}

/// `localhost`, `127.0.0.1` and `::1`: what a server certificate must name for tests to dial it
/// on loopback.
pub fn loopback_names() -> Vec<String> {
    tether_trust::LOOPBACK_NAMES
        .iter()
        .map(|s| s.to_string())
        .collect()
}

impl Pki {
    pub fn new() -> Self {
        Self::with_sans(&[])
    }

    /// A PKI whose server certificate names loopback (where the tests dial) and `sans` (the
    /// addresses of test hosts).
    pub fn with_sans(sans: &[String]) -> Self {
        let dir = TempDir::new("pki");
        let mut names = loopback_names();
        names.extend(sans.iter().cloned());
        tether_trust::init(&dir.path().join("server"), &names, 3650, 365).expect("init");
        Pki { dir }
    }

    pub fn server_dir(&self) -> PathBuf {
        self.dir.path().join("server")
    }

    /// Issues (once) and returns the directory of an agent certificate for `node`.
    pub fn agent_dir(&self, node: &str) -> PathBuf {
        let out = self.dir.path().join(format!("agent-{node}"));
        if !out.join("agent.crt").exists() {
            tether_trust::issue_agent_files(&self.server_dir(), node, &out, 365)
                .expect("issue agent");
        }
        out
    }
}

impl Pki {
    /// An agent certificate for `node` valid from `from` to `until`, relative to now (seconds;
    /// negative for the past), signed by this PKI's CA and recorded nowhere.
    pub fn agent_cert(&self, node: &str, from: i64, until: i64) -> tether_trust::Issued {
        let ca = tether_trust::Ca::load(&self.server_dir()).expect("CA");
        let now = time::OffsetDateTime::now_utc();
        ca.issue_agent(
            node,
            tether_trust::Lifetime {
                not_before: now + time::Duration::seconds(from),
                not_after: now + time::Duration::seconds(until),
            },
        )
        .expect("issue agent certificate")
    }
}

impl Default for Pki {
    fn default() -> Self {
        Self::new()
    }
}

/// Server settings for tests: loopback, an ephemeral port, the given upstream.
pub fn server_config(pki: &Pki, upstream: SocketAddr) -> ServerConfig {
    let mut c = ServerConfig::new(pki.server_dir());
    c.listen = "127.0.0.1:0".parse().expect("addr");
    c.upstream = upstream.to_string();
    c
}

pub async fn start_server(pki: &Pki, upstream: SocketAddr) -> ServerHandle {
    tether_server::start(server_config(pki, upstream))
        .await
        .expect("server starts")
}

/// Agent settings for tests: loopback listener on an ephemeral port.
pub fn agent_config(pki: &Pki, node: &str, servers: &[SocketAddr]) -> AgentConfig {
    let mut c = AgentConfig::new(
        servers.iter().map(|s| s.to_string()).collect(),
        pki.agent_dir(node),
    );
    c.listen = "127.0.0.1:0".parse().expect("addr");
    c
}

/// Starts an agent and waits until all its tunnels are up.
pub async fn start_agent(pki: &Pki, node: &str, servers: &[SocketAddr]) -> AgentHandle {
    start_agent_over(pki, node, servers, TransportChoice::Auto).await
}

pub use tether_link::reconnect::TransportChoice;

/// Starts an agent on the given transport and waits until all its tunnels are up.
pub async fn start_agent_over(
    pki: &Pki,
    node: &str,
    servers: &[SocketAddr],
    transport: TransportChoice,
) -> AgentHandle {
    let mut c = agent_config(pki, node, servers);
    c.transport = transport;
    let agent = tether_agent::start(c).await.expect("agent starts");
    wait_for("agent tunnels up", Duration::from_secs(10), || async {
        agent.tunnels_up() == servers.len()
    })
    .await;
    agent
}

/// Agent settings for a node that has no certificate yet: it joins through `server` with
/// `token` under the name `node`, keeping its identity in `dir`.
pub fn joining_agent(dir: &TempDir, node: &str, server: SocketAddr, token: &str) -> AgentConfig {
    let mut c = AgentConfig::new(vec![server.to_string()], dir.path().to_path_buf());
    c.listen = "127.0.0.1:0".parse().expect("addr");
    c.token = Some(token.to_string());
    c.node_name = Some(node.to_string());
    c
}

/// Whether `cond` (a future, made anew for each look) comes true within `deadline`, looking
/// every 10 ms: for callers that report a failure their own way.
pub async fn eventually<F: Future<Output = bool>>(
    deadline: Duration,
    mut cond: impl FnMut() -> F,
) -> bool {
    let start = Instant::now();
    loop {
        if cond().await {
            return true;
        }
        if start.elapsed() > deadline {
            return false;
        }
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
}

/// Waits until `cond` (a future, made anew for each look) comes true; panics after `deadline`
/// naming `what`.
pub async fn wait_for<F: Future<Output = bool>>(
    what: &str,
    deadline: Duration,
    cond: impl FnMut() -> F,
) {
    assert!(
        eventually(deadline, cond).await,
        "timed out after {deadline:?} waiting for: {what}"
    );
}

/// Waits until the admin endpoint at `admin` answers `/readyz` with 200; panics after 20 s.
pub async fn wait_ready(admin: SocketAddr, what: &str) {
    let ready = || async { matches!(http_get(admin, "/readyz").await, Ok((200, _))) };
    wait_for(
        &format!("{what} to be ready"),
        Duration::from_secs(20),
        ready,
    )
    .await;
}

/// Runs `fut` with a deadline; panics with `what` if it does not finish in time.
pub async fn within<T>(what: &str, deadline: Duration, fut: impl Future<Output = T>) -> T {
    match tokio::time::timeout(deadline, fut).await {
        Ok(v) => v,
        Err(_) => panic!("timed out after {deadline:?}: {what}"),
    }
}

pub fn sha256(data: &[u8]) -> String {
    hex::encode(ring::digest::digest(&SHA256, data).as_ref())
}

/// Deterministic pseudo-random bytes.
pub fn random_bytes(len: usize, seed: u64) -> Vec<u8> {
    let mut rng = fastrand::Rng::with_seed(seed);
    let mut v = vec![0u8; len];
    rng.fill(&mut v);
    v
}

/// 127.0.0.1 port 0: a fresh ephemeral port on loopback.
pub fn loopback0() -> SocketAddr {
    SocketAddr::from(([127, 0, 0, 1], 0))
}

pub use tether_testkit::upstream::{Echo, Sink, SinkAnswer};

/// An echo upstream on a fresh loopback port (the kit's [`Echo`]).
pub fn start_echo() -> Echo {
    Echo::start().unwrap_or_else(|e| panic!("cannot start an echo upstream: {e}"))
}

/// A sink upstream on a fresh loopback port that answers the SHA-256 and the count of what it
/// got (the kit's [`Sink`]).
pub fn start_sink() -> Sink {
    Sink::start(SinkAnswer::Sha256).unwrap_or_else(|e| panic!("cannot start a sink upstream: {e}"))
}

/// Sends `data` through `addr` to an echo upstream, half-closes, reads the echo to the end, and
/// checks it byte for byte.
pub async fn echo_roundtrip(addr: SocketAddr, data: Vec<u8>) -> Result<(), String> {
    let c = TcpStream::connect(addr)
        .await
        .map_err(|e| format!("connect: {e}"))?;
    echo_on(c, data).await
}

/// Sends `data` on a connection whose far end echoes, half-closes, reads the echo to the end,
/// and checks it byte for byte.
pub async fn echo_on(c: TcpStream, data: Vec<u8>) -> Result<(), String> {
    let (mut r, mut w) = c.into_split();
    // The first bytes go at once, as a real client's would (a TLS ClientHello follows the
    // connect): hashing or a task switch first would let the open's verdict overtake them.
    let first = if data.is_empty() {
        0
    } else {
        w.write(&data[..data.len().min(16 * 1024)])
            .await
            .map_err(|e| format!("write: {e}"))?
    };
    let expect = sha256(&data);
    let len = data.len();
    let writer = tokio::spawn(async move {
        w.write_all(&data[first..]).await?;
        w.shutdown().await
    });
    let mut got = Vec::with_capacity(len);
    r.read_to_end(&mut got)
        .await
        .map_err(|e| format!("read after {} of {len} bytes: {e}", got.len()))?;
    writer
        .await
        .map_err(|e| format!("writer: {e}"))?
        .map_err(|e| format!("write: {e}"))?;
    if got.len() != len {
        return Err(format!("echo returned {} of {len} bytes", got.len()));
    }
    if sha256(&got) != expect {
        return Err("echo differs from what was sent".into());
    }
    Ok(())
}

/// Streams `len` pseudo-random bytes to a [`Sink`] through `addr` and checks its digest.
pub async fn sink_transfer(addr: SocketAddr, len: u64, seed: u64) -> Result<(), String> {
    let mut c = TcpStream::connect(addr)
        .await
        .map_err(|e| format!("connect: {e}"))?;
    let mut rng = fastrand::Rng::with_seed(seed);
    let mut ctx = Context::new(&SHA256);
    let mut chunk = vec![0u8; 256 * 1024];
    let mut sent = 0u64;
    while sent < len {
        let n = chunk.len().min((len - sent) as usize);
        rng.fill(&mut chunk[..n]);
        ctx.update(&chunk[..n]);
        c.write_all(&chunk[..n])
            .await
            .map_err(|e| format!("write at {sent}: {e}"))?;
        sent += n as u64;
    }
    c.shutdown().await.map_err(|e| format!("shutdown: {e}"))?;
    let mut answer = String::new();
    c.read_to_string(&mut answer)
        .await
        .map_err(|e| format!("read digest: {e}"))?;
    let expect = format!("{} {len}", hex::encode(ctx.finish().as_ref()));
    if answer != expect {
        return Err(format!("sink saw {answer:?}, expected {expect:?}"));
    }
    Ok(())
}

/// Accepts the next connection that sends data, returning it and its first byte.
///
/// Servers check their upstream with a bare TCP connect every second; those connections close
/// without a byte and are skipped here.
pub async fn accept_data(l: &TcpListener) -> (TcpStream, u8) {
    loop {
        let (mut c, _) = l.accept().await.expect("accept");
        let mut one = [0u8; 1];
        if let Ok(Ok(1)) = tokio::time::timeout(Duration::from_secs(5), c.read(&mut one)).await {
            return (c, one[0]);
        }
    }
}

/// Sends CONNECT on a proxy connection (plain or TLS). Returns the answer's status, its body
/// when it is a refusal, and the connection (on 200, a tunnel to the target).
pub async fn connect_on<S: tokio::io::AsyncRead + tokio::io::AsyncWrite + Unpin>(
    mut io: S,
    target: &str,
) -> std::io::Result<(u16, String, S)> {
    let bad = |e: String| std::io::Error::new(std::io::ErrorKind::InvalidData, e);
    io.write_all(format!("CONNECT {target} HTTP/1.1\r\nHost: {target}\r\n\r\n").as_bytes())
        .await?;
    let (head, rest) = http::read_head(&mut io)
        .await
        .map_err(|e| bad(format!("proxy answer: {e}")))?;
    let (code, _) = http::parse_response(&head)?;
    let mut body = rest.to_vec();
    if code == 200 {
        // The target has been sent nothing yet, so nothing of it may follow the answer.
        if !body.is_empty() {
            return Err(bad(format!(
                "{} bytes after the proxy's answer",
                body.len()
            )));
        }
    } else {
        let _ = io.read_to_end(&mut body).await;
    }
    Ok((code, String::from_utf8_lossy(&body).into_owned(), io))
}

/// Opens a tunnel through an HTTP CONNECT proxy; the error carries the proxy's status.
pub async fn connect_proxy(proxy: SocketAddr, target: &str) -> Result<TcpStream, String> {
    let c = TcpStream::connect(proxy)
        .await
        .map_err(|e| format!("connect to proxy: {e}"))?;
    match connect_on(c, target).await {
        Ok((200, _, c)) => Ok(c),
        Ok((code, body, _)) => Err(format!("HTTP/1.1 {code}: {}", body.trim())),
        Err(e) => Err(e.to_string()),
    }
}

/// Echo round trip through a CONNECT proxy.
pub async fn proxy_echo(proxy: SocketAddr, target: &str, data: Vec<u8>) -> Result<(), String> {
    echo_on(connect_proxy(proxy, target).await?, data).await
}

/// Fetches a path from an admin endpoint; returns the status code and body.
pub async fn http_get(addr: SocketAddr, path: &str) -> std::io::Result<(u16, String)> {
    let mut c = TcpStream::connect(addr).await?;
    let (code, body) = http::get(&mut c, "x", path, 64 << 20).await?;
    Ok((code, String::from_utf8_lossy(&body).into_owned()))
}

/// Reads one sample of a metric from Prometheus text.
pub fn metric(text: &str, name: &str) -> Option<f64> {
    text.lines().filter(|l| !l.starts_with('#')).find_map(|l| {
        let (n, v) = l.rsplit_once(' ')?;
        (n == name).then(|| v.parse().ok())?
    })
}

/// Opens a tunnel's control stream as an agent called `name` would: its hello, then the
/// server's welcome. The stream is left open for what the test sends next.
pub async fn say_hello(
    tunnel: &tether_transport::transport::Tunnel,
    name: &str,
) -> tether_transport::transport::Stream {
    say_hello_with(
        tunnel,
        name,
        tether_proto::capability::Capabilities::ours(&[]),
    )
    .await
}

/// [`say_hello`] announcing `capabilities` (an older agent's, say).
pub async fn say_hello_with(
    tunnel: &tether_transport::transport::Tunnel,
    name: &str,
    capabilities: Vec<String>,
) -> tether_transport::transport::Stream {
    use tether_proto::Message;
    let mut control = tunnel.open_stream().await.expect("control stream");
    let hello = Message::Hello {
        min_version: tether_proto::MIN_PROTOCOL_VERSION,
        max_version: tether_proto::PROTOCOL_VERSION,
        node_name: name.into(),
        capabilities,
    };
    control.send.write_message(&hello).await.expect("hello");
    let welcome = within(
        "welcome",
        Duration::from_secs(5),
        control.recv.read_message(),
    )
    .await;
    assert!(
        matches!(welcome, Ok(Some(Message::Welcome { .. }))),
        "{welcome:?}"
    );
    control
}

/// A QUIC client of our own, to send what a real agent never would: with the certificate of
/// `identity` (issued once by the test PKI) or none, on ALPN `tether/1`.
pub async fn raw_client(
    pki: &Pki,
    identity: Option<&str>,
    server: SocketAddr,
) -> Result<quinn::Connection, String> {
    let id = identity.map(|node| {
        let dir = pki.agent_dir(node);
        tether_transport::tls::Identity::load(&dir.join("agent.crt"), &dir.join("agent.key"))
            .expect("agent identity")
    });
    raw_client_with(pki, id, tether_transport::tls::ALPN, server).await
}

/// [`raw_client`] with any identity and ALPN.
pub async fn raw_client_with(
    pki: &Pki,
    identity: Option<tether_transport::tls::Identity>,
    alpn: &[u8],
    server: SocketAddr,
) -> Result<quinn::Connection, String> {
    use tether_transport::tls;
    let roots = tls::load_roots(&pki.server_dir().join("ca.crt")).expect("CA");
    let builder = rustls::ClientConfig::builder_with_provider(tls::provider())
        .with_protocol_versions(&[&rustls::version::TLS13])
        .expect("TLS 1.3")
        .with_root_certificates(roots);
    let mut cfg = match identity {
        Some(id) => builder
            .with_client_auth_cert(id.chain, id.key)
            .expect("client identity"),
        None => builder.with_no_client_auth(),
    };
    cfg.alpn_protocols = vec![alpn.to_vec()];
    let client = tls::quic_client_config(
        cfg,
        tls::quic_transport(Default::default(), Default::default()),
    )
    .expect("QUIC client config");
    let ep = quinn::Endpoint::client(loopback0()).map_err(|e| e.to_string())?;
    let conn = ep
        .connect_with(client, server, "localhost")
        .map_err(|e| e.to_string())?
        .await
        .map_err(|e| e.to_string())?;
    Ok(conn)
}

/// The resident set size of a process, in KiB (0 when it cannot be read).
pub fn rss_kib(pid: u32) -> u64 {
    std::fs::read_to_string(format!("/proc/{pid}/status"))
        .unwrap_or_default()
        .lines()
        .find_map(|l| l.strip_prefix("VmRSS:"))
        .and_then(|v| v.trim().trim_end_matches("kB").trim().parse().ok())
        .unwrap_or(0)
}

/// Two servers with data directories of their own (one CA), peers of each other, both relaying
/// to one echo upstream.
pub struct PeeredPair {
    pub pki: Pki,
    /// The second server's data directory (the first's is `pki.server_dir()`).
    pub second: TempDir,
    pub servers: Vec<ServerHandle>,
    pub addrs: [SocketAddr; 2],
    pub echo: Echo,
}

impl PeeredPair {
    /// Starts both and waits until each has its link to the other.
    pub async fn start() -> Self {
        Self::start_with(|_| {}).await
    }

    /// [`start`](Self::start), with each server's settings changed by `tweak` first.
    pub async fn start_with(tweak: impl Fn(&mut ServerConfig)) -> Self {
        let pki = Pki::new();
        let second = TempDir::new("second-server");
        for f in ["ca.crt", "ca.key"] {
            std::fs::copy(pki.server_dir().join(f), second.path().join(f)).expect("copy CA");
        }
        tether_trust::init(second.path(), &loopback_names(), 1, 1).expect("init the second server");
        let echo = start_echo();
        let port = || crate::process::free_port();
        let addrs: [SocketAddr; 2] = [
            ([127, 0, 0, 1], port()).into(),
            ([127, 0, 0, 1], port()).into(),
        ];
        let mut c1 = server_config(&pki, echo.addr);
        c1.listen = addrs[0];
        c1.peers = vec![addrs[1].to_string()];
        let mut c2 = c1.clone();
        c2.data_dir = second.path().to_path_buf();
        c2.listen = addrs[1];
        c2.peers = vec![addrs[0].to_string()];
        tweak(&mut c1);
        tweak(&mut c2);
        let s1 = tether_server::start(c1).await.expect("first server starts");
        let s2 = tether_server::start(c2)
            .await
            .expect("second server starts");
        wait_for("peers linked", Duration::from_secs(10), || async {
            s1.peers_up() == 1 && s2.peers_up() == 1
        })
        .await;
        PeeredPair {
            pki,
            second,
            servers: vec![s1, s2],
            addrs,
            echo,
        }
    }

    pub async fn shutdown(self) {
        for s in self.servers {
            s.shutdown().await;
        }
    }
}
