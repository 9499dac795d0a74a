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
/// The WAN lab's chart: one panel per profile, a pair of bars per path (bulk with 1 and with 8
/// streams, Mbit/s) against a line at the link's rate, the value written at each bar's end.
pub(super) fn chart(results: &[ProfileResult]) -> Result<Vec<u8>> {
    let mut svg = String::new();
    draw_chart(results, &mut svg).map_err(|e| anyhow::anyhow!("drawing the chart: {e}"))?;
    Ok(svg.into_bytes())
}

fn draw_chart(
    results: &[ProfileResult],
    svg: &mut String,
) -> Result<(), Box<dyn std::error::Error>> {
    use plotters::prelude::*;
    let height = 70 + 190 * results.len().max(1) as u32;
    let root = SVGBackend::with_string(svg, (1100, height)).into_drawing_area();
    root.fill(&WHITE)?;
    let (head, body) = root.split_vertically(60);
    head.draw(&Text::new(
        "tether-bench wan: bulk throughput per path, Mbit/s".to_string(),
        (10, 8),
        ("sans-serif", 17).into_font(),
    ))?;
    let one = RGBColor(31, 119, 180);
    let eight = RGBColor(255, 127, 14);
    for (x, label, colour) in [(10, "1 stream", one), (110, "8 streams", eight)] {
        head.draw(&Rectangle::new([(x, 38), (x + 12, 50)], colour.filled()))?;
        head.draw(&Text::new(
            label,
            (x + 16, 37),
            ("sans-serif", 13).into_font(),
        ))?;
    }
    let panels = body.split_evenly((results.len().max(1), 1));
    for (r, area) in results.iter().zip(panels.iter()) {
        let paths: Vec<(&String, &Figures)> = r.paths.iter().collect();
        let top = paths
            .iter()
            .flat_map(|(_, f)| [f.bulk1_mbps, f.bulk8_mbps])
            .flatten()
            .fold(r.profile.rate_mbps as f64, f64::max)
            .max(0.001)
            * 1.12;
        let rows = paths.len().max(1) as f64;
        let names: Vec<String> = paths.iter().map(|(p, _)| p.to_string()).collect();
        let rate = match r.profile.rate_mbps {
            0 => "no rate limit".to_string(),
            n => format!("{n} Mbit/s"),
        };
        let caption = format!(
            "{}: RTT {} ms, {}% loss, {rate}",
            r.profile.name,
            r.profile.rtt_ms,
            r.profile.loss * 100.0,
        );
        let mut c = ChartBuilder::on(area)
            .caption(caption, ("sans-serif", 14))
            .margin(8)
            .margin_right(40)
            .x_label_area_size(30)
            .y_label_area_size(110)
            .build_cartesian_2d(0f64..top, 0f64..rows)?;
        c.configure_mesh()
            .x_desc("Mbit/s")
            .y_labels(paths.len().max(1) * 2 + 1)
            .y_label_formatter(&|y: &f64| crate::plot::category_label(&names, *y))
            .x_label_formatter(&|x| format!("{x:.0}"))
            .light_line_style(WHITE)
            .draw()?;
        // The link's rate, when it has one: what a path could carry at most.
        let rate = r.profile.rate_mbps as f64;
        if rate > 0.0 {
            c.draw_series([PathElement::new(
                vec![(rate, 0.0), (rate, rows)],
                BLACK.stroke_width(1),
            )])?;
            c.draw_series([Text::new(
                format!("link {rate:.0}"),
                (rate + top / 200.0, rows - 0.1),
                ("sans-serif", 11).into_font(),
            )])?;
        }
        for (i, (_, f)) in paths.iter().enumerate() {
            let row = i as f64;
            for (v, lo, colour) in [(f.bulk1_mbps, 0.5, one), (f.bulk8_mbps, 0.15, eight)] {
                let Some(v) = v else { continue };
                c.draw_series([Rectangle::new(
                    [(0.0, row + lo), (v, row + lo + 0.33)],
                    colour.filled(),
                )])?;
                c.draw_series([Text::new(
                    format!("{v:.1}"),
                    (v + top / 200.0, row + lo + 0.3),
                    ("sans-serif", 11).into_font(),
                )])?;
            }
        }
    }
    root.present()?;
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Every profile gets a panel with its link, every path its bars and values. With
    /// `TETHER_WAN_CHART=PATH` the test also writes the chart, to look at.
    #[test]
    fn the_chart_names_each_profile_path_and_unit() {
        let figures = |b1: f64, b8: f64| Figures {
            bulk1_mbps: Some(b1),
            bulk8_mbps: Some(b8),
            ..Figures::default()
        };
        let results: Vec<ProfileResult> = PROFILES[1..3]
            .iter()
            .map(|p| ProfileResult {
                profile: p.clone(),
                paths: [
                    ("direct".to_string(), figures(41.5, 38.2)),
                    ("quic".to_string(), figures(43.8, 46.8)),
                    ("ssh".to_string(), figures(38.8, 46.1)),
                    ("tcp".to_string(), figures(40.1, 44.6)),
                ]
                .into_iter()
                .collect(),
            })
            .collect();
        let svg = String::from_utf8(chart(&results).unwrap()).unwrap();
        if let Some(path) = std::env::var_os("TETHER_WAN_CHART") {
            std::fs::write(path, &svg).unwrap();
        }
        for text in [
            "Mbit/s",
            "continental: RTT 100 ms, 1% loss, 50 Mbit/s",
            "quic",
            "43.8",
            "8 streams",
        ] {
            assert!(svg.contains(text), "the chart says {text:?}");
        }
    }
}
