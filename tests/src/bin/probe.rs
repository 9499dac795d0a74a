//! `tether-probe`: traffic for the network-namespace suite, run inside test hosts with
//! `ip netns exec`.
//!
//! - `tether-probe echo ADDR` serves an echo upstream until killed.
//! - `tether-probe check ADDR STREAMS MAX_BYTES SEED` runs STREAMS concurrent echo round trips of
//!   random sizes through ADDR, checks each by SHA-256, prints `probe: passed=N failed=M`, and
//!   exits 0 only when all passed.
//! - `tether-probe get ADDR PATH` prints the HTTP status code of a GET, then the body.
//! - `tether-probe load ADDR RATE STOP_FILE` opens RATE new connections a second (each a
//!   checksummed 1 KiB echo) until STOP_FILE exists, then prints `probe: passed=N failed=M` and
//!   one `probe: error at-ms=T ...` line per failure (T: Unix time in milliseconds).
//! - `tether-probe connect-check PROXY TARGET STREAMS MAX_BYTES SEED` is `check` through an
//!   HTTP CONNECT proxy to TARGET (host:port).
//! - `tether-probe kubelet ADDR CERT KEY` serves a stand-in kubelet over HTTPS; `kubelet ADDR`
//!   serves plain HTTP.
//! - `tether-probe hold ADDR` keeps one connection busy (a small echo every 20 ms, and a line
//!   `probe: hold echoes=N` every 50) until it fails, then prints
//!   `probe: hold broke at-ms=T: error`.
//! - `tether-probe connect-hold PROXY TARGET` is `hold` through an HTTP CONNECT proxy.

use std::net::SocketAddr;
use std::time::Duration;
use tether_tests::{echo_roundtrip, http_get, random_bytes, Echo};

fn usage() -> ! {
    eprintln!("usage: tether-probe echo ADDR | check ADDR STREAMS MAX_BYTES SEED | get ADDR PATH | load ADDR RATE STOP_FILE | hold ADDR");
    std::process::exit(2)
}

fn addr(s: Option<&String>) -> SocketAddr {
    s.and_then(|s| s.parse().ok()).unwrap_or_else(|| usage())
}

fn num(s: Option<&String>) -> u64 {
    s.and_then(|s| s.parse().ok()).unwrap_or_else(|| usage())
}

#[tokio::main]
async fn main() {
    let args: Vec<String> = std::env::args().skip(1).collect();
    match args.first().map(String::as_str) {
        Some("echo") => {
            let _echo = Echo::start_on(addr(args.get(1))).expect("echo");
            println!("probe: echo listening");
            std::future::pending::<()>().await;
        }
        Some("check") => {
            let via = addr(args.get(1));
            let (streams, max, seed) = (num(args.get(2)), num(args.get(3)), num(args.get(4)));
            check(streams, max, seed, move |data| echo_roundtrip(via, data)).await
        }
        Some("connect-check") => {
            let (proxy, target) = (
                addr(args.get(1)),
                args.get(2).cloned().unwrap_or_else(|| usage()),
            );
            let (streams, max, seed) = (num(args.get(3)), num(args.get(4)), num(args.get(5)));
            check(streams, max, seed, move |data| {
                let target = target.clone();
                async move { tether_tests::proxy_echo(proxy, &target, data).await }
            })
            .await
        }
        Some("kubelet") => {
            let at = addr(args.get(1));
            match (args.get(2), args.get(3)) {
                (Some(cert), Some(key)) => {
                    let id = tether_transport::tls::Identity::load(cert.as_ref(), key.as_ref())
                        .unwrap_or_else(|e| panic!("kubelet identity: {e}"));
                    let _k = tether_standin::StandIn::start_on("kubelet", id, at)
                        .await
                        .unwrap_or_else(|e| panic!("kubelet: {e}"));
                    println!("probe: kubelet (https) on {at}");
                    std::future::pending::<()>().await;
                }
                _ => {
                    let l = tokio::net::TcpListener::bind(at)
                        .await
                        .unwrap_or_else(|e| panic!("bind {at}: {e}"));
                    println!("probe: kubelet (http) on {at}");
                    loop {
                        if let Ok((mut c, _)) = l.accept().await {
                            tokio::spawn(async move {
                                use tokio::io::{AsyncReadExt, AsyncWriteExt};
                                let mut b = [0u8; 2048];
                                let _ = c.read(&mut b).await;
                                let _ = c.write_all(b"HTTP/1.1 200 OK\r\ncontent-length: 3\r\nconnection: close\r\n\r\nok\n").await;
                            });
                        }
                    }
                }
            }
        }
        Some("load") => load(addr(args.get(1)), num(args.get(2)), args.get(3)).await,
        Some("hold") => {
            let via = addr(args.get(1));
            hold(async move {
                tokio::net::TcpStream::connect(via)
                    .await
                    .map_err(|e| e.to_string())
            })
            .await
        }
        Some("connect-hold") => {
            let proxy = addr(args.get(1));
            let target = args.get(2).cloned().unwrap_or_else(|| usage());
            hold(async move { tether_tests::connect_proxy(proxy, &target).await }).await
        }
        Some("get") => {
            let path = args.get(2).cloned().unwrap_or_else(|| usage());
            match http_get(addr(args.get(1)), &path).await {
                Ok((code, body)) => println!("{code}\n{body}"),
                Err(e) => {
                    println!("000 {e}");
                    std::process::exit(1);
                }
            }
        }
        _ => usage(),
    }
}

