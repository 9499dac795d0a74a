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
/// child process to take, and to take again after a restart.
///
/// Taken below the kernel's ephemeral range (`ip_local_port_range`, 32768 and up by default):
/// a port from that range is free only until an outgoing connection is given it, and the soak
/// makes thousands. A CI run saw a killed server unable to start again because its egress
/// port had become a client connection's local port. Each port is handed out once per process.
pub fn free_port() -> Result<u16, KitError> {
    use std::sync::Mutex;
    static GIVEN: Mutex<Vec<u16>> = Mutex::new(Vec::new());
    let top = ephemeral_low().min(32768);
    let bottom = 20000.min(top.saturating_sub(1000));
    let mut given = GIVEN.lock().unwrap_or_else(|p| p.into_inner());
    // Start at a place of this process's own, so that concurrent test binaries rarely meet.
    let span = u32::from(top - bottom);
    let mut at = std::process::id()
        .wrapping_mul(7919)
        .wrapping_add(given.len() as u32 * 13)
        % span;
    for _ in 0..span {
        let port = bottom + at as u16;
        at = (at + 1) % span;
        if given.contains(&port) {
            continue;
        }
        let udp = std::net::UdpSocket::bind(("127.0.0.1", port));
        let tcp = std::net::TcpListener::bind(("127.0.0.1", port));
        if udp.is_ok() && tcp.is_ok() {
            given.push(port);
            return Ok(port);
        }
    }
    Err(KitError::Io {
        what: format!("no free port between {bottom} and {top}"),
        source: std::io::Error::from(std::io::ErrorKind::AddrInUse),
    })
}

/// The lowest port the kernel gives outgoing connections.
fn ephemeral_low() -> u16 {
    std::fs::read_to_string("/proc/sys/net/ipv4/ip_local_port_range")
        .ok()
        .and_then(|t| t.split_whitespace().next()?.parse().ok())
        .unwrap_or(32768)
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

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn free_ports_are_below_the_ephemeral_range_and_never_given_twice() {
        let ports: Vec<u16> = (0..200).map(|_| free_port().expect("a port")).collect();
        let low = ephemeral_low();
        assert!(ports.iter().all(|p| *p < low), "{ports:?}");
        let mut unique = ports.clone();
        unique.sort_unstable();
        unique.dedup();
        assert_eq!(unique.len(), ports.len());
    }
}
