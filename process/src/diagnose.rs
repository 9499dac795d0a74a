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
        Check {
            name: name.into(),
            verdict: Verdict::Warn,
            detail: detail.into(),
            hint: Some(hint.into()),
        }
    }

    pub fn fail(
        name: impl Into<String>,
        detail: impl Into<String>,
        hint: impl Into<String>,
    ) -> Self {
        Check {
            name: name.into(),
            verdict: Verdict::Fail,
            detail: detail.into(),
            hint: Some(hint.into()),
        }
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
