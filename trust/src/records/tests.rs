use super::*;

fn key(n: u8) -> String {
    hex_of(n)
}

fn hex_of(n: u8) -> String {
    format!("{n:02x}").repeat(32)
}

fn rec(state: NodeState, epoch: u32, version: u64, writer: &str) -> NodeRecord {
    NodeRecord {
        name: "n".into(),
        state,
        epoch,
        version,
        writer: writer.into(),
        previous: None,
        seen: false,
        at: 0,
        addresses: Vec::new(),
    }
}

fn merged(order: &[&NodeRecord]) -> Records {
    let mut r = Records::default();
    for x in order {
        r.merge((*x).clone());
    }
    r
}

#[test]
fn the_same_records_merge_to_the_same_result_in_any_order() {
    let owned = rec(NodeState::Owned(key(1)), 0, 1, "a");
    let renewed = rec(NodeState::Owned(key(2)), 0, 2, "b");
    let revoked = rec(NodeState::Revoked, 0, 2, "a");
    let forgotten = rec(NodeState::Forgotten, 1, 1, "a");
    let rejoined = rec(NodeState::Owned(key(3)), 1, 2, "b");
    let all = [&owned, &renewed, &revoked, &forgotten, &rejoined];
    let want = merged(&all);
    // Every one of the 120 orders.
    fn permutations<'a>(items: &[&'a NodeRecord], out: &mut Vec<Vec<&'a NodeRecord>>) {
        if items.len() <= 1 {
            out.push(items.to_vec());
            return;
        }
        for i in 0..items.len() {
            let mut rest = items.to_vec();
            let first = rest.remove(i);
            let mut tails = Vec::new();
            permutations(&rest, &mut tails);
            for mut t in tails {
                t.insert(0, first);
                out.push(t);
            }
        }
    }
    let mut orders = Vec::new();
    permutations(&all, &mut orders);
    assert_eq!(orders.len(), 120);
    for order in orders {
        assert_eq!(merged(&order), want);
    }
    assert_eq!(want.check("n", &key(3)), Verdict::Allowed);
    assert_eq!(want.check("n", &key(2)), Verdict::OtherOwner);
}

#[test]
fn a_renewal_never_lifts_a_revocation_and_a_forget_does() {
    let revoked = rec(NodeState::Revoked, 0, 2, "a");
    // Renewals on a server that had not heard of the revocation, however many.
    for v in [2, 3, 1000] {
        let renewal = rec(NodeState::Owned(key(9)), 0, v, "zzz");
        assert!(!renewal.beats(&revoked), "version {v}");
        assert!(revoked.beats(&renewal));
    }
    let forgotten = rec(NodeState::Forgotten, 1, 1, "a");
    assert!(forgotten.beats(&revoked));
    let r = merged(&[&revoked, &forgotten]);
    assert_eq!(r.check("n", &key(1)), Verdict::Forgotten);
    // No clock: a record's time does not matter.
    let mut late = rec(NodeState::Owned(key(9)), 0, 1, "a");
    late.at = u64::MAX;
    assert!(!late.beats(&revoked));
}

#[test]
fn records_from_0_1_peers_order_by_time_and_never_lift_a_revocation() {
    let mut revoked = rec(NodeState::Revoked, 0, 2, "a");
    revoked.at = 100;
    assert!(NodeRecord::from_v1("n", NodeState::Owned(key(1)), 200, Some(&revoked)).is_none());
    assert!(NodeRecord::from_v1("n", NodeState::Forgotten, 50, Some(&revoked)).is_none());
    let f = NodeRecord::from_v1("n", NodeState::Forgotten, 200, Some(&revoked)).unwrap();
    assert!(f.beats(&revoked) && f.epoch == 1);
    let fresh = NodeRecord::from_v1("n", NodeState::Owned(key(1)), 5, None).unwrap();
    assert_eq!((fresh.epoch, fresh.version), (0, 0));
}

