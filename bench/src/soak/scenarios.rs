//! Two more scenarios: every server gone at once, and a reconnect storm.

use super::*;

/// An agent whose servers are all unreachable for `outage` while local clients keep
/// connecting: each must be refused at once, the agent's memory and open files must stay
/// flat, and when one server returns the agent must carry traffic again within seconds.
pub fn disconnected(settings: &Settings, outage: Duration) -> Result<Verdict> {
    use std::fmt::Write as _;
    let work = fresh_dir(&settings.out.join("work-disconnected"))?;
    // Certificates that outlive the outage: an agent whose certificate expired while it was
    // cut off must join again, which is not what this scenario looks at.
    let lab = Lab::build(
        &work,
        1,
        outage + Duration::from_secs(3600),
        false,
        None,
        &settings.log_level,
    )?;
    for s in &lab.servers {
        lock(s).kill9();
    }
    let (api, admin, pid) = {
        let a = lock(&lab.agents[0]);
        (
            a.api,
            a.slot.admin,
            a.slot.pid().context("the agent is not running")?,
        )
    };
    // Connections made while the agent has not yet noticed wait for that; the promise is
    // about the outage once it is known. Every server silent at once looks like a dead link,
    // which the agent sits out for its blackout tolerance (30 s by default) before it gives
    // its tunnels up.
    wait_until(
        "the agent notices",
        BLACKOUT_TOLERANCE + Duration::from_secs(15),
        || {
            lab.node
                .http_get(admin, "/metrics")
                .ok()
                .and_then(|m| crate::procs::metric(&m, "tether_tunnels_up "))
                == Some(0.0)
        },
    )?;
    // A connection in the first moments of the outage waits out the grace (a gap between
    // tunnels may end in it), and is then refused; after the grace, refusals come at once.
    let in_grace = Instant::now();
    let first = exchange(&lab.node, api, Arc::new(b"anyone?".to_vec()));
    let grace_wait = in_grace.elapsed();
    let mut violations = Vec::new();
    if first.is_ok_and(|b| !b.is_empty()) {
        violations.push("a local connection was answered with no server up".to_string());
    }
    if grace_wait > GRACE + Duration::from_secs(1) {
        violations.push(format!(
            "a connection at the start of the outage waited {grace_wait:?}, over the {GRACE:?} grace"
        ));
    }
    // The grace counts from the loss of the last tunnel, which came before the notice: once
    // this connection is refused, it is over.
    eprintln!("soak: every server killed; local clients keep connecting for {outage:?}");
    let t0 = Instant::now();
    let (mut refused, mut slow, mut answered) = (0u64, Vec::new(), 0u64);
    let mut samples: Vec<(f64, u64, u64)> = Vec::new();
    let mut next_sample = Instant::now();
    while t0.elapsed() < outage {
        if Instant::now() >= next_sample {
            let rss = status_field(pid, "VmRSS:").unwrap_or(0);
            samples.push((
                t0.elapsed().as_secs_f64(),
                rss,
                count_dir(&format!("/proc/{pid}/fd")),
            ));
            next_sample += Duration::from_secs(2);
        }
        let start = Instant::now();
        let outcome = (|| -> std::io::Result<usize> {
            let mut c = connect(&lab.node, api)?;
            c.set_read_timeout(Some(Duration::from_secs(5)))?;
            let _ = c.write_all(b"are you there?\n");
            let mut b = [0u8; 64];
            c.read(&mut b)
        })();
        let took = start.elapsed();
        match outcome {
            Ok(n) if n > 0 => answered += 1,
            _ if took > Duration::from_secs(1) => slow.push(took),
            _ => refused += 1,
        }
        std::thread::sleep(Duration::from_millis(50));
    }
    lock(&lab.servers[0]).start()?;
    let back = Instant::now();
    let data = Arc::new(b"hello again".to_vec());
    let mut reconnected = None;
    while back.elapsed() < Duration::from_secs(60) {
        if exchange(&lab.node, api, data.clone()).is_ok_and(|b| b == *data) {
            reconnected = Some(back.elapsed());
            break;
        }
        std::thread::sleep(Duration::from_millis(100));
    }
    if !slow.is_empty() {
        violations.push(format!(
            "{} local connections waited over 1 s for their refusal (longest {:?})",
            slow.len(),
            slow.iter().max().copied().unwrap_or_default()
        ));
    }
    if answered > 0 {
        violations.push(format!(
            "{answered} local connections were answered with no server up"
        ));
    }
    let base = samples
        .iter()
        .find(|x| x.0 >= outage.as_secs_f64() / 10.0)
        .or(samples.first())
        .copied()
        .unwrap_or_default();
    let (max_rss, max_fds) = samples
        .iter()
        .fold((0, 0), |(r, f), x| (r.max(x.1), f.max(x.2)));
    if max_rss > base.1 + 16 * 1024 {
        violations.push(format!(
            "the agent grew from {} to {} MiB while disconnected",
            base.1 >> 10,
            max_rss >> 10
        ));
    }
    if max_fds > base.2 + 16 {
        violations.push(format!(
            "the agent's open files grew from {} to {max_fds} while disconnected",
            base.2
        ));
    }
    match reconnected {
        Some(t) if t <= Duration::from_secs(10) => {}
        Some(t) => violations.push(format!("the agent took {t:?} to carry traffic again")),
        None => violations.push("the agent did not carry traffic again within 60 s".into()),
    }
    let mut md = String::new();
    let _ = writeln!(md, "# tether soak: disconnected for {outage:?}\n");
    let verdict = if violations.is_empty() {
        "PASS"
    } else {
        "FAIL"
    };
    let _ = writeln!(md, "**{verdict}**\n");
    for v in &violations {
        let _ = writeln!(md, "- {v}");
    }
    let _ = writeln!(
        md,
        "\n| figure | value |\n|---|---|\n| a connection at the start of the outage, refused after (grace {GRACE:?}) | {:.2} s |\n| local connections refused at once after the grace | {refused} |\n| refused after more than 1 s | {} |\n| agent RSS after warm-up / max (MiB) | {:.1} / {:.1} |\n| agent open files after warm-up / max | {} / {max_fds} |\n| traffic again after one server returned | {} |",
        grace_wait.as_secs_f64(),
        slow.len(),
        base.1 as f64 / 1024.0,
        max_rss as f64 / 1024.0,
        base.2,
        reconnected.map_or("never".to_string(), |t| format!("{:.2} s", t.as_secs_f64()))
    );
    let report = settings.out.join("report-disconnected.md");
    std::fs::write(&report, md)?;
    Ok(Verdict { violations, report })
}

