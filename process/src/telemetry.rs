//! Logging set-up and the small Prometheus text-format toolkit both binaries use.
//!
//! Metrics are plain atomics owned by the component that counts them; rendering walks them and
//! writes the text exposition format. No registry, no global state, no allocation on the hot
//! path.

use std::fmt::Write;
use std::sync::atomic::{AtomicI64, AtomicU64, Ordering};

/// How log lines are written.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, clap::ValueEnum)]
pub enum LogFormat {
    /// One human-readable line per event.
    #[default]
    Text,
    /// One JSON object per line, for log collectors.
    Json,
}

/// The logging flags of both binaries (global: before or after the subcommand).
#[derive(Debug, Clone, clap::Args)]
pub struct LogArgs {
    /// Log level (error, warn, info, debug, trace) or a filter; RUST_LOG wins when set.
    /// Default: info (warn for the server's demo, whose own output tells the story).
    #[arg(long, env = "TETHER_LOG_LEVEL", global = true)]
    pub log_level: Option<String>,
    /// Log format: text for people, json for log collectors.
    #[arg(
        long,
        env = "TETHER_LOG_FORMAT",
        value_enum,
        default_value = "text",
        global = true
    )]
    pub log_format: LogFormat,
}

impl LogArgs {
    /// Starts logging at the level asked for, else at `default_level`.
    pub fn init(&self, default_level: &str) {
        init_logging(
            self.log_level.as_deref().unwrap_or(default_level),
            self.log_format,
        );
    }
}

/// Installs the process's log subscriber. `RUST_LOG`, when set, wins over `level`.
pub fn init_logging(level: &str, format: LogFormat) {
    use tracing_subscriber::EnvFilter;
    let filter = EnvFilter::try_from_default_env()
        .or_else(|_| EnvFilter::try_new(level))
        .unwrap_or_else(|_| EnvFilter::new("info"));
    use std::io::IsTerminal;
    let builder = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr)
        .with_target(false);
    let _ = match format {
        // Colours only on a terminal: journald and log files get plain text.
        LogFormat::Text => builder
            .with_ansi(std::io::stderr().is_terminal())
            .try_init(),
        LogFormat::Json => builder
            .json()
            .flatten_event(true)
            .with_current_span(false)
            .try_init(),
    };
}

/// Lets one log line through per `interval` for a repeated error (a client that keeps sending
/// garbage, a socket that keeps failing) and counts the rest, so that the next line says how
/// many were left out and a flood cannot fill the disk.
#[derive(Debug)]
pub struct Throttle {
    interval_ms: u64,
    start: std::time::Instant,
    next_ms: AtomicU64,
    suppressed: AtomicU64,
}

impl Throttle {
    pub fn new(interval: std::time::Duration) -> Self {
        Throttle {
            interval_ms: interval.as_millis() as u64,
            start: std::time::Instant::now(),
            next_ms: AtomicU64::new(0),
            suppressed: AtomicU64::new(0),
        }
    }

    /// `Some(n)` when a line may be written now (`n` lines were left out since the last one),
    /// `None` when this one is to be left out.
    pub fn allow(&self) -> Option<u64> {
        let now = self.start.elapsed().as_millis() as u64;
        let next = self.next_ms.load(Ordering::Relaxed);
        if now >= next
            && self
                .next_ms
                .compare_exchange(
                    next,
                    now + self.interval_ms,
                    Ordering::Relaxed,
                    Ordering::Relaxed,
                )
                .is_ok()
        {
            Some(self.suppressed.swap(0, Ordering::Relaxed))
        } else {
            self.suppressed.fetch_add(1, Ordering::Relaxed);
            None
        }
    }
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

/// Something a [`Counted`] guard counts up while it lives: a gauge, a link's open streams, a
/// tunnel's stream credit, a server's streams on a tunnel.
pub trait Tally {
    fn up(&self);
    fn down(&self);
}

impl Tally for Gauge {
    fn up(&self) {
        self.inc();
    }
    fn down(&self) {
        self.dec();
    }
}

impl Tally for std::sync::atomic::AtomicUsize {
    fn up(&self) {
        self.fetch_add(1, Ordering::Relaxed);
    }
    fn down(&self) {
        self.fetch_sub(1, Ordering::Relaxed);
    }
}

impl Tally for std::sync::atomic::AtomicU32 {
    fn up(&self) {
        self.fetch_add(1, Ordering::Relaxed);
    }
    fn down(&self) {
        self.fetch_sub(1, Ordering::Relaxed);
    }
}

/// Counts one up on what `P` points to for as long as it lives, and down when dropped, so that
/// every exit path of a task counts down: the one counting guard (a reference for a gauge
/// that outlives the task, an `Arc` for a count shared with others).
pub struct Counted<P: std::ops::Deref>(P)
where
    P::Target: Tally;

impl<P: std::ops::Deref> Counted<P>
where
    P::Target: Tally,
{
    pub fn new(counter: P) -> Self {
        counter.up();
        Counted(counter)
    }

    /// What it counts.
    pub fn counter(&self) -> &P::Target {
        &self.0
    }
}

impl<P: std::ops::Deref> Drop for Counted<P>
where
    P::Target: Tally,
{
    fn drop(&mut self) {
        self.0.down();
    }
}

/// Counts a gauge up while it lives.
pub type GaugeGuard<'a> = Counted<&'a Gauge>;

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

/// The label values of a metric family, as an enum: a fixed, bounded set (so a family's size
/// does not depend on what peers send), and a typo is a compile error, not a new series.
pub trait Label: Copy + PartialEq + 'static {
    /// Every value, in the order they are rendered.
    const ALL: &'static [Self];
    /// The label's value in the exposition.
    fn label(self) -> String;
}

