//! `tether-probe`: traffic for the network-namespace suite, run inside test hosts with
//! `ip netns exec`.
//!
//! - `tether-probe echo ADDR` serves an echo upstream until killed.
//! - `tether-probe check ADDR STREAMS MAX_BYTES SEED` runs STREAMS concurrent echo round trips of
//!   random sizes through ADDR, checks each by SHA-256, prints `probe: passed=N failed=M`, and
//!   exits 0 only when all passed.
//! - `tether-probe get ADDR PATH` prints the HTTP status code of a GET.

use std::net::SocketAddr;
use std::time::Duration;
use tether_tests::{echo_roundtrip, http_get, random_bytes, Echo};

fn usage() -> ! {
    eprintln!("usage: tether-probe echo ADDR | check ADDR STREAMS MAX_BYTES SEED | get ADDR PATH");
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
            let _echo = Echo::start_on(addr(args.get(1))).await;
            println!("probe: echo listening");
            std::future::pending::<()>().await;
        }
        Some("check") => {
            let (via, streams, max, seed) = (
                addr(args.get(1)),
                num(args.get(2)),
                num(args.get(3)),
                num(args.get(4)),
            );
            let mut tasks = tokio::task::JoinSet::new();
            for i in 0..streams {
                let size = fastrand::Rng::with_seed(seed + i).usize(..=max as usize);
                tasks.spawn(async move {
                    tokio::time::timeout(
                        Duration::from_secs(60),
                        echo_roundtrip(via, random_bytes(size, seed + i)),
                    )
                    .await
                    .unwrap_or_else(|_| Err("timed out".into()))
                });
            }
            let results = tasks.join_all().await;
            let errors: Vec<_> = results.into_iter().filter_map(Result::err).collect();
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
        Some("get") => {
            let path = args.get(2).cloned().unwrap_or_else(|| usage());
            match http_get(addr(args.get(1)), &path).await {
                Ok((code, _)) => println!("{code}"),
                Err(e) => {
                    println!("000 {e}");
                    std::process::exit(1);
                }
            }
        }
        _ => usage(),
    }
}
