#![no_main]
//! Backend addresses: `split_host_port` (config, admin API, routing), `join_host_port` (a
//! backend's address for a non-default port) and `Target::parse` (every connect). Never panics,
//! and what is joined or printed parses back to the same host and port.
use libfuzzer_sys::fuzz_target;
use portcullis_node_fuzz::hostport::{join_host_port, split_host_port, Target};

fn within(part: &str, whole: &str) -> bool {
    let (p, w) = (part.as_ptr() as usize, whole.as_ptr() as usize);
    p >= w && p + part.len() <= w + whole.len()
}

fuzz_target!(|data: &[u8]| {
    // The first two bytes are the port to join with; the rest is the address.
    let Some((port, rest)) = data.split_first_chunk::<2>() else {
        return;
    };
    let port = u16::from_be_bytes(*port);
    let Ok(addr) = std::str::from_utf8(rest) else {
        return;
    };
    let (host, fixed) = split_host_port(addr);
    assert!(within(host, addr), "the host is a part of the input");
    let target = Target::parse(addr);
    assert_eq!(
        target.as_ref().map(|t| (t.host.as_str(), t.port)),
        fixed.filter(|_| !host.is_empty()).map(|p| (host, p))
    );
    // A host with `]` cannot be bracketed unambiguously; no name or address contains one.
    if host.is_empty() || host.contains(']') {
        return;
    }
    // `route::Backend::address` for another port: host from the stored address, new port.
    let joined = join_host_port(host, port);
    assert_eq!(split_host_port(&joined), (host, Some(port)), "{joined:?}");
    let expected = Target {
        host: host.to_string(),
        port,
    };
    assert_eq!(
        Target::parse(&joined).as_ref(),
        Some(&expected),
        "{joined:?}"
    );
    assert_eq!(expected.to_string(), joined);
    if let Some(t) = target {
        assert_eq!(Target::parse(&t.to_string()), Some(t));
    }
});
