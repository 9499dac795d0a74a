//! Request heads on the admin endpoint.
#![no_main]
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let _ = tether_endpoint::http::parse_request(data);
});
