//! CONNECT request heads at the egress proxy: parsed or refused with a status (400, 405, or 431
//! for too many headers), never a panic;
//! a parsed target names a host and a port.
#![no_main]
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    match tether_endpoint::http::parse_connect(data) {
        Ok(r) => assert!(!r.host.is_empty() && r.host.len() <= 253),
        Err((code, _)) => assert!(matches!(code, 400 | 405 | 431)),
    }
});
