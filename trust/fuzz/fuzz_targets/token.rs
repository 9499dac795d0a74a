//! Join tokens as typed by operators and sent by nodes.
#![no_main]
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    if let Ok(s) = std::str::from_utf8(data) {
        if let Ok(t) = s.parse::<tether_trust::token::Token>() {
            assert_eq!(t.to_string().parse::<tether_trust::token::Token>().ok(), Some(t));
        }
    }
});