/// One counter per label value of `L`.
#[derive(Debug)]
pub struct CounterFamily<L: Label> {
    counters: Box<[Counter]>,
    _label: std::marker::PhantomData<L>,
}

impl<L: Label> Default for CounterFamily<L> {
    fn default() -> Self {
        CounterFamily {
            counters: L::ALL.iter().map(|_| Counter::default()).collect(),
            _label: std::marker::PhantomData,
        }
    }
}

impl<L: Label> CounterFamily<L> {
    pub fn inc(&self, l: L) {
        if let Some(i) = L::ALL.iter().position(|x| *x == l) {
            self.counters[i].inc();
        }
    }

    /// The sum over every label value.
    pub fn total(&self) -> u64 {
        self.counters.iter().map(Counter::get).sum()
    }

    pub fn get(&self, l: L) -> u64 {
        L::ALL
            .iter()
            .position(|x| *x == l)
            .map_or(0, |i| self.counters[i].get())
    }
}

impl Exposition {
    /// A counter family with one label, every value rendered (zeros too, so that rates work
    /// from the first scrape).
    pub fn family<L: Label>(&mut self, name: &str, help: &str, label: &str, f: &CounterFamily<L>) {
        let values: Vec<(String, u64)> = L::ALL
            .iter()
            .zip(f.counters.iter())
            .map(|(l, c)| (l.label(), c.get()))
            .collect();
        let refs: Vec<(&str, u64)> = values.iter().map(|(l, v)| (l.as_str(), *v)).collect();
        self.labeled(name, help, "counter", label, &refs);
    }
}

fn escape(s: &str) -> String {
    s.replace('\\', "\\\\")
        .replace('"', "\\\"")
        .replace('\n', "\\n")
}

/// Streams refused with a status are counted by it: every status but `ok`. (Here, beside the
/// trait, as the orphan rule asks: the protocol crate knows nothing of metrics.)
impl Label for tether_proto::StatusCode {
    const ALL: &'static [Self] = &[
        tether_proto::StatusCode::UpstreamUnreachable,
        tether_proto::StatusCode::RefusedByPolicy,
        tether_proto::StatusCode::UnknownService,
        tether_proto::StatusCode::Busy,
        tether_proto::StatusCode::Draining,
        tether_proto::StatusCode::Timeout,
        tether_proto::StatusCode::NoRoute,
        tether_proto::StatusCode::BadRequest,
        tether_proto::StatusCode::Contested,
    ];
    fn label(self) -> String {
        tether_proto::StatusCode::label(self).into()
    }
}

#[cfg(test)]
mod tests {
    #[test]
    fn a_throttle_lets_one_through_and_counts_the_rest() {
        let t = super::Throttle::new(std::time::Duration::from_secs(3600));
        assert_eq!(t.allow(), Some(0));
        assert_eq!(t.allow(), None);
        assert_eq!(t.allow(), None);
        let t = super::Throttle::new(std::time::Duration::ZERO);
        assert_eq!(t.allow(), Some(0));
        assert!(t.allow().is_some());
    }

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

    #[derive(Debug, Clone, Copy, PartialEq)]
    enum Why {
        A,
        B,
    }

    impl Label for Why {
        const ALL: &'static [Self] = &[Why::A, Why::B];
        fn label(self) -> String {
            format!("{self:?}").to_lowercase()
        }
    }

    #[test]
    fn families_count_by_label_and_render_every_value() {
        let f = CounterFamily::<Why>::default();
        f.inc(Why::B);
        f.inc(Why::B);
        assert_eq!((f.get(Why::A), f.get(Why::B)), (0, 2));
        let mut e = Exposition::new();
        e.family("tether_z_total", "Z.", "why", &f);
        let s = e.finish();
        assert!(
            s.contains("tether_z_total{why=\"a\"} 0\ntether_z_total{why=\"b\"} 2\n"),
            "{s}"
        );
    }
}
