//! Lines of a records file (`DIR/nodes`): parsed into a record that passes its own checks, or
//! refused with an error.
#![no_main]
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    if let Ok(line) = std::str::from_utf8(data) {
        if let Ok(r) = tether_trust::records::parse_line(line) {
            assert!(r.validate().is_ok());
        }
    }
});
