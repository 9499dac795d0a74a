use super::*;
use crate::records::{NodeRecord, Records};

fn dir(name: &str) -> PathBuf {
    let d = std::env::temp_dir().join(format!("tether-rotation-{name}-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&d);
    crate::init(&d, &["cp1.example".into(), "10.0.0.1".into()], 30, 10).expect("init");
    d
}

fn agent(dir: &Path, name: &str) -> crate::Issued {
    Ca::load(dir)
        .expect("CA")
        .issue_agent(name, Lifetime::days(1))
        .expect("issue")
}

fn checks(issued: &crate::Issued, name: &str, bundle: &str) -> bool {
    let now = time::OffsetDateTime::now_utc().unix_timestamp();
    crate::check_issued(&issued.cert_pem, bundle, name, &issued.key_pem, now).is_ok()
}

#[test]
fn rotate_keeps_the_old_ca_trusted_and_issues_from_the_new_one() {
    let d = dir("rotate");
    let old_pem = read_string(&d.join(files::CA_CERT)).expect("ca");
    let before = agent(&d, "n1");
    let r = rotate(&d, 30, 10).expect("rotate");
    assert_eq!(r.old, hashes(&old_pem)[0]);
    assert_ne!(r.old, r.new);
    assert!(r
        .names
        .ends_with(&["cp1.example".to_string(), "10.0.0.1".to_string()]));
    let bundle = trusted(&d).expect("bundle");
    assert_eq!(hashes(&bundle), vec![r.new.clone(), r.old.clone()]);
    // Both CAs' certificates check out against the bundle; the new one not against the old CA.
    let after = agent(&d, "n2");
    assert!(checks(&before, "n1", &bundle));
    assert!(checks(&after, "n2", &bundle));
    assert!(!checks(&after, "n2", &old_pem));
    // The server certificate is the new CA's, for the same names.
    let server = read_string(&d.join(files::SERVER_CERT)).expect("server.crt");
    let ca = read_string(&d.join(files::CA_CERT)).expect("ca.crt");
    let s = pem_to_der(&server, &d).expect("der");
    let (_, s) = x509_parser::parse_x509_certificate(&s).expect("parse");
    let c = pem_to_der(&ca, &d).expect("der");
    let (_, c) = x509_parser::parse_x509_certificate(&c).expect("parse");
    assert!(s.verify_signature(Some(c.public_key())).is_ok());
    // The cross-signed certificate is the new CA's key under the old CA.
    let cross = cross(&d).expect("read").expect("cross");
    check_cross(&cross, &old_pem, &ca).expect("cross checks");
    // One rotation at a time.
    assert!(matches!(rotate(&d, 30, 10), Err(RotationError::Running(_))));
    // Finished: the old CA is trusted no more, the cross-signed certificate stays.
    assert!(finish(&d).expect("finish"));
    assert!(!finish(&d).expect("again"));
    let bundle = trusted(&d).expect("bundle");
    assert_eq!(hashes(&bundle), vec![r.new]);
    assert!(!checks(&before, "n1", &bundle));
    assert!(d.join(CA_CROSS).exists());
    let _ = std::fs::remove_dir_all(&d);
}

#[test]
fn adopt_brings_the_same_new_ca_to_another_master_and_refuses_another_cluster() {
    let first = dir("adopt-first");
    let second =
        std::env::temp_dir().join(format!("tether-rotation-adopt-2-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&second);
    std::fs::create_dir_all(&second).expect("mkdir");
    for f in [files::CA_CERT, files::CA_KEY] {
        std::fs::copy(first.join(f), second.join(f)).expect("copy");
    }
    crate::init(&second, &["cp2.example".into()], 30, 10).expect("init");
    let r = rotate(&first, 30, 10).expect("rotate");
    save(
        &first,
        &Rotation::start(r.old.clone(), r.new.clone(), &Records::default(), 1),
    )
    .expect("save");
    let a = adopt(&second, &first, 10).expect("adopt");
    assert_eq!(
        (a.old.as_str(), a.new.as_str()),
        (r.old.as_str(), r.new.as_str())
    );
    assert!(a.names.contains(&"cp2.example".to_string()));
    assert_eq!(
        hashes(&trusted(&second).expect("b")),
        vec![r.new.clone(), r.old]
    );
    assert_eq!(load(&second).expect("load").map(|x| x.new), Some(r.new));
    // Again: nothing changes but the server certificate.
    adopt(&second, &first, 10).expect("adopt again");
    // A data directory of another cluster is refused.
    let other = dir("adopt-other");
    assert!(matches!(
        adopt(&other, &first, 10),
        Err(RotationError::OtherCa { .. })
    ));
    for d in [first, second, other] {
        let _ = std::fs::remove_dir_all(d);
    }
}

fn owned(name: &str, key: &str) -> NodeRecord {
    let mut r = Records::default();
    r.write_local(name, NodeState::Owned(key.into()));
    r.by_name.remove(name).expect("record")
}

#[test]
fn a_node_moves_when_its_name_belongs_to_another_key() {
    let (k1, k2, k3) = ("a".repeat(64), "b".repeat(64), "c".repeat(64));
    let mut records = Records::default();
    records.merge(owned("n1", &k1));
    records.merge(owned("n2", &k2));
    let mut revoked = Records::default();
    revoked.write_local("n3", NodeState::Revoked);
    for r in revoked.by_name.into_values() {
        records.merge(r);
    }
    let rot = Rotation::start("1".repeat(64), "2".repeat(64), &records, 100);
    assert_eq!(rot.nodes.len(), 2, "only owned names are waited for");
    assert_eq!(
        rot.pending(&records),
        vec!["n1".to_string(), "n2".to_string()]
    );
    // n1 renews: its name belongs to a new key.
    assert!(records.renew("n1", &k1, &k3).is_ok());
    assert_eq!(rot.pending(&records), vec!["n2".to_string()]);
    // The record round-trips, finished or not.
    let mut done = rot.clone();
    done.finished = Some(200);
    for r in [rot, done] {
        assert_eq!(Rotation::parse(&r.to_text(), "test").expect("parse"), r);
    }
}

#[test]
fn a_bad_rotation_record_is_refused_with_its_line() {
    let good = Rotation::start("1".repeat(64), "2".repeat(64), &Records::default(), 5).to_text();
    for (bad, why) in [
        (good.replace(&"1".repeat(64), "xyz"), "line 2"),
        (
            format!("{good}node 10.0.0.1 {}\n", "a".repeat(64)),
            "line 5",
        ),
        (format!("{good}node n1 short\n"), "line 5"),
        (format!("{good}surprise\n"), "unknown field"),
        ("old x\n".to_string(), "line 1"),
        (good.replace("started 5\n", ""), "no started"),
    ] {
        let e = Rotation::parse(&bad, "test").expect_err(&bad).to_string();
        assert!(e.contains(why), "{e} (wanted {why})");
    }
}

#[test]
fn a_node_takes_a_new_ca_only_when_a_ca_it_trusts_vouches_for_it() {
    let d = dir("accepted");
    let old = read_string(&d.join(files::CA_CERT)).expect("ca");
    rotate(&d, 30, 10).expect("rotate");
    let both = trusted(&d).expect("bundle");
    let new = read_string(&d.join(files::CA_CERT)).expect("new ca");
    let cross = cross(&d).expect("read").expect("cross");
    let leaf = agent(&d, "n1").cert_pem;
    let chain = format!("{leaf}{cross}");
    // During the rotation: the new CA comes with the certificate the old one signed for it.
    assert_eq!(hashes(&accepted(&both, &old, &chain)), hashes(&both));
    // Without that certificate, only what the node trusts already.
    assert_eq!(hashes(&accepted(&both, &old, &leaf)), hashes(&old));
    // A rogue CA with a certificate it signed itself for its own name is not taken.
    let rogue = dir("accepted-rogue");
    let rogue_ca = read_string(&rogue.join(files::CA_CERT)).expect("rogue ca");
    let sent = format!("{rogue_ca}{old}");
    let self_vouched = format!("{leaf}{rogue_ca}");
    assert_eq!(hashes(&accepted(&sent, &old, &self_vouched)), hashes(&old));
    // At the end, the old CA goes: the node keeps what the server still trusts.
    assert_eq!(hashes(&accepted(&new, &both, &leaf)), hashes(&new));
    // The pinned CA is found wherever it is in the bundle.
    assert_eq!(
        pinned(&both, &hashes(&old)[0]).map(|p| hashes(&p)),
        Some(hashes(&old))
    );
    assert_eq!(pinned(&both, &"0".repeat(64)), None);
    for x in [d, rogue] {
        let _ = std::fs::remove_dir_all(x);
    }
}
