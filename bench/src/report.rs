//! Results of one run: raw rows (the same shape as the peers harness's results.csv, so both
//! pool), medians and ratios to the direct runs interleaved with each path, the targets, and
//! the three outputs: markdown, JSON and an SVG chart.

use crate::failover::Failover;
use crate::scale::ScalePoint;
use serde::Serialize;
use std::collections::BTreeMap;

/// One measurement. `pair` is the path being compared, `target` is `direct` or the path.
#[derive(Debug, Clone, Serialize)]
pub struct Row {
    pub pair: String,
    pub target: String,
    pub rep: u32,
    pub metric: String,
    pub value: f64,
}

/// A round-trip latency distribution: (percentile, microseconds) points.
#[derive(Debug, Clone, Serialize)]
pub struct Distribution {
    pub path: String,
    pub pinned: bool,
    pub points: Vec<(f64, f64)>,
}

#[derive(Debug, Default, Serialize)]
pub struct Results {
    pub date: String,
    pub machine: String,
    pub settings: BTreeMap<String, String>,
    pub rows: Vec<Row>,
    pub latency: Vec<Distribution>,
    pub failover: Vec<Failover>,
    pub scale: Vec<ScalePoint>,
    /// Medians and ratios, filled in by [`Results::summarize`].
    pub summary: Vec<Summary>,
    pub targets: Vec<TargetCheck>,
}

#[derive(Debug, Clone, Serialize)]
pub struct Summary {
    pub path: String,
    pub metric: String,
    pub median: f64,
    /// Median of the direct runs interleaved with this path (none for memory figures).
    pub direct: Option<f64>,
    pub ratio: Option<f64>,
}

#[derive(Debug, Clone, Serialize)]
pub struct TargetCheck {
    pub path: String,
    pub what: String,
    pub target: String,
    pub measured: Option<f64>,
    pub met: Option<bool>,
}

fn median(mut v: Vec<f64>) -> Option<f64> {
    v.retain(|x| x.is_finite());
    if v.is_empty() {
        return None;
    }
    v.sort_by(|a, b| a.total_cmp(b));
    let m = v.len() / 2;
    Some(if v.len() % 2 == 1 {
        v[m]
    } else {
        (v[m - 1] + v[m]) / 2.0
    })
}

impl Results {
    pub fn add(&mut self, pair: &str, target: &str, rep: u32, metric: &str, value: f64) {
        self.rows.push(Row {
            pair: pair.into(),
            target: target.into(),
            rep,
            metric: metric.into(),
            value,
        });
    }

    /// Paths in the order they were first measured.
    pub fn paths(&self) -> Vec<String> {
        let mut out: Vec<String> = Vec::new();
        for r in &self.rows {
            if !out.contains(&r.pair) {
                out.push(r.pair.clone());
            }
        }
        out
    }

    fn values(&self, pair: Option<&str>, target_direct: bool, metric: &str) -> Vec<f64> {
        self.rows
            .iter()
            .filter(|r| match pair {
                Some(p) => r.pair == p,
                None => true,
            })
            .filter(|r| (r.target == "direct") == target_direct && r.metric == metric)
            .map(|r| r.value)
            .collect()
    }

    pub fn get(&self, path: &str, metric: &str) -> Option<&Summary> {
        self.summary
            .iter()
            .find(|s| s.path == path && s.metric == metric)
    }

    /// Medians per path and metric, ratios to the direct runs of the same pair, memory per
    /// idle connection, and the targets of tether's paths.
    pub fn summarize(&mut self) {
        let mut summary = Vec::new();
        let metrics: Vec<String> = {
            let mut m: Vec<String> = Vec::new();
            for r in &self.rows {
                if !m.contains(&r.metric) {
                    m.push(r.metric.clone());
                }
            }
            m
        };
        for metric in &metrics {
            if let Some(all) = median(self.values(None, true, metric)) {
                summary.push(Summary {
                    path: "direct".into(),
                    metric: metric.clone(),
                    median: all,
                    direct: None,
                    ratio: None,
                });
            }
        }
        for path in self.paths() {
            for metric in &metrics {
                let Some(m) = median(self.values(Some(&path), false, metric)) else {
                    continue;
                };
                let direct = median(self.values(Some(&path), true, metric));
                summary.push(Summary {
                    path: path.clone(),
                    metric: metric.clone(),
                    median: m,
                    direct,
                    ratio: direct.filter(|d| *d > 0.0).map(|d| m / d),
                });
            }
            // KiB per idle connection, both ends together.
            let idle = median(self.values(Some(&path), false, "mem_idle_rss_kb"));
            let hold = median(self.values(Some(&path), false, "mem_hold_rss_kb"));
            let ok = median(self.values(Some(&path), false, "hold_ok"));
            // RSS of both ends after the load, idle again, against before it.
            let after = median(self.values(Some(&path), false, "mem_after_rss_kb"));
            if let (Some(i), Some(a)) = (idle, after) {
                if i > 0.0 {
                    summary.push(Summary {
                        path: path.clone(),
                        metric: "rss_after_ratio".into(),
                        median: a / i,
                        direct: None,
                        ratio: None,
                    });
                }
            }
            if let (Some(i), Some(h), Some(n)) = (idle, hold, ok) {
                if n > 0.0 {
                    summary.push(Summary {
                        path: path.clone(),
                        metric: "kib_per_idle_conn".into(),
                        median: (h - i).max(0.0) / n,
                        direct: None,
                        ratio: None,
                    });
                }
            }
        }
        self.summary = summary;
        self.targets = self.check_targets();
    }

