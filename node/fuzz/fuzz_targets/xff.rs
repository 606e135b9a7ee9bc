#![no_main]
//! `X-Forwarded-For` from a trusted proxy: the balancer's client is the last hop of the last
//! field, and nothing the client itself wrote before that hop can change it.
use std::net::IpAddr;

use http::{HeaderMap, HeaderValue};
use libfuzzer_sys::fuzz_target;
use portcullis_node_fuzz::xff::{effective_client, last_hop};

fuzz_target!(|data: &[u8]| {
    // Byte 0: flags; bytes 1..17: the connection's client and the hop the proxy appends; the
    // rest: the fields the request arrived with, one per line.
    let Some((&flags, rest)) = data.split_first() else {
        return;
    };
    let Some((addrs, fields)) = rest.split_first_chunk::<16>() else {
        return;
    };
    let v6 = |b: &[u8; 16]| IpAddr::from(*b);
    let v4 = |b: &[u8]| IpAddr::from([b[0], b[1], b[2], b[3]]);
    let client = if flags & 1 == 0 {
        v4(&addrs[..4])
    } else {
        v6(addrs)
    };
    let hop = if flags & 2 == 0 {
        v4(&addrs[4..8])
    } else {
        v6(addrs)
    };
    let mut headers = HeaderMap::new();
    for line in fields.split(|&b| b == b'\n') {
        if let Ok(v) = HeaderValue::from_bytes(line) {
            headers.append("x-forwarded-for", v);
        }
    }
    // Not a trusted sender: its claims are ignored.
    assert_eq!(effective_client(client, &headers, |_| false), client);
    let got = effective_client(client, &headers, |ip| ip == client);
    let last = headers.get_all("x-forwarded-for").iter().next_back();
    match last.and_then(|v| v.to_str().ok()).and_then(last_hop) {
        Some(ip) => assert_eq!(got, ip),
        None => assert_eq!(got, client),
    }
    // The proxy appends its hop to the last field, or adds a field: either way it wins.
    let mut appended = headers.clone();
    let sep = if flags & 4 == 0 { ", " } else { "," };
    if let Some(last) = last.and_then(|v| v.to_str().ok()) {
        let v = HeaderValue::from_str(&format!("{last}{sep}{hop}")).expect("valid text");
        let mut values: Vec<HeaderValue> = appended
            .get_all("x-forwarded-for")
            .iter()
            .cloned()
            .collect();
        values.pop();
        values.push(v);
        appended.remove("x-forwarded-for");
        for v in values {
            appended.append("x-forwarded-for", v);
        }
        assert_eq!(effective_client(client, &appended, |_| true), hop);
    }
    let mut added = headers;
    added.append(
        "x-forwarded-for",
        HeaderValue::from_str(&hop.to_string()).expect("ip"),
    );
    assert_eq!(effective_client(client, &added, |_| true), hop);
});
