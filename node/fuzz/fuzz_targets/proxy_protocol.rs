#![no_main]
use libfuzzer_sys::fuzz_target;
use portcullis_node_fuzz::proxy_protocol::parse_proxy_header;

fuzz_target!(|data: &[u8]| {
    if let Ok(h) = parse_proxy_header(data) {
        assert!(h.consumed <= data.len());
    }
});
