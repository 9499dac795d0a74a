//! Running the real binaries as processes: for command-line contracts, `kill -9`, and the
//! network-namespace suite.

use std::path::{Path, PathBuf};
use std::process::Stdio;
use tokio::process::{Child, Command};

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

/// A child process, killed when dropped, its output in a log file.
pub struct Proc {
    pub child: Child,
    pub log: PathBuf,
    pub name: String,
}

impl Proc {
    pub fn spawn(name: &str, program: &Path, args: &[&str], log: PathBuf) -> Self {
        Self::spawn_cmd(name, Command::new(program).args(args), log)
    }

    pub fn spawn_cmd(name: &str, cmd: &mut Command, log: PathBuf) -> Self {
        let out = std::fs::File::create(&log).expect("create log");
        let err = out.try_clone().expect("clone log");
        let child = cmd
            .stdin(Stdio::null())
            .stdout(Stdio::from(out))
            .stderr(Stdio::from(err))
            .kill_on_drop(true)
            .spawn()
            .unwrap_or_else(|e| panic!("cannot start {name}: {e}"));
        Proc {
            child,
            log,
            name: name.to_string(),
        }
    }

    pub fn pid(&self) -> u32 {
        self.child.id().unwrap_or(0)
    }

    /// Sends a signal by name (`KILL`, `TERM`).
    pub fn signal(&self, sig: &str) {
        let _ = std::process::Command::new("kill")
            .arg(format!("-{sig}"))
            .arg(self.pid().to_string())
            .status();
    }

    pub fn log_text(&self) -> String {
        std::fs::read_to_string(&self.log).unwrap_or_default()
    }

    /// Whether the process is still running.
    pub fn running(&mut self) -> bool {
        matches!(self.child.try_wait(), Ok(None))
    }
}

/// A port free on loopback for both TCP and UDP right now.
pub fn free_port() -> u16 {
    loop {
        let udp = std::net::UdpSocket::bind("127.0.0.1:0").expect("bind udp");
        let port = udp.local_addr().expect("addr").port();
        if std::net::TcpListener::bind(("127.0.0.1", port)).is_ok() {
            return port;
        }
    }
}

/// Runs a command to completion and returns its stdout; panics with its output on failure.
pub fn run_ok(program: &Path, args: &[&str]) -> String {
    let out = std::process::Command::new(program)
        .args(args)
        .output()
        .unwrap_or_else(|e| panic!("cannot run {}: {e}", program.display()));
    let text = String::from_utf8_lossy(&out.stdout).into_owned();
    assert!(
        out.status.success(),
        "{} {args:?} failed: {}{}",
        program.display(),
        text,
        String::from_utf8_lossy(&out.stderr)
    );
    text
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
        let proc = Proc::spawn("server", &bin("tether-server"), &args, log);
        crate::wait_ready(admin, "server").await;
        ServerProcess { proc, addr, admin }
    }
}