/// The reconnect storm's report and verdict (see `scale::storm`).
pub fn storm(settings: &Settings, agents: usize) -> Result<Verdict> {
    use std::fmt::Write as _;
    let work = fresh_dir(&settings.out.join("work-storm"))?;
    let pki = crate::path::Pki::create(&work)?;
    let up = crate::load::Upstream::start()?;
    let mut md = String::from("# tether soak: reconnect storm\n\n| transport | agents | back | seconds until all back | server peak CPU | server peak RSS (MiB) |\n|---|---|---|---|---|---|\n");
    let mut violations = Vec::new();
    for transport in ["quic", "tcp"] {
        eprintln!("soak: {agents} simulated agents over {transport}; the server is killed and started again");
        let s = crate::scale::storm(
            &work,
            &pki,
            &up,
            transport,
            agents,
            Duration::from_millis(500),
        )?;
        let _ = writeln!(
            md,
            "| {transport} | {} | {} | {:.2} | {:.0}% | {:.1} |",
            s.agents,
            s.back,
            s.seconds_to_all_back,
            s.peak_cpu_percent,
            s.peak_rss_kb as f64 / 1024.0
        );
        if s.back < s.agents {
            violations.push(format!(
                "{transport}: {} of {} agents back after {:.0} s",
                s.back, s.agents, s.seconds_to_all_back
            ));
        }
    }
    let verdict = if violations.is_empty() {
        "PASS"
    } else {
        "FAIL"
    };
    let _ = writeln!(md, "\n**{verdict}**");
    for v in &violations {
        let _ = writeln!(md, "- {v}");
    }
    let report = settings.out.join("report-storm.md");
    std::fs::write(&report, md)?;
    Ok(Verdict { violations, report })
}
