use super::*;

#[test]
fn endpoints_parse() {
    let e = Endpoint::parse("https://10.0.0.1:2379", false).unwrap();
    assert!(e.tls && e.port == 2379 && e.host == "10.0.0.1");
    let e = Endpoint::parse("etcd-0:2379", true).unwrap();
    assert!(e.tls && e.host == "etcd-0");
    let e = Endpoint::parse("http://[::1]:2379/", true).unwrap();
    assert!(!e.tls && e.host == "::1");
    assert!(Endpoint::parse("https://nohost", true).is_err());
    assert!(Endpoint::parse(":1", true).is_err());
}

#[test]
fn a_prefix_must_end_with_a_slash() {
    let with = |prefix: &str| EtcdSettings {
        endpoints: vec!["http://127.0.0.1:2379".into()],
        prefix: prefix.into(),
        ..Default::default()
    };
    // `/tether` would also cover `/tether-staging/...`.
    let err = Etcd::new(&with("/tether")).unwrap_err().to_string();
    assert!(err.contains("must end with `/`"), "{err}");
    assert_eq!(
        Etcd::new(&with("/tether/")).unwrap().key("nodes/a"),
        "/tether/nodes/a"
    );
    assert_eq!(Etcd::new(&with("")).unwrap().key(""), "/tether/");
}

#[test]
fn prefix_ranges_end_after_the_prefix() {
    assert_eq!(range_end("/tether/"), b"/tether0".to_vec());
    assert_eq!(range_end("a\u{7f}"), b"a\x80".to_vec());
}

#[test]
fn chunked_bodies_decode_across_reads() {
    let mut c = Chunked::new(bytes::Bytes::from_static(b"5\r\nhel"));
    let mut out = BytesMut::new();
    assert_eq!(c.decode(&mut out).unwrap(), Some(true));
    c.buf.extend_from_slice(b"lo\r\n3;x=1\r\n wo\r\n0\r\n\r\n");
    assert_eq!(c.decode(&mut out).unwrap(), Some(true));
    assert_eq!(&out[..], b"hello wo");
    assert_eq!(c.decode(&mut out).unwrap(), Some(false));
    // As etcd answers a lease keepalive.
    let body = "{\"result\":{\"TTL\":\"5\"}}\n".to_string();
    let wire = format!("{:x}\r\n{body}\r\n0\r\n\r\n", body.len());
    let mut c = Chunked::new(bytes::Bytes::from(wire.into_bytes()));
    let mut out = BytesMut::new();
    assert_eq!(c.decode(&mut out).unwrap(), Some(true));
    assert_eq!(c.decode(&mut out).unwrap(), Some(false));
    assert_eq!(&out[..], body.as_bytes());
    let mut bad = Chunked::new(bytes::Bytes::from_static(b"zz\r\n"));
    assert!(bad.decode(&mut out).is_err());
}

#[test]
fn kvs_decode_from_proto3_json() {
    let v: Value = serde_json::from_str(
        r#"{"key":"L3QvYQ==","create_revision":"3","mod_revision":"7","version":"2","value":"eA==","lease":"12"}"#,
    )
    .unwrap();
    let kv = decode_kv(&v).unwrap();
    assert_eq!(
        kv,
        Kv {
            key: "/t/a".into(),
            value: b"x".to_vec(),
            mod_revision: 7,
            lease: 12
        }
    );
    let bad: Value = serde_json::from_str(r#"{"key":"%%%"}"#).unwrap();
    assert!(decode_kv(&bad).is_err());
}