    fn check_targets(&self) -> Vec<TargetCheck> {
        let mut out = Vec::new();
        let ratio = |p: &str, m: &str| self.get(p, m).and_then(|s| s.ratio);
        let value = |p: &str, m: &str| self.get(p, m).map(|s| s.median);
        for path in self.paths().into_iter().filter(|p| p.starts_with("tether")) {
            let mut add =
                |what: &str, target: &str, measured: Option<f64>, ok: &dyn Fn(f64) -> bool| {
                    out.push(TargetCheck {
                        path: path.clone(),
                        what: what.into(),
                        target: target.into(),
                        measured,
                        met: measured.map(ok),
                    });
                };
            add(
                "bulk, 1 stream (ratio)",
                ">= x0.30",
                ratio(&path, "bulk1_gbps"),
                &|v| v >= 0.30,
            );
            add(
                "bulk, 8 streams (ratio)",
                ">= x0.30",
                ratio(&path, "bulk8_gbps"),
                &|v| v >= 0.30,
            );
            add(
                "RR pinned p50 (ratio)",
                "<= x4.5",
                ratio(&path, "rr1cpu_p50_us"),
                &|v| v <= 4.5,
            );
            add(
                "RR pinned p99 (ratio)",
                "<= x6.0",
                ratio(&path, "rr1cpu_p99_us"),
                &|v| v <= 6.0,
            );
            add(
                "new connections/s (ratio)",
                ">= x0.35",
                ratio(&path, "crr_cps"),
                &|v| v >= 0.35,
            );
            add(
                "KiB per idle connection",
                "<= 16",
                value(&path, "kib_per_idle_conn"),
                &|v| v <= 16.0,
            );
            let cpu = match (
                value(&path, "bulk1_cpu_s_per_gb"),
                value(&path, "bulk8_cpu_s_per_gb"),
            ) {
                (Some(a), Some(b)) => Some(a.max(b)),
                (a, b) => a.or(b),
            };
            add(
                "CPU s per GB (worst of bulk 1 and 8)",
                "<= 2.0",
                cpu,
                &|v| v <= 2.0,
            );
            add(
                "RSS after the load, idle again (ratio to before)",
                "<= x1.3",
                value(&path, "rss_after_ratio"),
                &|v| v <= 1.3,
            );
            let transport_name = path.strip_prefix("tether-").unwrap_or("quic");
            let failover = self
                .failover
                .iter()
                .find(|f| f.transport == transport_name)
                .map(|f| f.kill_to_first_success_ms);
            add(
                "kill -9 of the server in use to the next new connection served (ms)",
                "<= 100",
                failover,
                &|v| v <= 100.0,
            );
            let transport = path.strip_prefix("tether-").unwrap_or("quic");
            let points: Vec<&ScalePoint> = self
                .scale
                .iter()
                .filter(|p| p.transport == transport)
                .collect();
            let worst = points
                .iter()
                .map(|p| p.server_kib_per_agent)
                .fold(None, |m: Option<f64>, v| Some(m.map_or(v, |m| m.max(v))));
            add(
                "server KiB per idle agent (worst N)",
                "<= 64",
                worst,
                &|v| v <= 64.0,
            );
            let biggest = points.iter().max_by_key(|p| p.agents);
            if let Some(p) = biggest {
                let target = format!("{} of {} up (10,000 wanted)", p.connected, p.agents);
                add(
                    "agents held by one server",
                    &target,
                    Some(p.connected as f64),
                    &|v| v >= 10_000.0,
                );
            }
        }
        out
    }

