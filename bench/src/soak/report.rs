//! The report (report.md, connections.csv, faults.csv) and its chart.

use super::*;

pub(super) fn write_report(
    s: &Settings,
    rec: &Record,
    violations: &[String],
    close_wait: usize,
    final_fds: &[(String, u64)],
    link: Option<&str>,
) -> Result<PathBuf> {
    use std::fmt::Write as _;
    let mut md = String::new();
    let _ = writeln!(md, "# tether soak report\n");
    let _ = writeln!(
        md,
        "Duration {:?}, seed {}, 3 servers ({}, each with its own upstream), {} agents; a fault every ~{:?}. Chart: chart.svg.\n",
        s.duration,
        s.seed,
        if s.etcd {
            "sharing their state through a three-member etcd"
        } else {
            "peered"
        },
        s.agents,
        s.fault_every
    );
    if let Some(link) = link {
        let _ = writeln!(md, "{link}\n");
    }
    let verdict = if violations.is_empty() {
        "PASS"
    } else {
        "FAIL"
    };
    let _ = writeln!(md, "**{verdict}**\n");
    for v in violations {
        let _ = writeln!(md, "- {v}");
    }
    let _ = writeln!(md, "\n## Connections\n");
    let _ = writeln!(
        md,
        "| kind | connections | ok | failed (explained by a fault) | corrupted | MiB checked |"
    );
    let _ = writeln!(md, "|---|---|---|---|---|---|");
    for kind in ["short", "bulk", "long", "reverse"] {
        let all: Vec<&Outcome> = rec.outcomes.iter().filter(|o| o.kind == kind).collect();
        let ok = all.iter().filter(|o| o.failure.is_none()).count();
        let corrupt = all.iter().filter(|o| o.corrupt).count();
        let bytes: u64 = all.iter().map(|o| o.bytes).sum();
        let _ = writeln!(
            md,
            "| {kind} | {} | {ok} | {} | {corrupt} | {} |",
            all.len(),
            all.len() - ok - corrupt,
            bytes >> 20
        );
    }
    let resets: Vec<f64> = resets_after_death(rec).iter().map(|r| r.1).collect();
    if !resets.is_empty() {
        let max = resets.iter().copied().fold(0.0, f64::max);
        let mean = resets.iter().sum::<f64>() / resets.len() as f64;
        let _ = writeln!(
            md,
            "\nLong-lived connections on a server killed or cut off: {} reset, {mean:.1} s after the fault on average, {max:.1} s at most (bound {RESET_BOUND} s).",
            resets.len()
        );
    }
    let outlived = rec
        .outcomes
        .iter()
        .filter(|o| outlived_its_key(rec, o))
        .count();
    if outlived > 0 {
        let _ = writeln!(
            md,
            "\nLong-lived connections closed because they outlived two renewals of their node's key (by design; see docs/reliability.md): {outlived}."
        );
    }
    let revocations = revocation_times(rec);
    if !revocations.is_empty() {
        let max = revocations.iter().map(|r| r.2).fold(0.0, f64::max);
        let _ = writeln!(
            md,
            "\nRevocations made during the run: {}. Each revoked node was last seen on a server (or renewing) {max:.1} s after its revocation at most (looked for every {} s; bound {REVOKE_BOUND} s). Revocations that did not hold: {}.",
            revocations.len(),
            SAMPLE_EVERY.as_secs(),
            revocations_broken(rec).len()
        );
    }
    let _ = writeln!(md, "\n## Faults\n");
    let _ = writeln!(
        md,
        "| at (s) | fault | target | took (s) | failed connections it explains |"
    );
    let _ = writeln!(md, "|---|---|---|---|---|");
    for f in &rec.faults {
        let failed = rec
            .outcomes
            .iter()
            .filter(|o| {
                o.failure.is_some()
                    && !o.corrupt
                    && explanation(&rec.faults, o).is_some_and(|e| std::ptr::eq(e, f))
            })
            .count();
        let _ = writeln!(
            md,
            "| {:.1} | {} | {} | {:.1} | {failed} |",
            f.start,
            f.kind,
            f.target,
            f.end - f.start
        );
    }
    let _ = writeln!(md, "\n## Failed connections and their causes\n");
    let mut causes: BTreeMap<String, usize> = BTreeMap::new();
    for o in rec.outcomes.iter().filter(|o| o.failure.is_some()) {
        let fault = if outlived_its_key(rec, o) {
            "outlived two renewals of its key"
        } else {
            explanation(&rec.faults, o)
                .map(|f| f.kind.name())
                .unwrap_or("NO FAULT")
        };
        let why = o.failure.as_deref().unwrap_or("");
        let why: String = why
            .split(':')
            .next()
            .unwrap_or(why)
            .chars()
            .take(60)
            .collect();
        *causes
            .entry(format!("{} | {fault} | {why}", o.kind))
            .or_default() += 1;
    }
    let _ = writeln!(md, "| kind | fault | error | count |");
    let _ = writeln!(md, "|---|---|---|---|");
    for (k, n) in &causes {
        let _ = writeln!(md, "| {k} | {n} |");
    }
    let _ = writeln!(md, "\n## Processes\n");
    let _ = writeln!(md, "| process | pid | RSS first / after warm-up / max / last (MiB) | open files first / max / last | threads max |");
    let _ = writeln!(md, "|---|---|---|---|---|");
    for ((name, pid), x) in &instances(&rec.samples) {
        let (Some(first), Some(last)) = (x.first(), x.last()) else {
            continue;
        };
        let warm = x
            .iter()
            .find(|y| y.t >= first.t + s.warmup.as_secs_f64())
            .map(|y| format!("{:.1}", y.rss_kib as f64 / 1024.0))
            .unwrap_or_else(|| "-".into());
        let max_rss = x.iter().map(|y| y.rss_kib).max().unwrap_or(0);
        let max_fds = x.iter().map(|y| y.fds).max().unwrap_or(0);
        let max_th = x.iter().map(|y| y.threads).max().unwrap_or(0);
        let _ = writeln!(
            md,
            "| {name} | {pid} | {:.1} / {warm} / {:.1} / {:.1} | {} / {max_fds} / {} | {max_th} |",
            first.rss_kib as f64 / 1024.0,
            max_rss as f64 / 1024.0,
            last.rss_kib as f64 / 1024.0,
            first.fds,
            last.fds
        );
    }
    let _ = writeln!(
        md,
        "\nAgent certificate renewals during the run (each agent renews about every {} s): {}.",
        AGENT_CERT_LIFE.as_secs() / 3,
        rec.renewals.values().sum::<u64>()
    );
    let _ = writeln!(
        md,
        "\nSockets in CLOSE_WAIT after the load: {close_wait}. Open files at the end: {}.",
        final_fds
            .iter()
            .map(|(n, f)| format!("{n} {f}"))
            .collect::<Vec<_>>()
            .join(", ")
    );
    std::fs::write(s.out.join("report.md"), md)?;
    let mut csv = String::from("kind,agent,start_s,end_s,bytes,corrupt,failure\n");
    for o in &rec.outcomes {
        let _ = writeln!(
            csv,
            "{},{},{:.3},{:.3},{},{},{}",
            o.kind,
            o.agent,
            o.start,
            o.end,
            o.bytes,
            o.corrupt,
            o.failure.as_deref().unwrap_or("").replace(',', ";")
        );
    }
    std::fs::write(s.out.join("connections.csv"), csv)?;
    let mut csv = String::from("kind,target,start_s,in_effect_s,end_s\n");
    for f in &rec.faults {
        let _ = writeln!(
            csv,
            "{},{},{:.3},{:.3},{:.3}",
            f.kind,
            f.target.replace(',', ";"),
            f.start,
            f.in_effect,
            f.end
        );
    }
    std::fs::write(s.out.join("faults.csv"), csv)?;
    std::fs::write(s.out.join("chart.svg"), chart(s, rec)?)?;
    Ok(s.out.join("report.md"))
}

