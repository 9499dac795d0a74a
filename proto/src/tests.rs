use super::*;
use bytes::BytesMut;
use proptest::prelude::*;

fn roundtrip(msg: Message) {
    let bytes = encode_to_bytes(&msg).expect("encodes");
    let (back, used) = decode(&bytes).expect("decodes").expect("whole frame");
    assert_eq!(back, msg);
    assert_eq!(used, bytes.len());
}

#[test]
fn capabilities_keep_unknown_names_and_drop_absurd_ones() {
    use capability::Capabilities;
    let ours = Capabilities::ours(&[capability::PEER]);
    assert!(ours.iter().any(|c| c == capability::CAPABILITIES));
    let long = "x".repeat(capability::MAX_NAME + 1);
    let theirs = Capabilities::from_announced(&[
        "apiserver".into(),
        "from-the-future".into(),
        String::new(),
        long.clone(),
    ]);
    assert!(theirs.has("apiserver") && theirs.has("from-the-future"));
    assert!(!theirs.has(capability::CAPABILITIES) && !theirs.has(&long) && !theirs.has(""));
    // A 0.1 hello: nothing new may be used.
    let old = Capabilities::from_announced(&["apiserver".into()]);
    assert!(!old.has(capability::CAPABILITIES));
}

#[test]
fn open_apiserver_is_stable_on_the_wire() {
    let msg = Message::Open {
        version: 1,
        target: Target::Service("apiserver".into()),
        hops: 0,
    };
    let bytes = encode_to_bytes(&msg).unwrap();
    let mut expect = vec![0x10, 0, 14, 1, 0, 0, 9];
    expect.extend_from_slice(b"apiserver");
    expect.push(0);
    assert_eq!(&bytes[..], &expect[..]);
    roundtrip(msg);
}

#[test]
fn partial_frames_ask_for_more() {
    let bytes = encode_to_bytes(&Message::Status {
        code: StatusCode::Busy,
        message: "too many streams".into(),
    })
    .unwrap();
    for cut in 0..bytes.len() {
        assert_eq!(decode(&bytes[..cut]), Ok(None), "cut at {cut}");
        let expect = if cut < FRAME_HEADER_LEN {
            FRAME_HEADER_LEN - cut
        } else {
            bytes.len() - cut
        };
        assert_eq!(bytes_needed(&bytes[..cut]).unwrap(), expect);
    }
    assert_eq!(bytes_needed(&bytes).unwrap(), 0);
}

#[test]
fn oversized_frames_are_refused_before_buffering() {
    let hdr = [kind::HELLO, 0xff, 0xff];
    assert_eq!(decode(&hdr), Err(DecodeError::FrameTooLarge(65535)));
    assert!(bytes_needed(&hdr).is_err());
}

#[test]
fn a_record_with_an_empty_address_list_has_one_encoding() {
    // Found by the fuzzer: a V3 record frame with no addresses decoded to a message that
    // re-encodes as V2. It is an error now.
    let msg = Message::NodeRecordV2 {
        name: "n".into(),
        state: RecordState::Revoked,
        epoch: 0,
        version: 1,
        writer: "w".into(),
        at_ms: 0,
        previous: String::new(),
        seen: false,
        addresses: Vec::new(),
    };
    let mut frame = encode_to_bytes(&msg).unwrap().to_vec();
    assert_eq!(frame[0], kind::NODE_RECORD_V2);
    frame[0] = kind::NODE_RECORD_V3;
    frame.extend_from_slice(&[0, 0]);
    let len = (frame.len() - FRAME_HEADER_LEN) as u16;
    frame[1..3].copy_from_slice(&len.to_be_bytes());
    assert!(matches!(
        decode(&frame),
        Err(DecodeError::EmptyAddresses { .. })
    ));
    let mut with = msg;
    if let Message::NodeRecordV2 { addresses, .. } = &mut with {
        addresses.push("10.0.0.1".into());
    }
    let frame = encode_to_bytes(&with).unwrap();
    assert_eq!(frame[0], kind::NODE_RECORD_V3);
    assert_eq!(decode(&frame).unwrap().unwrap().0, with);
}

#[test]
fn trailing_bytes_and_bad_fields_are_errors() {
    let mut b = encode_to_bytes(&Message::Drain).unwrap().to_vec();
    b[2] = 1;
    b.push(0);
    assert!(matches!(decode(&b), Err(DecodeError::TrailingBytes { .. })));
    assert!(matches!(
        decode(&[kind::HEALTH, 0, 1, 7]),
        Err(DecodeError::BadBool { .. })
    ));
    assert!(matches!(
        decode(&[kind::OPEN, 0, 2, 1, 9]),
        Err(DecodeError::BadTargetKind { .. })
    ));
    assert!(matches!(
        decode(&[kind::STATUS, 0, 3, 0, 0, 5]),
        Err(DecodeError::Truncated { .. })
    ));
    assert!(matches!(
        decode(&[kind::STATUS, 0, 5, 0, 0, 2, 0xff, 0xfe]),
        Err(DecodeError::BadUtf8 { .. })
    ));
}

#[test]
fn unknown_frames_are_skippable() {
    assert_eq!(
        decode(&[0x7f, 0, 2, 1, 2, 0x05]),
        Ok(Some((Message::Unknown { kind: 0x7f, len: 2 }, 5)))
    );
}

#[test]
fn unknown_status_codes_survive() {
    roundtrip(Message::Status {
        code: StatusCode::Other(200),
        message: String::new(),
    });
    assert_eq!(StatusCode::from_u8(200), StatusCode::Other(200));
}

