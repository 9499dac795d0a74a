//! Running the real binaries as processes: for command-line contracts, `kill -9`, and the
//! network-namespace suite.

use std::path::{Path, PathBuf};
use std::process::Command;

/// The built `tether-server`, `tether-agent` or `tether-probe` binary beside the test binary.
///
/// `cargo test` does not build other packages' binaries for this crate, so `scripts/test`
/// (and `.ci/run`) build them first.
pub fn bin(name: &str) -> PathBuf {
    let exe = std::env::current_exe().expect("test binary path");
    let dir = exe
        .parent()
        .and_then(|deps| deps.parent())
        .expect("target directory");
    let path = dir.join(name);
    assert!(
        path.exists(),
        "{} is missing: build the binaries first with `cargo build --workspace --bins` (scripts/test does)",
        path.display()
    );
    path
}

pub use tether_testkit::Proc;

/// Starts `program args` with its output in `log` (the kit's [`Proc`]); panics when it cannot.
pub fn spawn(name: &str, program: &Path, args: &[&str], log: PathBuf) -> Proc {
    Proc::spawn(name, program, args, &log).unwrap_or_else(|e| panic!("{e}"))
}

/// Starts `cmd` with its output in `log`; panics when it cannot.
pub fn spawn_cmd(name: &str, cmd: &mut Command, log: PathBuf) -> Proc {
    Proc::spawn_cmd(name, cmd, &log).unwrap_or_else(|e| panic!("{e}"))
}

/// Waits for `p` to exit, and returns how it did (wrap it in `within` for a deadline).
pub async fn exit(p: &mut Proc) -> std::process::ExitStatus {
    loop {
        if let Some(status) = p.exited() {
            return status;
        }
        tokio::time::sleep(std::time::Duration::from_millis(20)).await;
    }
}

/// A port free on loopback for both TCP and UDP right now.
pub fn free_port() -> u16 {
    tether_testkit::free_port().unwrap_or_else(|e| panic!("no free port: {e}"))
}

/// Runs a command to completion and returns its stdout; panics with its output on failure.
pub fn run_ok(program: &Path, args: &[&str]) -> String {
    tether_testkit::run(program, args).unwrap_or_else(|e| panic!("{e}"))
}

/// A `tether-server run` process on loopback, with an admin endpoint.
pub struct ServerProcess {
    pub proc: Proc,
    /// The QUIC (UDP) and TLS (TCP) port.
    pub addr: std::net::SocketAddr,
    pub admin: std::net::SocketAddr,
}

impl ServerProcess {
    /// Starts the real binary on `data_dir` with `upstream`, plus `extra` flags, and waits
    /// until its admin endpoint says it is ready.
    pub async fn start(
        data_dir: &Path,
        upstream: std::net::SocketAddr,
        extra: &[&str],
        log: PathBuf,
    ) -> Self {
        let addr: std::net::SocketAddr = ([127, 0, 0, 1], free_port()).into();
        let admin: std::net::SocketAddr = ([127, 0, 0, 1], free_port()).into();
        let (data, addr_s, up, admin_s) = (
            data_dir.to_str().expect("utf-8 path").to_string(),
            addr.to_string(),
            upstream.to_string(),
            admin.to_string(),
        );
        let mut args = vec![
            "run",
            "--data-dir",
            &data,
            "--listen",
            &addr_s,
            "--upstream",
            &up,
            "--admin",
            &admin_s,
        ];
        args.extend_from_slice(extra);
        let proc = spawn("server", &bin("tether-server"), &args, log);
        crate::wait_ready(admin, "server").await;
        ServerProcess { proc, addr, admin }
    }
}
