//! Logging set-up and the small Prometheus text-format toolkit both binaries use.
//!
//! Metrics are plain atomics owned by the component that counts them; rendering walks them and
//! writes the text exposition format. No registry, no global state, no allocation on the hot
//! path.

use std::fmt::Write;
use std::sync::atomic::{AtomicI64, AtomicU64, Ordering};

/// Installs the process's log subscriber. `RUST_LOG`, when set, wins over `level`.
pub fn init_logging(level: &str) {
    use tracing_subscriber::EnvFilter;
    let filter = EnvFilter::try_from_default_env()
        .or_else(|_| EnvFilter::try_new(level))
        .unwrap_or_else(|_| EnvFilter::new("info"));
    use std::io::IsTerminal;
    let _ = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr)
        // Colours only on a terminal: journald and log files get plain text.
        .with_ansi(std::io::stderr().is_terminal())
        .with_target(false)
        .try_init();
}

/// A monotonically increasing count.
#[derive(Debug, Default)]
pub struct Counter(AtomicU64);

impl Counter {
    pub fn inc(&self) {
        self.0.fetch_add(1, Ordering::Relaxed);
    }
    pub fn add(&self, n: u64) {
        self.0.fetch_add(n, Ordering::Relaxed);
    }
    pub fn get(&self) -> u64 {
        self.0.load(Ordering::Relaxed)
    }
}

/// A value that goes up and down.
#[derive(Debug, Default)]
pub struct Gauge(AtomicI64);

impl Gauge {
    pub fn inc(&self) {
        self.0.fetch_add(1, Ordering::Relaxed);
    }
    pub fn dec(&self) {
        self.0.fetch_sub(1, Ordering::Relaxed);
    }
    pub fn set(&self, v: i64) {
        self.0.store(v, Ordering::Relaxed);
    }
    pub fn get(&self) -> i64 {
        self.0.load(Ordering::Relaxed)
    }
}

/// Decrements a gauge when dropped, so that every exit path of a task counts down.
pub struct GaugeGuard<'a>(&'a Gauge);

impl<'a> GaugeGuard<'a> {
    pub fn new(g: &'a Gauge) -> Self {
        g.inc();
        GaugeGuard(g)
    }
}

impl Drop for GaugeGuard<'_> {
    fn drop(&mut self) {
        self.0.dec();
    }
}

/// Writes metrics in the Prometheus text exposition format.
#[derive(Default)]
pub struct Exposition {
    out: String,
}

impl Exposition {
    pub fn new() -> Self {
        Self::default()
    }

    fn header(&mut self, name: &str, help: &str, kind: &str) {
        let _ = writeln!(self.out, "# HELP {name} {help}");
        let _ = writeln!(self.out, "# TYPE {name} {kind}");
    }

    pub fn counter(&mut self, name: &str, help: &str, value: u64) {
        self.header(name, help, "counter");
        let _ = writeln!(self.out, "{name} {value}");
    }

    pub fn gauge(&mut self, name: &str, help: &str, value: i64) {
        self.header(name, help, "gauge");
        let _ = writeln!(self.out, "{name} {value}");
    }

    /// A family with one label; `values` are (label value, sample).
    pub fn labeled<V: std::fmt::Display>(
        &mut self,
        name: &str,
        help: &str,
        kind: &str,
        label: &str,
        values: &[(&str, V)],
    ) {
        self.header(name, help, kind);
        for (lv, v) in values {
            let _ = writeln!(self.out, "{name}{{{label}=\"{}\"}} {v}", escape(lv));
        }
    }

    pub fn finish(self) -> String {
        self.out
    }
}

fn escape(s: &str) -> String {
    s.replace('\\', "\\\\")
        .replace('"', "\\\"")
        .replace('\n', "\\n")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn renders_text_format() {
        let mut e = Exposition::new();
        e.counter("tether_x_total", "X.", 3);
        e.labeled("tether_y", "Y.", "gauge", "reason", &[("a\"b", 1)]);
        let s = e.finish();
        assert!(s.contains("# TYPE tether_x_total counter\ntether_x_total 3\n"));
        assert!(s.contains("tether_y{reason=\"a\\\"b\"} 1\n"));
    }
}