fn now_ms() -> u128 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_millis())
        .unwrap_or(0)
}

async fn load(via: SocketAddr, rate: u64, stop: Option<&String>) {
    let stop = std::path::PathBuf::from(stop.cloned().unwrap_or_else(|| usage()));
    let mut tick = tokio::time::interval(Duration::from_micros(1_000_000 / rate.max(1)));
    let mut tasks = tokio::task::JoinSet::new();
    let mut i = 0u64;
    while !stop.exists() {
        tick.tick().await;
        i += 1;
        tasks.spawn(async move {
            let r = tokio::time::timeout(
                Duration::from_secs(20),
                echo_roundtrip(via, random_bytes(1024, i)),
            )
            .await
            .unwrap_or_else(|_| Err("timed out".into()));
            r.map_err(|e| format!("at-ms={} {e}", now_ms()))
        });
    }
    let results = tasks.join_all().await;
    let errors: Vec<_> = results.into_iter().filter_map(Result::err).collect();
    println!(
        "probe: passed={} failed={}",
        i as usize - errors.len(),
        errors.len()
    );
    for e in &errors {
        println!("probe: error {e}");
    }
}

async fn hold(connect: impl std::future::Future<Output = Result<tokio::net::TcpStream, String>>) {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let result: Result<(), String> = async {
        let mut c = connect.await?;
        let mut buf = [0u8; 64];
        println!("probe: hold connected");
        for n in 1u64.. {
            c.write_all(&[7u8; 64]).await.map_err(|e| e.to_string())?;
            c.read_exact(&mut buf).await.map_err(|e| e.to_string())?;
            if n % 50 == 0 {
                println!("probe: hold echoes={n}");
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        Ok(())
    }
    .await;
    if let Err(e) = result {
        println!("probe: hold broke at-ms={}: {e}", now_ms());
    }
}

/// Runs `streams` concurrent checked round trips of random sizes up to `max`, prints the
/// report, and exits 0 only when all passed.
async fn check<F, Fut>(streams: u64, max: u64, seed: u64, roundtrip: F) -> !
where
    F: Fn(Vec<u8>) -> Fut,
    Fut: std::future::Future<Output = Result<(), String>> + Send + 'static,
{
    let mut tasks = tokio::task::JoinSet::new();
    for i in 0..streams {
        let size = fastrand::Rng::with_seed(seed + i).usize(..=max as usize);
        let attempt = roundtrip(random_bytes(size, seed + i));
        tasks.spawn(async move {
            tokio::time::timeout(Duration::from_secs(60), attempt)
                .await
                .unwrap_or_else(|_| Err("timed out".into()))
        });
    }
    let errors: Vec<_> = tasks
        .join_all()
        .await
        .into_iter()
        .filter_map(Result::err)
        .collect();
    println!(
        "probe: passed={} failed={}",
        streams as usize - errors.len(),
        errors.len()
    );
    for e in errors.iter().take(5) {
        println!("probe: error: {e}");
    }
    std::process::exit(if errors.is_empty() { 0 } else { 1 });
}