    pub fn markdown(&self) -> String {
        let mut s = String::new();
        s.push_str(&format!(
            "## tether-bench, {}\n\n{}\n\n",
            self.date, self.machine
        ));
        let settings: Vec<String> = self
            .settings
            .iter()
            .map(|(k, v)| format!("{k}={v}"))
            .collect();
        s.push_str(&format!("Settings: {}\n\n", settings.join(" ")));
        s.push_str(
            "Medians over reps; in brackets the ratio to the direct runs interleaved with that path.\n\
             RR is a 64-byte ping-pong; pinned = client, echo server and every process of the path \
             on CPU 0.\n\n",
        );
        s.push_str("| path | bulk, 1 stream | bulk, 8 streams | RR pinned p50 | RR pinned p99 | RR p50 | RR p99 | RR p99.9 | new connections/s | KiB per idle connection | CPU s per GB | RSS idle → after the load |\n");
        s.push_str("|---|---|---|---|---|---|---|---|---|---|---|---|\n");
        let mut paths = vec!["direct".to_string()];
        paths.extend(self.paths());
        for p in &paths {
            let cell = |metric: &str, unit: &str, digits: usize| -> String {
                match self.get(p, metric) {
                    None => "-".into(),
                    Some(x) => {
                        let v = format!("{:.*}{unit}", digits, x.median);
                        match x.ratio {
                            Some(r) => format!("{v} (x{r:.2})"),
                            None => v,
                        }
                    }
                }
            };
            let cpu = match (
                self.get(p, "bulk1_cpu_s_per_gb"),
                self.get(p, "bulk8_cpu_s_per_gb"),
            ) {
                (Some(a), Some(b)) => format!("{:.2} / {:.2}", a.median, b.median),
                (Some(a), None) | (None, Some(a)) => format!("{:.2}", a.median),
                _ => "-".into(),
            };
            let mib = |m: &str| self.get(p, m).map(|x| x.median / 1024.0);
            let rss = match (mib("mem_idle_rss_kb"), mib("mem_after_rss_kb")) {
                (Some(a), Some(b)) => format!("{a:.0} → {b:.0} MiB"),
                _ => "-".into(),
            };
            s.push_str(&format!(
                "| {p} | {} | {} | {} | {} | {} | {} | {} | {} | {} | {cpu} | {rss} |\n",
                cell("bulk1_gbps", " Gbit/s", 2),
                cell("bulk8_gbps", " Gbit/s", 2),
                cell("rr1cpu_p50_us", " us", 1),
                cell("rr1cpu_p99_us", " us", 1),
                cell("rr_p50_us", " us", 1),
                cell("rr_p99_us", " us", 1),
                cell("rr_p999_us", " us", 1),
                cell("crr_cps", "", 0),
                cell("kib_per_idle_conn", "", 1),
            ));
        }
        s.push_str(
            "\nCPU s per GB: bulk 1 stream / bulk 8 streams, both ends of the path together.\n",
        );
        s.push_str(&self.cpu_per_operation(&paths));
        if !self.targets.is_empty() {
            s.push_str("\n### Targets\n\n| path | what | target | measured | met |\n|---|---|---|---|---|\n");
            for t in &self.targets {
                let m = t.measured.map_or("-".into(), |v| format!("{v:.2}"));
                let met = match t.met {
                    Some(true) => "yes",
                    Some(false) => "**no**",
                    None => "not measured",
                };
                s.push_str(&format!(
                    "| {} | {} | {} | {m} | {met} |\n",
                    t.path, t.what, t.target
                ));
            }
        }
        if !self.failover.is_empty() {
            s.push_str("\n### Failover\n\n| transport | kill -9 of the server in use to the first new connection that succeeds | failed attempts meanwhile | silent drop to tunnel closed |\n|---|---|---|---|\n");
            for f in &self.failover {
                s.push_str(&format!(
                    "| {} | {:.0} ms | {} | {:.0} ms |\n",
                    f.transport,
                    f.kill_to_first_success_ms,
                    f.failed_attempts,
                    f.silent_drop_detected_ms
                ));
            }
        }
        if !self.scale.is_empty() {
            s.push_str("\n### Scale: idle agents on one server\n\n| transport | agents | connected | seconds to connect | server RSS | KiB per agent | server CPU (idle agents) | keepalive |\n|---|---|---|---|---|---|---|---|\n");
            for p in &self.scale {
                s.push_str(&format!(
                    "| {} | {} | {} | {:.1} | {:.1} MiB | {:.1} | {:.1}% | {} ms |\n",
                    p.transport,
                    p.agents,
                    p.connected,
                    p.seconds_to_connect,
                    p.server_rss_kb as f64 / 1024.0,
                    p.server_kib_per_agent,
                    p.server_cpu_percent,
                    p.keepalive_ms
                ));
            }
        }
        s
    }

