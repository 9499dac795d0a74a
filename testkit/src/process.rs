//! Processes under test: started with stdout and stderr in a log file, killed (SIGKILL) and
//! reaped when dropped, so that a failing test or an interrupted bench leaves nothing running.

use crate::KitError;
use std::ffi::OsStr;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, ExitStatus, Stdio};

/// A child process that is killed when dropped.
pub struct Proc {
    pub name: String,
    /// Its stdout and stderr.
    pub log: PathBuf,
    child: Child,
}

impl Proc {
    /// Starts `program args` with stdout and stderr in `log`.
    pub fn spawn<S: AsRef<OsStr>>(
        name: &str,
        program: &Path,
        args: &[S],
        log: &Path,
    ) -> Result<Proc, KitError> {
        let mut cmd = Command::new(program);
        cmd.args(args);
        Self::spawn_cmd(name, &mut cmd, log)
    }

    /// Starts `cmd` (its program, arguments and environment as set) with stdout and stderr in
    /// `log`, stdin closed.
    pub fn spawn_cmd(name: &str, cmd: &mut Command, log: &Path) -> Result<Proc, KitError> {
        let out = std::fs::File::create(log)
            .map_err(KitError::io(format!("create {}", log.display())))?;
        let err = out
            .try_clone()
            .map_err(KitError::io(format!("open {}", log.display())))?;
        let child = cmd
            .stdin(Stdio::null())
            .stdout(out)
            .stderr(err)
            .spawn()
            .map_err(KitError::io(format!(
                "start {name} ({})",
                cmd.get_program().to_string_lossy()
            )))?;
        Ok(Proc {
            name: name.into(),
            log: log.to_path_buf(),
            child,
        })
    }

    pub fn pid(&self) -> u32 {
        self.child.id()
    }

    /// Sends a signal by name (`TERM`, `HUP`, `KILL`, `STOP`, `CONT`).
    pub fn signal(&self, sig: &str) {
        let _ = Command::new("kill")
            .arg(format!("-{sig}"))
            .arg(self.pid().to_string())
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .status();
    }

    /// SIGKILL and reap: what `kill -9` does to a server in a failover test.
    pub fn kill(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }

    /// How it exited, if it has (without waiting).
    pub fn exited(&mut self) -> Option<ExitStatus> {
        self.child.try_wait().ok().flatten()
    }

    /// Whether it is still running.
    pub fn running(&mut self) -> bool {
        self.exited().is_none()
    }

    /// An error when it has exited already.
    pub fn check_alive(&mut self) -> Result<(), KitError> {
        match self.exited() {
            Some(status) => Err(KitError::Exited(self.name.clone(), status)),
            None => Ok(()),
        }
    }

    /// Its log so far.
    pub fn log_text(&self) -> String {
        std::fs::read_to_string(&self.log).unwrap_or_default()
    }
}

impl Drop for Proc {
    fn drop(&mut self) {
        self.kill();
    }
}

/// A port free on loopback for both TCP and UDP right now (a server listens on both), for a
/// child process to take.
pub fn free_port() -> Result<u16, KitError> {
    loop {
        let udp = std::net::UdpSocket::bind("127.0.0.1:0").map_err(KitError::io("bind UDP"))?;
        let port = udp
            .local_addr()
            .map_err(KitError::io("UDP address"))?
            .port();
        if std::net::TcpListener::bind(("127.0.0.1", port)).is_ok() {
            return Ok(port);
        }
    }
}

/// Runs `program args` to completion and returns its stdout, or an error with its output.
pub fn run<S: AsRef<OsStr>>(program: &Path, args: &[S]) -> Result<String, KitError> {
    let command = std::iter::once(program.as_os_str())
        .chain(args.iter().map(AsRef::as_ref))
        .map(|a| a.to_string_lossy().into_owned())
        .collect::<Vec<_>>()
        .join(" ");
    let out = Command::new(program)
        .args(args)
        .output()
        .map_err(KitError::io(format!("run {command}")))?;
    let stdout = String::from_utf8_lossy(&out.stdout).into_owned();
    if !out.status.success() {
        return Err(KitError::Failed {
            command,
            status: out.status,
            stdout,
            stderr: String::from_utf8_lossy(&out.stderr).into_owned(),
        });
    }
    Ok(stdout)
}
