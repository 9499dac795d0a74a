//! The WAN lab's report and chart.

use super::*;

pub(super) fn cell(v: Option<f64>, digits: usize) -> String {
    v.map_or("-".into(), |v| format!("{v:.digits$}"))
}

pub(super) fn markdown(results: &[ProfileResult]) -> String {
    let mut s = String::from("# tether-bench wan\n\n");
    s += "Each profile is a user-space link between two network namespaces; every path runs \
          over the same link in the same run. Bulk in Mbit/s; round trips of 64 bytes in ms \
          (\"loaded\": while one bulk stream shares the path, for tether the same tunnel); \
          idle bytes per minute per tunnel with three servers.\n";
    for r in results {
        s += &format!("\n## {}: {}\n\n", r.profile.name, r.profile.describe());
        s += "| path | bulk 1 | bulk 8 | RR p50 idle | RR p99 idle | RR p50 loaded | RR p90 loaded | bulk while loaded | survives blackout | CPU s/GB | idle B/min/tunnel | failover: failed, slowest ms |\n";
        s += "|---|---|---|---|---|---|---|---|---|---|---|---|\n";
        for (path, f) in &r.paths {
            s += &format!(
                "| {path} | {} | {} | {} | {} | {} | {} | {} | {} | {} | {} | {} |\n",
                cell(f.bulk1_mbps, 1),
                cell(f.bulk8_mbps, 1),
                cell(f.rr_idle_p50_ms, 1),
                cell(f.rr_idle_p99_ms, 1),
                cell(f.rr_loaded_p50_ms, 1),
                cell(f.rr_loaded_p90_ms, 1),
                cell(f.loaded_bulk_mbps, 1),
                f.blackouts
                    .iter()
                    .map(|(d, o)| format!("{d} s: {o}"))
                    .collect::<Vec<_>>()
                    .join(", "),
                cell(f.cpu_s_per_gb, 1),
                cell(f.idle_bytes_per_min_per_tunnel, 0),
                match (f.failover_failed, f.failover_slowest_ms) {
                    (Some(n), Some(ms)) => format!("{n}, {ms:.0}"),
                    _ => "-".into(),
                },
            );
        }
        for (path, f) in &r.paths {
            for e in &f.errors {
                s += &format!("\n- {path}: {e}");
            }
        }
        s += "\n";
    }
    s
}

/// Bulk (one stream) of every path on every profile, as a fraction of the best path there.
pub(super) fn chart(results: &[ProfileResult]) -> Vec<u8> {
    let mut c = Canvas::new(1200, 120 + 150 * results.len().max(1));
    c.text(20, 14, "TETHER-BENCH WAN: BULK, 1 STREAM, MBIT/S", 3, INK);
    let (x0, w) = (160i64, 1000i64);
    for (i, r) in results.iter().enumerate() {
        let y0 = 70 + 150 * i as i64;
        c.text(20, y0, &r.profile.name.to_uppercase(), 2, INK);
        let top = r
            .paths
            .values()
            .filter_map(|f| f.bulk1_mbps)
            .fold(0.0f64, f64::max)
            .max(0.001);
        c.rect(x0, y0 + 125, w, 1, GRID);
        for (j, (path, f)) in r.paths.iter().enumerate() {
            let y = y0 + 22 * j as i64;
            let v = f.bulk1_mbps.unwrap_or(0.0);
            c.text(40, y + 12, path, 2, INK);
            c.rect(
                x0,
                y + 2,
                (w as f64 * v / top) as i64,
                16,
                SERIES[j % SERIES.len()],
            );
            c.text(
                x0 + (w as f64 * v / top) as i64 + 6,
                y + 12,
                &format!("{v:.1}"),
                2,
                INK,
            );
        }
    }
    c.encode()
}
