use super::*;

#[test]
fn failures_are_explained_only_by_what_the_fault_took_away() {
    let kill = Fault {
        kind: FaultKind::KillServer,
        target: "server-1".into(),
        start: 10.0,
        in_effect: 10.05,
        end: 13.0,
    };
    // A new connection: only when it was in flight at the kill.
    assert!(may_fail(&kill, "short", 9.9, 12.5));
    assert!(may_fail(&kill, "bulk", 5.0, 12.5));
    assert!(
        may_fail(&kill, "short", 10.01, 12.5),
        "began as the kill was being sent"
    );
    assert!(
        !may_fail(&kill, "short", 10.5, 12.5),
        "began after the kill"
    );
    assert!(!may_fail(&kill, "short", 18.0, 18.5));
    assert!(!may_fail(&kill, "short", 1.0, 2.0));
    // A watch or a CONNECT: in the fault's window, and a while after it.
    assert!(may_fail(&kill, "long", 1.0, 12.5));
    assert!(may_fail(&kill, "reverse", 18.0, 18.5));
    assert!(!may_fail(&kill, "reverse", 20.0, 21.0));
    let block = Fault {
        kind: FaultKind::BlockUdp,
        ..kill.clone()
    };
    assert!(may_fail(&block, "bulk", 9.0, 12.0));
    assert!(
        !may_fail(&block, "short", 11.0, 13.5),
        "began during the block"
    );
    let stopped = Fault {
        kind: FaultKind::StopUpstream,
        ..kill.clone()
    };
    assert!(may_fail(&stopped, "short", 9.8, 10.1));
    assert!(!may_fail(&stopped, "short", 11.0, 11.1));
    let drain = Fault {
        kind: FaultKind::DrainServer,
        ..kill.clone()
    };
    assert!(!may_fail(&drain, "short", 9.0, 12.5));
    assert!(may_fail(&drain, "long", 9.0, 12.5));
    let agent = Fault {
        kind: FaultKind::RestartAgent,
        ..kill.clone()
    };
    assert!(
        may_fail(&agent, "short", 12.0, 12.1),
        "refused while its agent was down"
    );
    // A restart explains failures through that agent only.
    let agent = Fault {
        target: "agent-1".into(),
        ..agent
    };
    let through = |a| Outcome {
        kind: "short",
        start: 12.0,
        end: 12.1,
        bytes: 0,
        failure: Some("reset".into()),
        corrupt: false,
        agent: a,
    };
    let faults = [agent.clone()];
    assert!(explanation(&faults, &through(1)).is_some());
    assert!(explanation(&faults, &through(0)).is_none());
    let rebind = Fault {
        kind: FaultKind::RebindNat,
        ..kill
    };
    assert!(!may_fail(&rebind, "long", 9.0, 12.5));
}

#[test]
fn a_corrupt_or_unexplained_connection_fails_the_run() {
    let s = Settings::new(Duration::from_secs(60), true, 1, PathBuf::new());
    let ok = judge("short", 1.0, 1.1, 0, b"abc", Ok(b"abc".to_vec()));
    assert!(ok.failure.is_none());
    let short = judge("short", 1.0, 1.1, 0, b"abc", Ok(b"ab".to_vec()));
    assert!(short.failure.is_some() && !short.corrupt);
    let bad = judge("short", 1.0, 1.1, 0, b"abc", Ok(b"abd".to_vec()));
    assert!(bad.corrupt);
    let rec = Record {
        outcomes: vec![ok.clone(), short],
        ..Default::default()
    };
    assert_eq!(judge_run(&rec, &s, 0).len(), 1, "the unexplained failure");
    let rec = Record {
        outcomes: vec![ok, bad],
        ..Default::default()
    };
    assert!(
        judge_run(&rec, &s, 2).len() == 2,
        "corruption and CLOSE_WAIT"
    );
}

#[test]
fn a_revoked_node_seen_after_its_bound_fails_the_run() {
    let s = Settings::new(Duration::from_secs(60), true, 1, PathBuf::new());
    let ok = judge("short", 1.0, 1.1, 0, b"abc", Ok(b"abc".to_vec()));
    let seen = |t: f64, what: &str| (t, "soak-revoked-0".to_string(), what.to_string());
    let mut rec = Record {
        outcomes: vec![ok],
        revocations: vec![(10.0, "soak-revoked-0".into())],
        // Still on a server just after the command returned: within the bound.
        after_revocation: vec![seen(11.0, "connected to server-1")],
        ..Default::default()
    };
    assert!(judge_run(&rec, &s, 0).is_empty());
    assert_eq!(revocation_times(&rec)[0].2, 1.0);
    // On a server, or renewing, after it: the revocation did not hold.
    for what in [
        "connected to server-2",
        "renewed its certificate (2 renewals)",
    ] {
        rec.after_revocation = vec![seen(10.0 + REVOKE_BOUND + 2.0, what)];
        let v = judge_run(&rec, &s, 0);
        assert!(v.len() == 1 && v[0].contains(what), "{v:?}");
    }
}

