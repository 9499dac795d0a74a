//! The TLS-over-TCP transport's stream framing, as a peer may send it: split anywhere, every
//! decode either fails cleanly or hands out at most the bytes that arrived.
#![no_main]
use tether_proto::bytes::BytesMut;
use libfuzzer_sys::fuzz_target;
use tether_proto::stream_framing::{Decoder, Event};

fuzz_target!(|data: &[u8]| {
    let Some((&split, rest)) = data.split_first() else {
        return;
    };
    let piece = usize::from(split).max(1);
    let mut d = Decoder::default();
    let mut buf = BytesMut::new();
    let mut out = 0usize;
    for chunk in rest.chunks(piece) {
        buf.extend_from_slice(chunk);
        loop {
            match d.decode(&mut buf, 1 + usize::from(split) * 7) {
                Ok(Some(Event::Data(b))) => {
                    assert!(!b.is_empty());
                    out += b.len();
                }
                Ok(Some(_)) => {}
                Ok(None) | Err(_) => break,
            }
        }
        assert!(out <= rest.len());
    }
});