#[test]
fn absurd_and_malformed_records_are_refused() {
    let mut r = rec(NodeState::Owned("not-hex".into()), 0, 1, "a");
    assert!(matches!(r.validate(), Err(RecordError::Key(_))));
    r.state = NodeState::Owned(key(1));
    r.version = u64::MAX;
    assert!(matches!(r.validate(), Err(RecordError::Absurd { .. })));
    r.version = 1;
    r.name = "10.0.0.1".into();
    assert!(matches!(r.validate(), Err(RecordError::Name(_))));
    r.name = "n".into();
    r.writer = "a b".into();
    assert!(r.validate().is_err());
    for bad in [
        "n",
        "n owned:zz 1",
        "n sleeping 1",
        "n revoked soon",
        "n revoked 1 e=x",
        "n revoked 1 q=1",
        "n revoked 1 e=99999999999",
    ] {
        assert!(parse_line(bad).is_err(), "{bad}");
    }
    // A line 0.1 wrote reads as epoch 0, version 0.
    let old = parse_line(&format!("n owned:{} 17", key(1))).unwrap();
    assert_eq!((old.epoch, old.version, old.at), (0, 0, 17));
}

#[test]
fn a_corrupt_file_is_an_error_naming_its_line() {
    let d = std::env::temp_dir().join(format!("tether-records-bad-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&d);
    std::fs::create_dir_all(&d).unwrap();
    std::fs::write(
        d.join(NODES_FILE),
        format!(
            "# header\nn1 revoked 1\nn2 owned:{} 2\nn3 garbage\n",
            key(1)
        ),
    )
    .unwrap();
    let err = Records::load(&d).unwrap_err().to_string();
    assert!(err.contains("line 4") && err.contains("nodes"), "{err}");
    let _ = std::fs::remove_dir_all(&d);
}

#[test]
fn addresses_are_owned_by_the_first_claim_and_kept_until_released_or_forgotten() {
    let ip = |s: &str| s.parse::<IpAddr>().unwrap();
    let mut r = Records::default();
    // A first claim by a name with no record records its owner too.
    let (c, changed) = r.add_addresses("a", Some(&key(1)), &[ip("10.0.0.2"), ip("10.0.0.1")]);
    assert!(changed);
    assert_eq!(c.owned, vec![ip("10.0.0.1"), ip("10.0.0.2")]);
    assert_eq!(r.check("a", &key(1)), Verdict::Allowed);
    assert_eq!(r.owners_of(ip("10.0.0.1")), vec!["a"]);
    // Claiming again writes nothing; another key of the name claims nothing.
    assert!(!r.add_addresses("a", Some(&key(1)), &[ip("10.0.0.1")]).1);
    let (c, changed) = r.add_addresses("a", Some(&key(2)), &[ip("10.0.0.9")]);
    assert!(!changed && c.refused.len() == 1);
    // Renewal and revocation keep the addresses; the line round-trips.
    r.renew("a", &key(1), &key(3)).unwrap();
    r.write_local("a", NodeState::Revoked);
    assert_eq!(r.owners_of(ip("10.0.0.2")), vec!["a"]);
    let line = r.by_name["a"].to_line();
    assert!(line.ends_with(" a=10.0.0.1,10.0.0.2"), "{line}");
    assert_eq!(parse_line(&line).unwrap(), r.by_name["a"]);
    // A released address is free; a forget frees them all.
    assert!(r.release_address("a", ip("10.0.0.1")));
    assert!(r.owners_of(ip("10.0.0.1")).is_empty());
    r.write_local("a", NodeState::Forgotten);
    assert!(r.owners_of(ip("10.0.0.2")).is_empty());
    assert!(r.by_name["a"].addresses.is_empty());
    // One address, one form: an IPv4-mapped IPv6 address is its IPv4 address.
    let (c, _) = r.add_addresses("c", Some(&key(5)), &[ip("::ffff:10.2.0.1")]);
    assert_eq!(c.owned, vec![ip("10.2.0.1")]);
    assert_eq!(r.owners_of(ip("::ffff:10.2.0.1")), vec!["c"]);
    // Bounded: a node owns at most MAX_ADDRESSES.
    let many: Vec<IpAddr> = (0..40u8).map(|i| IpAddr::from([10, 1, 0, i])).collect();
    let (c, _) = r.add_addresses("b", Some(&key(4)), &many);
    assert_eq!(
        (c.owned.len(), c.refused.len()),
        (MAX_ADDRESSES, 40 - MAX_ADDRESSES)
    );
    for bad in ["n revoked 1 a=edge-1", "n forgotten 1 a=10.0.0.1"] {
        assert!(parse_line(bad).is_err(), "{bad}");
    }
}

#[test]
fn forgotten_records_expire_and_do_not_come_back_from_a_peer() {
    let mut r = Records::default();
    let mut old = rec(NodeState::Forgotten, 1, 1, "a");
    old.at = 1;
    r.by_name.insert("n".into(), old.clone());
    let now = FORGOTTEN_KEPT_MS + 10;
    assert_eq!(r.expired(now), vec!["n"]);
    r.by_name.remove("n");
    assert!(
        !r.merge(old),
        "a peer's copy of an expired record is not taken"
    );
    assert!(r.by_name.is_empty());
}

#[test]
fn claims_and_files() {
    let (k1, k2, k3, k4, k9) = (key(1), key(2), key(3), key(4), key(9));
    let d = std::env::temp_dir().join(format!("tether-records-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&d);
    std::fs::create_dir_all(&d).unwrap();
    assert_eq!(claim(&d, "n1", &k1).unwrap(), Ok(()));
    assert_eq!(claim(&d, "n1", &k1).unwrap(), Ok(()));
    assert!(claim(&d, "n1", &k2).unwrap().is_err());
    write_local(&d, "n1", NodeState::Forgotten).unwrap();
    assert_eq!(claim(&d, "n1", &k2).unwrap(), Ok(()));
    let r = Records::load(&d).unwrap();
    assert_eq!(r.check("n1", &k2), Verdict::Allowed);
    assert_eq!(r.check("n1", &k1), Verdict::OtherOwner);
    assert_eq!(r.by_name["n1"].epoch, 1);
    // Renewal: only by the current owner, never once revoked or forgotten.
    assert!(renew(&d, "n1", &k1, &k9).unwrap().is_err(), "not the owner");
    assert_eq!(renew(&d, "n1", &k2, &k3).unwrap(), Ok(()));
    let r = Records::load(&d).unwrap();
    assert_eq!(r.check("n1", &k3), Verdict::Allowed);
    assert_eq!(
        r.check("n1", &k2),
        Verdict::Allowed,
        "good until k3 is seen"
    );
    // The answer was lost: the node renews again with its old key.
    assert_eq!(renew(&d, "n1", &k2, &k4).unwrap(), Ok(()));
    let r = Records::load(&d).unwrap();
    assert_eq!(
        r.check("n1", &k3),
        Verdict::OtherOwner,
        "never seen, replaced"
    );
    assert_eq!(r.check("n1", &k2), Verdict::Allowed);
    // k4 is seen in a handshake: k2 is done.
    assert!(!confirm(&d, "n1", &k2).unwrap());
    assert!(confirm(&d, "n1", &k4).unwrap());
    assert!(!confirm(&d, "n1", &k4).unwrap());
    let r = Records::load(&d).unwrap();
    assert_eq!(r.check("n1", &k2), Verdict::Superseded);
    assert_eq!(r.check("n1", &k9), Verdict::OtherOwner);
    assert!(
        renew(&d, "n1", &k2, &k9).unwrap().is_err(),
        "k2 is no longer the owner"
    );
    assert_eq!(renew(&d, "n1", &k4, &k3).unwrap(), Ok(()));
    assert!(confirm(&d, "n1", &k3).unwrap());
    write_local(&d, "n1", NodeState::Revoked).unwrap();
    assert!(renew(&d, "n1", &k3, &k4).unwrap().is_err(), "revoked");
    assert_eq!(
        Records::load(&d).unwrap().check("n1", &k3),
        Verdict::Revoked
    );
    write_local(&d, "n1", NodeState::Forgotten).unwrap();
    assert!(renew(&d, "n1", &k3, &k4).unwrap().is_err(), "forgotten");
    assert_eq!(
        Records::load(&d).unwrap().check("n1", &k3),
        Verdict::Forgotten
    );
    let _ = std::fs::remove_dir_all(&d);
}