    /// Where a round trip's and a new connection's microseconds go: CPU per operation of each
    /// process (read from /proc before and after the run, so a rough figure: the clock ticks at
    /// 100 Hz). In the pinned round trip all of them share one CPU, so their sum is close to the
    /// round trip itself.
    fn cpu_per_operation(&self, paths: &[String]) -> String {
        let us = |p: &str, m: &str| self.get(p, m).map(|x| x.median);
        let cell = |v: Option<f64>| v.map_or("-".to_string(), |v| format!("{v:.1}"));
        let mut s = String::from(
            "\n### CPU per operation (us)\n\n| path | pinned round trip: client and upstream | agent | server | all | new connection: client and upstream | agent | server | all |\n|---|---|---|---|---|---|---|---|---|\n",
        );
        let mut any = false;
        for p in paths {
            let mut row = format!("| {p} ");
            for op in ["rr1cpu", "crr"] {
                let parts =
                    ["bench", "agent", "server"].map(|who| us(p, &format!("{op}_cpu_us_{who}")));
                any |= parts[0].is_some();
                let all = parts[0].map(|b| b + parts[1].unwrap_or(0.0) + parts[2].unwrap_or(0.0));
                for v in parts {
                    row.push_str(&format!("| {} ", cell(v)));
                }
                row.push_str(&format!("| {} ", cell(all)));
            }
            row.push_str("|\n");
            s.push_str(&row);
        }
        if any {
            s
        } else {
            String::new()
        }
    }

    /// Throughput per path (bars) above the round-trip latency distributions (unpinned and
    /// pinned), latency on a log scale against percentiles on a "nines" scale.
    /// The chart: bulk throughput per path (1 and 8 streams, Gbit/s), and the round-trip
    /// latency distributions, unpinned and pinned, on a logarithmic microsecond axis against
    /// the percentile (spaced by nines). The legend of paths sits above the panels.
    pub fn chart(&self) -> anyhow::Result<Vec<u8>> {
        let mut svg = String::new();
        self.draw_chart(&mut svg)
            .map_err(|e| anyhow::anyhow!("drawing the chart: {e}"))?;
        Ok(svg.into_bytes())
    }

