#![no_main]
use libfuzzer_sys::fuzz_target;
use portcullis_node_fuzz::clienthello::parse_client_hello;

fuzz_target!(|data: &[u8]| {
    if let Ok(h) = parse_client_hello(data) {
        // What was consumed is always within the input.
        assert!(h.consumed <= data.len());
    }
});