#[test]
fn a_long_connection_reset_late_after_its_server_died_fails_the_run() {
    let s = Settings::new(Duration::from_secs(60), true, 1, PathBuf::new());
    let long = |end: f64| Outcome {
        kind: "long",
        start: 1.0,
        end,
        bytes: 64,
        failure: Some("read: connection reset".into()),
        corrupt: false,
        agent: 0,
    };
    let kill = Fault {
        kind: FaultKind::KillServer,
        target: "server-0".into(),
        start: 10.0,
        in_effect: 10.05,
        end: 13.0,
    };
    // One connection that succeeded, so that the run as a whole is not refused for that.
    let ok = judge("short", 1.0, 1.1, 0, b"abc", Ok(b"abc".to_vec()));
    let prompt = Record {
        outcomes: vec![ok.clone(), long(12.8)],
        faults: vec![kill.clone()],
        ..Default::default()
    };
    assert!(judge_run(&prompt, &s, 0).is_empty());
    let late = Record {
        outcomes: vec![ok.clone(), long(18.5)],
        faults: vec![kill.clone()],
        ..Default::default()
    };
    let v = judge_run(&late, &s, 0);
    assert!(v.len() == 1 && v[0].contains("reset 8.5 s after"), "{v:?}");
    // A watch that outlived a kill on another server and ended with a later one: judged
    // by the later kill only.
    let later = Fault {
        start: 40.0,
        in_effect: 40.05,
        end: 43.0,
        ..kill.clone()
    };
    let outlived = Record {
        outcomes: vec![ok.clone(), long(42.0)],
        faults: vec![kill.clone(), later],
        ..Default::default()
    };
    assert!(judge_run(&outlived, &s, 0).is_empty());
    // Reset 8.5 s after a kill, but as its agent renewed for the second time since it
    // began: its tunnel's key was no longer good, which is by design.
    let rotated = |renewed: Vec<(f64, usize)>| Record {
        outcomes: vec![ok.clone(), long(18.5)],
        faults: vec![kill.clone()],
        renewed,
        ..Default::default()
    };
    assert!(judge_run(&rotated(vec![(5.0, 0), (19.0, 0)]), &s, 0).is_empty());
    let once = judge_run(&rotated(vec![(19.0, 0)]), &s, 0);
    assert!(
        once.len() == 1,
        "one renewal leaves the tunnel good: {once:?}"
    );
    let other = judge_run(&rotated(vec![(5.0, 1), (19.0, 1)]), &s, 0);
    assert!(other.len() == 1, "another agent's renewals: {other:?}");
}

#[test]
fn payloads_are_deterministic() {
    let (mut a, mut b) = (Rng::new(7), Rng::new(7));
    let (mut x, mut y) = ([0u8; 13], [0u8; 13]);
    a.fill(&mut x);
    b.fill(&mut y);
    assert_eq!(x, y);
    assert!(a.below(10) < 10);
}

/// The chart draws every panel with its axis titles and puts the legend above them. With
/// `TETHER_SOAK_CHART=PATH` the test also writes it, to look at.
#[test]
fn the_chart_has_a_time_axis_units_and_a_legend_above_the_panels() {
    let s = Settings::new(Duration::from_secs(120), true, 7, PathBuf::new());
    let mut rec = Record::default();
    for i in 0..200 {
        let t = i as f64 * 0.6;
        rec.outcomes.push(Outcome {
            kind: "short",
            start: t,
            end: t + 0.1,
            bytes: 64,
            failure: (i % 50 == 0).then(|| "reset".to_string()),
            corrupt: false,
            agent: 0,
        });
    }
    for (i, name) in ["server-0", "agent-0"].iter().enumerate() {
        for k in 0..60 {
            rec.samples.push(Sample {
                t: k as f64 * 2.0,
                name: name.to_string(),
                pid: i as u32,
                rss_kib: 20_000 + 100 * k,
                fds: 10,
                threads: 4,
            });
        }
    }
    for (kind, start) in [
        (FaultKind::KillServer, 20.0),
        (FaultKind::LinkBlackout, 50.0),
        (FaultKind::KillServer, 80.0),
    ] {
        rec.faults.push(Fault {
            kind,
            target: "server-0".into(),
            start,
            in_effect: start,
            end: start + 3.0,
        });
    }
    let svg = String::from_utf8(chart(&s, &rec).unwrap()).unwrap();
    if let Some(path) = std::env::var_os("TETHER_SOAK_CHART") {
        std::fs::write(path, &svg).unwrap();
    }
    for text in [
        "seconds since the start",
        "connections per 5 s",
        "resident memory, MiB",
        "kill -9 server",
        "link blackout",
        "checked",
        "failed",
        "server-0",
    ] {
        assert!(svg.contains(text), "the chart says {text:?}");
    }
}