    fn draw_chart(&self, svg: &mut String) -> Result<(), Box<dyn std::error::Error>> {
        use plotters::prelude::*;
        let colours = [
            RGBColor(127, 127, 127),
            RGBColor(31, 119, 180),
            RGBColor(255, 127, 14),
            RGBColor(44, 160, 44),
            RGBColor(214, 39, 40),
            RGBColor(148, 103, 189),
            RGBColor(140, 86, 75),
        ];
        let mut paths = vec!["direct".to_string()];
        paths.extend(self.paths());
        let colour = |p: &str| {
            let i = paths.iter().position(|q| q == p).unwrap_or(0);
            colours[i % colours.len()]
        };
        let root = SVGBackend::with_string(svg, (1200, 900)).into_drawing_area();
        root.fill(&WHITE)?;
        let (head, body) = root.split_vertically(60);
        head.draw(&Text::new(
            format!("tether-bench, {}", self.date),
            (10, 8),
            ("sans-serif", 17).into_font(),
        ))?;
        let mut x = 10;
        for p in &paths {
            head.draw(&Rectangle::new([(x, 38), (x + 12, 50)], colour(p).filled()))?;
            head.draw(&Text::new(
                p.clone(),
                (x + 16, 37),
                ("sans-serif", 13).into_font(),
            ))?;
            x += 30 + 7 * p.len() as i32;
        }
        let (top, bottom) = body.split_vertically(380);

        // Throughput: per path, a bar for 1 stream (left) and one for 8 (right, lighter).
        let bars: Vec<(String, f64, f64)> = paths
            .iter()
            .map(|p| {
                let v = |m: &str| self.get(p, m).map_or(0.0, |s| s.median);
                (p.clone(), v("bulk1_gbps"), v("bulk8_gbps"))
            })
            .collect();
        let high = bars
            .iter()
            .map(|b| b.1.max(b.2))
            .fold(0.0f64, f64::max)
            .max(0.1)
            * 1.15;
        let n = bars.len().max(1) as f64;
        let names: Vec<String> = bars.iter().map(|b| b.0.clone()).collect();
        let mut c = ChartBuilder::on(&top)
            .caption(
                "bulk throughput, Gbit/s: 1 stream (dark), 8 streams (light)",
                ("sans-serif", 14),
            )
            .margin(8)
            .margin_right(30)
            .x_label_area_size(30)
            .y_label_area_size(70)
            .build_cartesian_2d(0f64..n, 0f64..high)?;
        c.configure_mesh()
            .y_desc("Gbit/s")
            .x_labels(bars.len() * 2 + 1)
            .x_label_formatter(&|x: &f64| crate::plot::category_label(&names, *x))
            .y_label_formatter(&|y| format!("{y:.1}"))
            .light_line_style(WHITE)
            .draw()?;
        for (i, (p, b1, b8)) in bars.iter().enumerate() {
            let x0 = i as f64;
            let dark = colour(p);
            for (v, lo, style) in [
                (*b1, 0.15, dark.filled()),
                (*b8, 0.5, dark.mix(0.45).filled()),
            ] {
                c.draw_series([Rectangle::new([(x0 + lo, 0.0), (x0 + lo + 0.33, v)], style)])?;
                c.draw_series([Text::new(
                    format!("{v:.2}"),
                    (x0 + lo, v + high / 40.0),
                    ("sans-serif", 11).into_font(),
                )])?;
            }
        }

        // Latency: the percentile against the round trip, one line per path.
        let all: Vec<f64> = self
            .latency
            .iter()
            .flat_map(|d| d.points.iter().map(|p| p.1))
            .filter(|v| *v > 0.0)
            .collect();
        // Whole decades, so that the axis ticks fall on 1, 10, 100 ...
        let (lo, hi) = if all.is_empty() {
            (1.0, 1000.0)
        } else {
            let lo = all.iter().copied().fold(f64::MAX, f64::min).max(0.1);
            let hi = all.iter().copied().fold(0.0f64, f64::max);
            (
                10f64.powf(lo.log10().floor()),
                10f64.powf(hi.log10().ceil().max(lo.log10().floor() + 1.0)),
            )
        };
        let nines = |p: f64| -(1.0 - p / 100.0).max(1e-4).log10();
        let panels = bottom.split_evenly((1, 2));
        for (pinned, area) in [(false, &panels[0]), (true, &panels[1])] {
            let title = if pinned {
                "round trip, every process pinned to one CPU"
            } else {
                "round trip, unpinned"
            };
            let mut c = ChartBuilder::on(area)
                .caption(title, ("sans-serif", 14))
                .margin(8)
                .margin_right(30)
                .x_label_area_size(34)
                .y_label_area_size(60)
                .build_cartesian_2d((lo..hi).log_scale(), 0f64..4.0)?;
            c.configure_mesh()
                .x_desc("microseconds (log)")
                .y_desc("percentile")
                .y_labels(9)
                .y_label_formatter(&|y: &f64| {
                    let labels = [
                        (0.0, "p0"),
                        (1.0, "p90"),
                        (2.0, "p99"),
                        (3.0, "p99.9"),
                        (4.0, "p99.99"),
                    ];
                    labels
                        .iter()
                        .find(|(v, _)| (v - y).abs() < 0.01)
                        .map(|(_, l)| l.to_string())
                        .unwrap_or_default()
                })
                .x_label_formatter(&|x| {
                    // Label the decades and their halves only: the rest crowd.
                    let m = x / 10f64.powf(x.log10().floor());
                    if (m - 1.0).abs() < 0.01 || (m - 5.0).abs() < 0.01 {
                        format!("{x}")
                    } else {
                        String::new()
                    }
                })
                .light_line_style(WHITE)
                .draw()?;
            for d in self.latency.iter().filter(|d| d.pinned == pinned) {
                let points = d
                    .points
                    .iter()
                    .filter(|(_, us)| *us > 0.0)
                    .map(|(p, us)| (us.clamp(lo, hi), nines(*p)));
                c.draw_series(LineSeries::new(points, colour(&d.path).stroke_width(2)))?;
            }
        }
        root.present()?;
        Ok(())
    }
}

