//! Frames from the network: every decode either fails cleanly or yields a message that
//! re-encodes to the same bytes.
#![no_main]
use libfuzzer_sys::fuzz_target;
use tether_proto as protocol;

fuzz_target!(|data: &[u8]| {
    let _ = protocol::bytes_needed(data);
    if let Ok(Some((msg, used))) = protocol::decode(data) {
        assert!(used <= data.len());
        if !matches!(msg, protocol::Message::Unknown { .. }) {
            let again = protocol::encode_to_bytes(&msg).expect("decoded messages re-encode");
            assert_eq!(&again[..], &data[..used]);
        }
    }
});