/// Two panels over time: connections per 5 s (checked, failed) and RSS per process; faults as
/// vertical marks with their kind.
/// The soak's chart: three panels on one time axis (seconds since the start). Connections
/// ended per 5 s, checked and failed; each process's resident memory; and the faults, one row
/// per kind, each a bar from its start to its end. The legend sits above the panels, where it
/// covers nothing.
pub(super) fn chart(s: &Settings, rec: &Record) -> Result<Vec<u8>> {
    let mut svg = String::new();
    draw_chart(s, rec, &mut svg).map_err(|e| anyhow::anyhow!("drawing the chart: {e}"))?;
    Ok(svg.into_bytes())
}

fn draw_chart(
    s: &Settings,
    rec: &Record,
    svg: &mut String,
) -> Result<(), Box<dyn std::error::Error>> {
    use plotters::prelude::*;
    let total = s.duration.as_secs_f64().max(1.0);
    let root = SVGBackend::with_string(svg, (1100, 900)).into_drawing_area();
    root.fill(&WHITE)?;
    let (head, body) = root.split_vertically(60);
    let panels = body.split_by_breakpoints([] as [i32; 0], [300, 560]);
    let (conns, rss, faults) = (&panels[0], &panels[1], &panels[2]);
    let title = format!(
        "tether soak, {:.0} s, seed {}: connections, memory and faults on one time axis",
        total, s.seed
    );
    head.draw(&Text::new(title, (10, 8), ("sans-serif", 17).into_font()))?;

    // Connections ended per 5 s.
    let buckets = (total / 5.0).ceil() as usize + 1;
    let (mut ok, mut failed) = (vec![0u64; buckets], vec![0u64; buckets]);
    for o in &rec.outcomes {
        let b = ((o.end / 5.0) as usize).min(buckets - 1);
        if o.failure.is_some() {
            failed[b] += 1;
        } else {
            ok[b] += 1;
        }
    }
    let top = ok.iter().chain(&failed).copied().max().unwrap_or(1).max(1) as f64 * 1.1;
    let mut c = ChartBuilder::on(conns)
        .margin(8)
        .margin_right(30)
        .x_label_area_size(28)
        .y_label_area_size(Y_LABELS)
        .build_cartesian_2d(0f64..total, 0f64..top)?;
    c.configure_mesh()
        .y_desc("connections per 5 s")
        .x_desc("seconds since the start")
        .x_label_formatter(&|x| format!("{x:.0}"))
        .y_label_formatter(&|y| format!("{y:.0}"))
        .light_line_style(WHITE)
        .draw()?;
    let grey = RGBColor(160, 160, 160);
    let bar = |b: usize, v: u64, colour: RGBColor| {
        let x = b as f64 * 5.0;
        Rectangle::new([(x, 0.0), (x + 5.0, v as f64)], colour.filled())
    };
    c.draw_series((0..buckets).map(|b| bar(b, ok[b], grey)))?;
    c.draw_series((0..buckets).map(|b| bar(b, failed[b], RED)))?;
    fault_marks(&mut c, rec, top)?;

    // Resident memory per process.
    let mut names: Vec<&String> = rec.samples.iter().map(|x| &x.name).collect();
    names.sort();
    names.dedup();
    let max_mib = rec
        .samples
        .iter()
        .map(|x| x.rss_kib)
        .max()
        .unwrap_or(1)
        .max(1) as f64
        / 1024.0;
    let mut c = ChartBuilder::on(rss)
        .margin(8)
        .margin_right(30)
        .x_label_area_size(28)
        .y_label_area_size(Y_LABELS)
        .build_cartesian_2d(0f64..total, 0f64..max_mib * 1.1)?;
    c.configure_mesh()
        .y_desc("resident memory, MiB")
        .x_desc("seconds since the start")
        .x_label_formatter(&|x| format!("{x:.0}"))
        .y_label_formatter(&|y| format!("{y:.0}"))
        .light_line_style(WHITE)
        .draw()?;
    fault_marks(&mut c, rec, max_mib * 1.1)?;
    let colours = [
        BLUE,
        GREEN,
        MAGENTA,
        CYAN,
        RGBColor(255, 127, 14),
        RGBColor(140, 86, 75),
        BLACK,
    ];
    for (k, name) in names.iter().enumerate() {
        let colour = colours[k % colours.len()];
        let points = rec
            .samples
            .iter()
            .filter(|x| &x.name == *name)
            .map(|x| (x.t, x.rss_kib as f64 / 1024.0));
        c.draw_series(LineSeries::new(points, colour.stroke_width(1)))?;
    }

    // Faults, one row per kind.
    let mut kinds: Vec<FaultKind> = rec.faults.iter().map(|f| f.kind).collect();
    kinds.sort();
    kinds.dedup();
    let rows = kinds.len().max(1) as f64;
    let mut c = ChartBuilder::on(faults)
        .margin(8)
        .margin_right(30)
        .x_label_area_size(28)
        .y_label_area_size(Y_LABELS)
        .build_cartesian_2d(0f64..total, 0f64..rows)?;
    let labels: Vec<String> = kinds.iter().map(|k| k.name().to_string()).collect();
    c.configure_mesh()
        .x_desc("seconds since the start")
        .x_label_formatter(&|x| format!("{x:.0}"))
        .y_labels(kinds.len().max(1) * 2 + 1)
        .y_label_formatter(&|y: &f64| crate::plot::category_label(&labels, *y))
        .light_line_style(WHITE)
        .draw()?;
    c.draw_series(rec.faults.iter().map(|f| {
        let row = kinds.iter().position(|k| *k == f.kind).unwrap_or(0) as f64;
        let end = f.end.max(f.start + total / 500.0);
        Rectangle::new(
            [(f.start, row + 0.2), (end, row + 0.8)],
            fault_colour(f.kind).filled(),
        )
    }))?;

    // The legend, above the panels.
    let mut x = 10;
    let mut entry = |label: &str, colour: RGBColor| -> Result<(), Box<dyn std::error::Error>> {
        head.draw(&Rectangle::new([(x, 38), (x + 12, 50)], colour.filled()))?;
        head.draw(&Text::new(
            label.to_string(),
            (x + 16, 37),
            ("sans-serif", 13).into_font(),
        ))?;
        x += 24 + 7 * label.len() as i32;
        Ok(())
    };
    entry("checked", grey)?;
    entry("failed", RED)?;
    entry("a fault begins (vertical lines)", RGBColor(230, 170, 170))?;
    for (k, name) in names.iter().enumerate().take(12) {
        entry(name, colours[k % colours.len()])?;
    }
    root.present()?;
    Ok(())
}