#[test]
fn encoder_refuses_oversized_content() {
    let msg = Message::NodeInfo {
        addresses: vec!["x".repeat(1000); 20],
    };
    assert_eq!(
        encode_to_bytes(&msg),
        Err(EncodeError::TooLarge("node-info"))
    );
    let msg = Message::NodeInfo {
        addresses: vec![String::new(); MAX_LIST_ITEMS + 1],
    };
    assert_eq!(
        encode_to_bytes(&msg),
        Err(EncodeError::TooManyItems("node-info"))
    );
}

fn small_string() -> impl Strategy<Value = String> {
    ".{0,40}"
}

fn string_list() -> impl Strategy<Value = Vec<String>> {
    proptest::collection::vec(small_string(), 0..8)
}

fn any_status() -> impl Strategy<Value = StatusCode> {
    any::<u8>().prop_map(StatusCode::from_u8)
}

fn any_target() -> impl Strategy<Value = Target> {
    prop_oneof![
        small_string().prop_map(Target::Service),
        (small_string(), any::<u16>()).prop_map(|(host, port)| Target::Address { host, port }),
    ]
}

fn any_message() -> impl Strategy<Value = Message> {
    prop_oneof![
        (any::<u8>(), any::<u8>(), small_string(), string_list()).prop_map(
            |(min_version, max_version, node_name, capabilities)| Message::Hello {
                min_version,
                max_version,
                node_name,
                capabilities
            }
        ),
        (any::<u8>(), small_string(), string_list()).prop_map(
            |(version, server_id, capabilities)| Message::Welcome {
                version,
                server_id,
                capabilities
            }
        ),
        proptest::collection::vec(
            (small_string(), any::<bool>(), any::<bool>()).prop_map(|(addr, healthy, draining)| {
                ServerInfo {
                    addr,
                    healthy,
                    draining,
                }
            }),
            0..8
        )
        .prop_map(|servers| Message::ServerList { servers }),
        any::<bool>().prop_map(|upstream_healthy| Message::Health { upstream_healthy }),
        Just(Message::Drain),
        any::<u64>().prop_map(|nonce| Message::Ping { nonce }),
        any::<u64>().prop_map(|nonce| Message::Pong { nonce }),
        any::<u64>().prop_map(|unix_ms| Message::Clock { unix_ms }),
        (small_string(), string_list())
            .prop_map(|(issuer, trusted)| Message::RenewNow { issuer, trusted }),
        small_string().prop_map(|server_id| Message::ServerDown { server_id }),
        string_list().prop_map(|addresses| Message::NodeInfo { addresses }),
        (any::<u8>(), any_target(), any::<u8>()).prop_map(|(version, target, hops)| {
            Message::Open {
                version,
                target,
                hops,
            }
        }),
        (any_status(), small_string())
            .prop_map(|(code, message)| Message::Status { code, message }),
        (
            small_string(),
            prop_oneof![
                small_string().prop_map(RecordState::Owned),
                Just(RecordState::Revoked),
                Just(RecordState::Forgotten)
            ],
            any::<u64>()
        )
            .prop_map(|(name, state, at_ms)| Message::NodeRecord { name, state, at_ms }),
        (
            small_string(),
            prop_oneof![
                small_string().prop_map(RecordState::Owned),
                Just(RecordState::Revoked),
                Just(RecordState::Forgotten)
            ],
            (any::<u32>(), any::<u64>()),
            small_string(),
            (
                any::<u64>(),
                small_string(),
                any::<bool>(),
                proptest::collection::vec(small_string(), 0..4)
            )
        )
            .prop_map(
                |(name, state, (epoch, version), writer, (at_ms, previous, seen, addresses))| {
                    Message::NodeRecordV2 {
                        name,
                        state,
                        epoch,
                        version,
                        writer,
                        at_ms,
                        previous,
                        seen,
                        addresses,
                    }
                }
            ),
        (
            small_string(),
            small_string(),
            small_string(),
            proptest::collection::vec(any::<u8>(), 0..600)
        )
            .prop_map(|(token_id, secret, node_name, csr)| Message::Join {
                token_id,
                secret,
                node_name,
                csr
            }),
        proptest::collection::vec(any::<u8>(), 0..600).prop_map(|csr| Message::Renew { csr }),
        (any_status(), small_string(), small_string(), small_string()).prop_map(
            |(code, message, cert_pem, ca_pem)| Message::Certificate {
                code,
                message,
                cert_pem,
                ca_pem
            }
        ),
    ]
}

proptest! {
    #[test]
    fn every_message_round_trips(msg in any_message()) {
        roundtrip(msg);
    }

    #[test]
    fn concatenated_messages_decode_in_order(msgs in proptest::collection::vec(any_message(), 1..6)) {
        let mut buf = BytesMut::new();
        for m in &msgs {
            encode(m, &mut buf).unwrap();
        }
        let mut at = 0;
        for m in &msgs {
            let (back, used) = decode(&buf[at..]).unwrap().unwrap();
            prop_assert_eq!(&back, m);
            at += used;
        }
        prop_assert_eq!(at, buf.len());
    }

    #[test]
    fn arbitrary_bytes_never_panic(bytes in proptest::collection::vec(any::<u8>(), 0..512)) {
        let _ = decode(&bytes);
        let _ = bytes_needed(&bytes);
    }

    #[test]
    fn arbitrary_bodies_never_panic(kind in any::<u8>(), body in proptest::collection::vec(any::<u8>(), 0..300)) {
        let mut frame = vec![kind];
        frame.extend_from_slice(&(body.len() as u16).to_be_bytes());
        frame.extend_from_slice(&body);
        if let Ok(Some((_, used))) = decode(&frame) {
            prop_assert_eq!(used, frame.len());
        }
    }
}
