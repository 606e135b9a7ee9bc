#![no_main]
use libfuzzer_sys::fuzz_target;
use portcullis_node_fuzz::grammar::{parse_host, ParsedHost};

fuzz_target!(|data: &[u8]| {
    let Ok(host) = std::str::from_utf8(data) else { return };
    let bases = ["example.com".to_string(), "apps.example.com".to_string()];
    if let Ok(ParsedHost::Base { base, label }) = parse_host(host, &bases) {
        assert!(base < bases.len());
        // The name part is a prefix of the whole label.
        assert!(label.whole.starts_with(&label.name));
    }
});
