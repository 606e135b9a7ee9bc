//! `X-Forwarded-For` as the balancer reads it: which client address a request from a trusted
//! proxy (a PROXY protocol sender in `edge.proxy_protocol_from`) stands for.
//!
//! Pure code over `std` and `http`, so the fuzz crate (`node/fuzz`, target `xff`) compiles this
//! file alone.

use std::net::IpAddr;

/// The address to balance on: the connection's client (already resolved from a trusted PROXY
/// header), or, when that client is itself a trusted proxy, the last `X-Forwarded-For` hop
/// it added.
pub fn effective_client(
    client: IpAddr,
    headers: &http::HeaderMap,
    xff_trusted: impl Fn(IpAddr) -> bool,
) -> IpAddr {
    if !xff_trusted(client) {
        return client;
    }
    headers
        .get_all("x-forwarded-for")
        .iter()
        .next_back()
        .and_then(|v| v.to_str().ok())
        .and_then(last_hop)
        .unwrap_or(client)
}

/// The last hop of one `X-Forwarded-For` value (`client, proxy1, proxy2`): the one the trusted
/// sender appended. `None` when it is not an IP address.
pub fn last_hop(value: &str) -> Option<IpAddr> {
    value.rsplit(',').next()?.trim().parse().ok()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ip(s: &str) -> IpAddr {
        s.parse().expect("literal")
    }

    #[test]
    fn the_last_hop_of_the_last_field_counts() {
        assert_eq!(last_hop("1.1.1.1, 8.8.8.8"), Some(ip("8.8.8.8")));
        assert_eq!(last_hop(" 2001:db8::1 "), Some(ip("2001:db8::1")));
        assert_eq!(last_hop("8.8.8.8, unknown"), None);
        assert_eq!(last_hop("8.8.8.8,"), None);
        assert_eq!(last_hop(""), None);
        let mut h = http::HeaderMap::new();
        h.append("x-forwarded-for", "1.1.1.1".parse().expect("v"));
        h.append("x-forwarded-for", "9.9.9.9, 8.8.8.8".parse().expect("v"));
        let proxy = ip("10.0.0.1");
        assert_eq!(effective_client(proxy, &h, |_| true), ip("8.8.8.8"));
        // A last hop that is not an address falls back to the connection's client.
        h.append("x-forwarded-for", "8.8.4.4, garbage".parse().expect("v"));
        assert_eq!(effective_client(proxy, &h, |_| true), proxy);
        // Not valid text (obs-text): the connection's client.
        let mut h = http::HeaderMap::new();
        h.append(
            "x-forwarded-for",
            http::HeaderValue::from_bytes(b"8.8.8.8\xff").expect("v"),
        );
        assert_eq!(effective_client(proxy, &h, |_| true), proxy);
    }
}
