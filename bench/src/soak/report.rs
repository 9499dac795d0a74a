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
    std::fs::write(s.out.join("chart.svg"), chart(s, rec))?;
    Ok(s.out.join("report.md"))
}

/// Two panels over time: connections per 5 s (checked, failed) and RSS per process; faults as
/// vertical marks with their kind.
pub(super) fn chart(s: &Settings, rec: &Record) -> Vec<u8> {
    let (w, h) = (1000i64, 620i64);
    let mut c = Canvas::new(w as usize, h as usize);
    let (left, right) = (70i64, w - 20);
    let total = s.duration.as_secs_f64().max(1.0);
    let x_of = |t: f64| left + ((t / total) * (right - left) as f64) as i64;
    c.text(left, 6, "tether soak: connections per 5 s (grey: checked, red: failed); RSS per process; faults marked", 2, INK);
    let panels = [(40i64, 260i64), (330i64, 260i64)];
    for (top, ph) in panels {
        c.line((left, top + ph), (right, top + ph), INK);
        c.line((left, top), (left, top + ph), INK);
        for f in &rec.faults {
            let x = x_of(f.start);
            c.line((x, top), (x, top + ph), GRID);
        }
    }
    // Connections per 5 s bucket.
    let buckets = (total / 5.0).ceil() as usize + 1;
    let mut ok = vec![0u64; buckets];
    let mut failed = vec![0u64; buckets];
    for o in &rec.outcomes {
        let b = ((o.end / 5.0) as usize).min(buckets - 1);
        if o.failure.is_some() {
            failed[b] += 1;
        } else {
            ok[b] += 1;
        }
    }
    let top_n = ok
        .iter()
        .chain(failed.iter())
        .copied()
        .max()
        .unwrap_or(1)
        .max(1);
    let (top, ph) = panels[0];
    c.text(4, top, &format!("{top_n}"), 1, INK);
    let bw = ((right - left) as f64 / buckets as f64).max(1.0) as i64;
    for b in 0..buckets {
        let x = x_of(b as f64 * 5.0);
        let hk = (ok[b] as f64 / top_n as f64 * ph as f64) as i64;
        c.rect(x, top + ph - hk, bw.max(1), hk, SERIES[0]);
        let hf = (failed[b] as f64 / top_n as f64 * ph as f64) as i64;
        c.rect(x, top + ph - hf, bw.max(1), hf, 6);
    }
    // RSS per process name.
    let (top, ph) = panels[1];
    let max_rss = rec
        .samples
        .iter()
        .map(|x| x.rss_kib)
        .max()
        .unwrap_or(1)
        .max(1);
    c.text(4, top, &format!("{} MiB", max_rss >> 10), 1, INK);
    let mut names: Vec<&String> = rec.samples.iter().map(|x| &x.name).collect();
    names.sort();
    names.dedup();
    for (k, name) in names.iter().enumerate() {
        let colour = SERIES[1 + k % (SERIES.len() - 1)];
        let pts: Vec<(i64, i64)> = rec
            .samples
            .iter()
            .filter(|x| &x.name == *name)
            .map(|x| {
                let y = x.rss_kib as f64 / max_rss as f64 * ph as f64;
                (x_of(x.t), top + ph - y as i64)
            })
            .collect();
        for pair in pts.windows(2) {
            c.line(pair[0], pair[1], colour);
        }
        c.text(
            left + 10 + (k as i64 % 5) * 180,
            top + ph + 14 + (k as i64 / 5) * 12,
            name,
            1,
            colour,
        );
    }
    for (i, f) in rec.faults.iter().enumerate() {
        let x = x_of(f.start);
        c.text(
            x + 2,
            600 - (i as i64 % 3) * 10,
            f.kind.name().split(' ').next().unwrap_or(""),
            1,
            INK,
        );
    }
    c.text(
        right - 60,
        panels[1].0 + panels[1].1 + 40,
        &format!("{:.0} s", total),
        1,
        INK,
    );
    c.encode()
}

// ---------------------------------------------------------------------------------------------
// Disconnected for long: an agent whose servers are all gone.
