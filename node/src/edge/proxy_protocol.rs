//! PROXY protocol v1 (text) and v2 (binary) headers, as sent by load balancers in front of the
//! gateway to carry the real client address.
//!
//! Only connections from configured trusted CIDRs are parsed at all (`edge.proxy_protocol_from`);
//! from anyone else the header would be a spoofed client address. Pure function over the bytes
//! received so far, depending on `std` and `thiserror` only (the fuzz crate compiles this file
//! alone). Spec: <https://www.haproxy.org/download/2.9/doc/proxy-protocol.txt>.

use std::net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr};

/// The v2 signature.
pub const V2_SIGNATURE: [u8; 12] = *b"\r\n\r\n\0\r\nQUIT\n";
/// A v1 header is at most 107 bytes including CRLF.
const V1_MAX: usize = 107;
/// Largest v2 address block we accept; TLVs beyond the addresses are skipped but bounded.
const V2_MAX_LEN: usize = 2048;

/// What a PROXY header says about the connection.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ProxyHeader {
    /// The original client address. `None` for v2 LOCAL (health checks) and v1/v2 UNKNOWN or
    /// unsupported families: the TCP peer address stands.
    pub source: Option<SocketAddr>,
    pub destination: Option<SocketAddr>,
    /// Length of the header; the client's own bytes start right after it.
    pub consumed: usize,
}

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum ProxyError {
    #[error("incomplete proxy protocol header")]
    Incomplete,
    #[error("not a proxy protocol header")]
    NotProxy,
    #[error("malformed proxy protocol v1 header: {0}")]
    V1(&'static str),
    #[error("malformed proxy protocol v2 header: {0}")]
    V2(&'static str),
}

/// Does `buf` start like a PROXY header? `None` while too few bytes decide it.
pub fn looks_like_proxy(buf: &[u8]) -> Option<bool> {
    if buf.is_empty() {
        return None;
    }
    let v1 = b"PROXY ";
    let n1 = buf.len().min(v1.len());
    if buf[..n1] == v1[..n1] {
        return (buf.len() >= v1.len()).then_some(true);
    }
    let n2 = buf.len().min(V2_SIGNATURE.len());
    if buf[..n2] == V2_SIGNATURE[..n2] {
        return (n2 == V2_SIGNATURE.len()).then_some(true);
    }
    Some(false)
}

/// Parses a v1 or v2 header at the start of `buf`.
pub fn parse_proxy_header(buf: &[u8]) -> Result<ProxyHeader, ProxyError> {
    match looks_like_proxy(buf) {
        None => Err(ProxyError::Incomplete),
        Some(false) => Err(ProxyError::NotProxy),
        Some(true) if buf.starts_with(&V2_SIGNATURE) => parse_v2(buf),
        Some(true) => parse_v1(buf),
    }
}

fn parse_v1(buf: &[u8]) -> Result<ProxyHeader, ProxyError> {
    let window = &buf[..buf.len().min(V1_MAX)];
    let Some(end) = window.windows(2).position(|w| w == b"\r\n") else {
        return if buf.len() >= V1_MAX {
            Err(ProxyError::V1("no CRLF within 107 bytes"))
        } else {
            Err(ProxyError::Incomplete)
        };
    };
    let line = std::str::from_utf8(&buf[..end]).map_err(|_| ProxyError::V1("not ASCII"))?;
    let consumed = end + 2;
    let mut parts = line.split(' ');
    if parts.next() != Some("PROXY") {
        return Err(ProxyError::V1("missing PROXY"));
    }
    let proto = parts.next().ok_or(ProxyError::V1("missing protocol"))?;
    if proto == "UNKNOWN" {
        // The rest of the line is to be ignored by the receiver.
        return Ok(ProxyHeader {
            source: None,
            destination: None,
            consumed,
        });
    }
    let fields: Vec<&str> = parts.collect();
    let [src, dst, sport, dport] = fields.as_slice() else {
        return Err(ProxyError::V1("expected 4 address fields"));
    };
    let (src, dst): (IpAddr, IpAddr) = match proto {
        "TCP4" => (
            IpAddr::V4(
                src.parse::<Ipv4Addr>()
                    .map_err(|_| ProxyError::V1("bad IPv4 source"))?,
            ),
            IpAddr::V4(
                dst.parse::<Ipv4Addr>()
                    .map_err(|_| ProxyError::V1("bad IPv4 destination"))?,
            ),
        ),
        "TCP6" => (
            IpAddr::V6(
                src.parse::<Ipv6Addr>()
                    .map_err(|_| ProxyError::V1("bad IPv6 source"))?,
            ),
            IpAddr::V6(
                dst.parse::<Ipv6Addr>()
                    .map_err(|_| ProxyError::V1("bad IPv6 destination"))?,
            ),
        ),
        _ => return Err(ProxyError::V1("protocol must be TCP4, TCP6 or UNKNOWN")),
    };
    let port = |s: &str| -> Result<u16, ProxyError> {
        // The spec forbids leading zeros and signs; `parse` would accept "+80".
        if s.is_empty()
            || !s.bytes().all(|b| b.is_ascii_digit())
            || (s.len() > 1 && s.starts_with('0'))
        {
            return Err(ProxyError::V1("bad port"));
        }
        s.parse().map_err(|_| ProxyError::V1("bad port"))
    };
    Ok(ProxyHeader {
        source: Some(SocketAddr::new(src, port(sport)?)),
        destination: Some(SocketAddr::new(dst, port(dport)?)),
        consumed,
    })
}

fn parse_v2(buf: &[u8]) -> Result<ProxyHeader, ProxyError> {
    let Some(head) = buf.get(..16) else {
        return Err(ProxyError::Incomplete);
    };
    let ver_cmd = head[12];
    if ver_cmd >> 4 != 2 {
        return Err(ProxyError::V2("version is not 2"));
    }
    let fam = head[13];
    let len = usize::from(u16::from_be_bytes([head[14], head[15]]));
    if len > V2_MAX_LEN {
        return Err(ProxyError::V2("header longer than 2048 bytes"));
    }
    let Some(body) = buf.get(16..16 + len) else {
        return Err(ProxyError::Incomplete);
    };
    let consumed = 16 + len;
    match ver_cmd & 0x0f {
        // LOCAL: the proxy's own connection (health check); keep the peer address.
        0 => {
            return Ok(ProxyHeader {
                source: None,
                destination: None,
                consumed,
            })
        }
        1 => {}
        _ => return Err(ProxyError::V2("unknown command")),
    }
    let (source, destination) = match fam {
        // TCP over IPv4 / UDP over IPv4.
        0x11 | 0x12 => {
            let a = body
                .get(..12)
                .ok_or(ProxyError::V2("short IPv4 address block"))?;
            let ip = |o: usize| IpAddr::V4(Ipv4Addr::new(a[o], a[o + 1], a[o + 2], a[o + 3]));
            let port = |o: usize| u16::from_be_bytes([a[o], a[o + 1]]);
            (
                SocketAddr::new(ip(0), port(8)),
                SocketAddr::new(ip(4), port(10)),
            )
        }
        0x21 | 0x22 => {
            let a = body
                .get(..36)
                .ok_or(ProxyError::V2("short IPv6 address block"))?;
            let ip = |o: usize| {
                let mut b = [0u8; 16];
                b.copy_from_slice(&a[o..o + 16]);
                IpAddr::V6(Ipv6Addr::from(b))
            };
            let port = |o: usize| u16::from_be_bytes([a[o], a[o + 1]]);
            (
                SocketAddr::new(ip(0), port(32)),
                SocketAddr::new(ip(16), port(34)),
            )
        }
        // UNSPEC and AF_UNIX: nothing usable; the receiver keeps the peer address.
        _ => {
            return Ok(ProxyHeader {
                source: None,
                destination: None,
                consumed,
            })
        }
    };
    Ok(ProxyHeader {
        source: Some(source),
        destination: Some(destination),
        consumed,
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    #[test]
    fn v1_tcp4_and_tcp6() {
        let h = parse_proxy_header(b"PROXY TCP4 203.0.113.7 10.0.0.1 56324 443\r\n\x16\x03")
            .expect("v1");
        assert_eq!(h.source, Some("203.0.113.7:56324".parse().expect("addr")));
        assert_eq!(h.destination, Some("10.0.0.1:443".parse().expect("addr")));
        assert_eq!(h.consumed, 43);
        let h = parse_proxy_header(b"PROXY TCP6 2001:db8::1 ::1 1 443\r\n").expect("v6");
        assert_eq!(h.source, Some("[2001:db8::1]:1".parse().expect("addr")));
        let h = parse_proxy_header(b"PROXY UNKNOWN whatever\r\n").expect("unknown");
        assert_eq!(h.source, None);
    }

    #[test]
    fn v1_errors() {
        assert_eq!(
            parse_proxy_header(b"PROXY TCP4 1.2.3.4"),
            Err(ProxyError::Incomplete)
        );
        assert_eq!(parse_proxy_header(b"PROX"), Err(ProxyError::Incomplete));
        assert_eq!(
            parse_proxy_header(b"\x16\x03\x01"),
            Err(ProxyError::NotProxy)
        );
        assert!(matches!(
            parse_proxy_header(b"PROXY TCP4 1.2.3.4 5.6.7.8 +1 2\r\n"),
            Err(ProxyError::V1(_))
        ));
        assert!(matches!(
            parse_proxy_header(b"PROXY TCP4 1.2.3.4 5.6.7.8 01 2\r\n"),
            Err(ProxyError::V1(_))
        ));
        assert!(matches!(
            parse_proxy_header(b"PROXY TCP4 ::1 5.6.7.8 1 2\r\n"),
            Err(ProxyError::V1(_))
        ));
        assert!(matches!(
            parse_proxy_header(b"PROXY TCP4 1.2.3.4 5.6.7.8 1 99999\r\n"),
            Err(ProxyError::V1(_))
        ));
        let long = [b"PROXY ".as_slice(), &[b'a'; 200]].concat();
        assert!(matches!(parse_proxy_header(&long), Err(ProxyError::V1(_))));
    }

    fn v2(cmd: u8, fam: u8, body: &[u8]) -> Vec<u8> {
        let mut b = V2_SIGNATURE.to_vec();
        b.push(0x20 | cmd);
        b.push(fam);
        b.extend_from_slice(&(body.len() as u16).to_be_bytes());
        b.extend_from_slice(body);
        b
    }

    #[test]
    fn v2_families() {
        let body = [
            198, 51, 100, 9, 10, 0, 0, 1, 0x1f, 0x90, 0x01, 0xbb, /* a TLV */ 0x04, 0, 1, 0,
        ];
        let bytes = v2(1, 0x11, &body);
        let h = parse_proxy_header(&bytes).expect("v2");
        assert_eq!(h.source, Some("198.51.100.9:8080".parse().expect("addr")));
        assert_eq!(h.consumed, bytes.len());
        let mut six = vec![0u8; 36];
        six[15] = 1;
        six[32..34].copy_from_slice(&7u16.to_be_bytes());
        let h = parse_proxy_header(&v2(1, 0x21, &six)).expect("v6");
        assert_eq!(h.source, Some("[::1]:7".parse().expect("addr")));
        let h = parse_proxy_header(&v2(0, 0x11, &body)).expect("local");
        assert_eq!(h.source, None);
        assert!(matches!(
            parse_proxy_header(&v2(1, 0x11, &body[..4])),
            Err(ProxyError::V2(_))
        ));
        let full = v2(1, 0x11, &body);
        for n in 0..full.len() {
            assert_eq!(
                parse_proxy_header(&full[..n]),
                Err(ProxyError::Incomplete),
                "prefix {n}"
            );
        }
    }

    proptest! {
        #[test]
        fn never_panics(bytes in proptest::collection::vec(any::<u8>(), 0..300)) {
            let _ = parse_proxy_header(&bytes);
        }

        #[test]
        fn v2_random_bodies_never_panic(cmd in 0u8..16, fam in any::<u8>(), body in proptest::collection::vec(any::<u8>(), 0..80)) {
            let _ = parse_proxy_header(&v2(cmd, fam, &body));
        }

        #[test]
        fn v1_roundtrip(a in any::<[u8; 4]>(), b in any::<[u8; 4]>(), sp in any::<u16>(), dp in any::<u16>()) {
            let (s, d) = (Ipv4Addr::from(a), Ipv4Addr::from(b));
            let line = format!("PROXY TCP4 {s} {d} {sp} {dp}\r\n");
            let h = parse_proxy_header(line.as_bytes()).expect("parse");
            prop_assert_eq!(h.source, Some(SocketAddr::new(IpAddr::V4(s), sp)));
            prop_assert_eq!(h.destination, Some(SocketAddr::new(IpAddr::V4(d), dp)));
            prop_assert_eq!(h.consumed, line.len());
        }
    }
}
