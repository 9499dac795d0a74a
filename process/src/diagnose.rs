//! What `tether-agent diagnose` (and, later, `tether-server diagnose`) print: one line per
//! check, `ok`, `warn` or `fail`, with what was found and, when it is not ok, a hint; the same
//! as JSON with `--output json`; and the exit status scripts read: 0 when every check passed,
//! 1 with a warning, 2 with a failure.

use std::fmt::Write as _;

/// A check's outcome.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
pub enum Verdict {
    Ok,
    Warn,
    Fail,
}

impl Verdict {
    pub fn as_str(self) -> &'static str {
        match self {
            Verdict::Ok => "ok",
            Verdict::Warn => "warn",
            Verdict::Fail => "fail",
        }
    }
}

/// One check.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Check {
    /// What was checked, and of what (`tcp 10.0.0.1:9443`).
    pub name: String,
    pub verdict: Verdict,
    /// What was found.
    pub detail: String,
    /// What to do about it, when it is not ok.
    pub hint: Option<String>,
}

impl Check {
    pub fn ok(name: impl Into<String>, detail: impl Into<String>) -> Self {
        Check {
            name: name.into(),
            verdict: Verdict::Ok,
            detail: detail.into(),
            hint: None,
        }
    }

    pub fn warn(
        name: impl Into<String>,
        detail: impl Into<String>,
        hint: impl Into<String>,
    ) -> Self {
        Self::ok(name, detail).with(Verdict::Warn, hint)
    }

    pub fn fail(
        name: impl Into<String>,
        detail: impl Into<String>,
        hint: impl Into<String>,
    ) -> Self {
        Self::ok(name, detail).with(Verdict::Fail, hint)
    }

    fn with(mut self, verdict: Verdict, hint: impl Into<String>) -> Self {
        self.verdict = verdict;
        self.hint = Some(hint.into());
        self
    }
}

/// Every check, in the order they ran.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Report {
    pub checks: Vec<Check>,
}

impl Report {
    pub fn push(&mut self, c: Check) {
        self.checks.push(c);
    }

    /// The worst verdict (ok for no checks).
    pub fn worst(&self) -> Verdict {
        self.checks
            .iter()
            .map(|c| c.verdict)
            .max()
            .unwrap_or(Verdict::Ok)
    }

    /// 0 when every check passed, 1 with a warning, 2 with a failure.
    pub fn exit_code(&self) -> i32 {
        match self.worst() {
            Verdict::Ok => 0,
            Verdict::Warn => 1,
            Verdict::Fail => 2,
        }
    }

    /// One line per check (`ok   name  detail`), the hint indented under it.
    pub fn text(&self) -> String {
        let width = self.checks.iter().map(|c| c.name.len()).max().unwrap_or(0);
        let mut out = String::new();
        for c in &self.checks {
            let _ = writeln!(
                out,
                "{:<4}  {:<width$}  {}",
                c.verdict.as_str(),
                c.name,
                c.detail
            );
            if let Some(h) = &c.hint {
                let _ = writeln!(out, "{:<4}  {:<width$}  hint: {h}", "", "");
            }
        }
        out
    }

    /// The same as JSON: `{"result": "ok|warn|fail", "checks": [{"check", "result",
    /// "detail", "hint"}]}`.
    pub fn json(&self) -> String {
        let checks: Vec<serde_json::Value> = self
            .checks
            .iter()
            .map(|c| {
                serde_json::json!({
                    "check": c.name,
                    "result": c.verdict.as_str(),
                    "detail": c.detail,
                    "hint": c.hint,
                })
            })
            .collect();
        serde_json::json!({ "result": self.worst().as_str(), "checks": checks }).to_string()
    }
}

impl Report {
    /// Prints the report to stdout as `output` asks (`json`, else text) and returns the exit
    /// status.
    pub fn print(&self, output: &str) -> i32 {
        use std::io::Write as _;
        let out = match output {
            "json" => self.json() + "\n",
            _ => self.text(),
        };
        let mut stdout = std::io::stdout();
        let _ = stdout.write_all(out.as_bytes());
        let _ = stdout.flush();
        self.exit_code()
    }
}

/// The local listener `run` would bind, for the process called `program`: free, or held by
/// the running one.
pub fn listener(addr: std::net::SocketAddr, program: &str, flag: &str) -> Check {
    let name = format!("listener {addr}");
    match tether_endpoint::net::listen_tcp(addr) {
        Ok(_) => Check::ok(name, "free: `run` can listen there"),
        Err(e) if e.kind() == std::io::ErrorKind::AddrInUse => {
            match tether_endpoint::net::port_holder(addr.port()) {
                Some(h) if h.contains(program) => {
                    Check::ok(name, format!("held by the running {program}, pid {h}"))
                }
                Some(h) => Check::fail(
                    name,
                    format!("held by {h}"),
                    format!("another process listens there: stop it, or use {flag}"),
                ),
                None => Check::warn(
                    name,
                    "in use, by a process this user cannot see",
                    "run diagnose as root to see which, or `ss -ltnp`",
                ),
            }
        }
        Err(e) => Check::fail(name, e.to_string(), format!("check {flag}")),
    }
}

/// The running `program`'s admin endpoint (`--admin`), asked for `/readyz`. Blocking: call it
/// on a blocking thread from async code.
pub fn admin(addr: Option<std::net::SocketAddr>, program: &str, example: &str) -> Check {
    let Some(addr) = addr else {
        return Check::warn(
            "admin",
            format!("no --admin: a running {program} cannot be asked"),
            format!("set --admin {example} (also for metrics and `status`)"),
        );
    };
    let name = format!("admin {addr}");
    let got = tether_endpoint::http::get_blocking(
        &addr.to_string(),
        "/readyz",
        std::time::Duration::from_secs(2),
    );
    match got {
        Ok((200, _)) => Check::ok(name, format!("the running {program} is ready")),
        Ok((code, body)) => Check::warn(
            name,
            format!(
                "the running {program} is not ready ({code}: {})",
                String::from_utf8_lossy(&body).trim()
            ),
            format!("its log says why; `{program} status` shows more"),
        ),
        Err(_) => Check::warn(
            name,
            format!("no {program} answers there"),
            format!("it is not running (`systemctl status {program}`), or its --admin differs"),
        ),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_worst_check_sets_the_exit_status() {
        let mut r = Report::default();
        assert_eq!(r.exit_code(), 0);
        r.push(Check::ok("a", "fine"));
        assert_eq!(r.exit_code(), 0);
        r.push(Check::warn("b", "odd", "look"));
        assert_eq!(r.exit_code(), 1);
        r.push(Check::fail("c", "broken", "fix"));
        assert_eq!(r.exit_code(), 2);
        let text = r.text();
        assert!(text.starts_with("ok    a  fine\n"), "{text}");
        assert!(
            text.contains("fail  c  broken\n         hint: fix\n"),
            "{text}"
        );
        let v: serde_json::Value = serde_json::from_str(&r.json()).unwrap_or_default();
        assert_eq!(v["result"], "fail");
        assert_eq!(v["checks"][1]["hint"], "look");
    }
}
