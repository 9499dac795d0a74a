//! Request heads on the admin endpoint.
#![no_main]
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let _ = tether_common::endpoint::http::parse_request(data);
});