/// Points of a latency distribution from sorted nanosecond samples: percentiles spaced evenly
/// on the "nines" scale (50, 90, 99, 99.9 ...), in microseconds.
pub fn distribution(sorted_ns: &[u64]) -> Vec<(f64, f64)> {
    let mut out = Vec::new();
    for k in 0..=80 {
        let p = 100.0 * (1.0 - 10f64.powf(-(k as f64) / 20.0));
        out.push((p, crate::load::percentile(sorted_ns, p) as f64 / 1000.0));
    }
    out.push((
        100.0,
        sorted_ns.last().copied().unwrap_or(0) as f64 / 1000.0,
    ));
    out
}

/// Rows of a peers harness results.csv (`pair,target,rep,metric,value`); unparsable values
/// (nan, empty) are left out.
pub fn parse_peer_csv(text: &str) -> Vec<Row> {
    text.lines()
        .skip(1)
        .filter_map(|l| {
            let f: Vec<&str> = l.split(',').collect();
            let [pair, target, rep, metric, value] = f[..] else {
                return None;
            };
            let value: f64 = value.parse().ok().filter(|v: &f64| v.is_finite())?;
            // The harness records memory rows with target = the path itself.
            let metric = match metric {
                "hold_ok" | "mem_idle_rss_kb" | "mem_hold_rss_kb" => metric.to_string(),
                m if m.starts_with("mem_") || m.starts_with("hold_") => return None,
                m => m.to_string(),
            };
            Some(Row {
                pair: pair.into(),
                target: if target == "direct" {
                    "direct".into()
                } else {
                    pair.into()
                },
                rep: rep.parse().unwrap_or(0),
                metric,
                value,
            })
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ratios_are_against_the_direct_runs_of_the_same_pair() {
        let mut r = Results::default();
        for rep in 1..=3 {
            r.add("tether-quic", "direct", rep, "bulk1_gbps", 10.0);
            r.add("tether-quic", "tether-quic", rep, "bulk1_gbps", 5.0);
            r.add("nginx", "direct", rep, "bulk1_gbps", 20.0);
            r.add("nginx", "nginx", rep, "bulk1_gbps", 12.0);
        }
        r.add("tether-quic", "tether-quic", 0, "mem_idle_rss_kb", 1000.0);
        r.add("tether-quic", "tether-quic", 0, "mem_hold_rss_kb", 9000.0);
        r.add("tether-quic", "tether-quic", 0, "hold_ok", 1000.0);
        r.summarize();
        // Latency distributions, as the loopback runs give them.
        for (path, base) in [("direct", 30u64), ("tether-quic", 120), ("nginx", 60)] {
            for pinned in [false, true] {
                let sorted: Vec<u64> = (0..10_000u64)
                    .map(|i| (base + i * i / 400_000 + i % 7) * 1000 / if pinned { 2 } else { 1 })
                    .collect();
                r.latency.push(Distribution {
                    path: path.into(),
                    pinned,
                    points: distribution(&sorted),
                });
            }
        }
        assert_eq!(
            r.get("tether-quic", "bulk1_gbps").and_then(|s| s.ratio),
            Some(0.5)
        );
        assert_eq!(
            r.get("nginx", "bulk1_gbps").and_then(|s| s.ratio),
            Some(0.6)
        );
        assert_eq!(r.get("direct", "bulk1_gbps").map(|s| s.median), Some(15.0));
        assert_eq!(
            r.get("tether-quic", "kib_per_idle_conn").map(|s| s.median),
            Some(8.0)
        );
        let md = r.markdown();
        assert!(md.contains("| tether-quic | 5.00 Gbit/s (x0.50)"), "{md}");
        assert!(r
            .targets
            .iter()
            .any(|t| t.what.starts_with("bulk, 1") && t.met == Some(true)));
        let chart = r.chart().unwrap();
        assert!(chart.starts_with(b"<svg "));
        if let Some(path) = std::env::var_os("TETHER_BENCH_CHART") {
            std::fs::write(path, &chart).unwrap();
        }
    }

    #[test]
    fn peer_rows_parse_and_nan_is_dropped() {
        let csv = "pair,target,rep,metric,value\nnginx,direct,1,bulk1_gbps,18.1\nnginx,path,1,bulk1_gbps,nan\nnginx,nginx,0,mem_idle_rss_kb,5000\nnginx,nginx,0,mem_hold_rss_kb[nginx],1\n";
        let rows = parse_peer_csv(csv);
        assert_eq!(rows.len(), 2);
        assert_eq!(rows[1].metric, "mem_idle_rss_kb");
    }
}