/// Room for the y labels, the same on every panel so that their time axes line up (the fault
/// panel's labels are the longest: "reload server certificate").
const Y_LABELS: u32 = 190;

/// A colour per kind of fault: deaths red, drains and restarts orange, the link's own events
/// blue, the rest grey.
fn fault_colour(k: FaultKind) -> plotters::style::RGBColor {
    use plotters::style::RGBColor;
    match k {
        FaultKind::KillServer | FaultKind::KillEtcd | FaultKind::DropPackets => {
            RGBColor(214, 39, 40)
        }
        FaultKind::DrainServer | FaultKind::RestartAllServers | FaultKind::RestartAgent => {
            RGBColor(255, 127, 14)
        }
        FaultKind::LinkBlackout
        | FaultKind::LinkRebinding
        | FaultKind::RebindNat
        | FaultKind::BlockUdp => RGBColor(31, 119, 180),
        _ => RGBColor(127, 127, 127),
    }
}

/// Marks each fault's start on a panel: a faint vertical line.
fn fault_marks<'a, DB: plotters::prelude::DrawingBackend + 'a>(
    c: &mut plotters::prelude::ChartContext<
        'a,
        DB,
        plotters::prelude::Cartesian2d<
            plotters::coord::types::RangedCoordf64,
            plotters::coord::types::RangedCoordf64,
        >,
    >,
    rec: &Record,
    top: f64,
) -> Result<(), plotters::drawing::DrawingAreaErrorKind<DB::ErrorType>> {
    use plotters::prelude::*;
    let faint = RGBColor(230, 170, 170);
    c.draw_series(
        rec.faults
            .iter()
            .map(|f| PathElement::new(vec![(f.start, 0.0), (f.start, top)], faint.stroke_width(1))),
    )?;
    Ok(())
}

// ---------------------------------------------------------------------------------------------
// Disconnected for long: an agent whose servers are all gone.
