//! Signing requests from joining and renewing nodes.
#![no_main]
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let _ = tether_trust::key_hash_of_csr(data);
});
