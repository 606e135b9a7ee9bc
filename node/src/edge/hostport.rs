//! `host:port` splitting and joining for backend addresses, IPv6 brackets included.
//!
//! Pure code over `std`, so the fuzz crate can compile this file alone.

use std::net::IpAddr;

/// Splits `host:port`, `[v6]:port`, `v6`, `[v6]` or `host`.
pub fn split_host_port(addr: &str) -> (&str, Option<u16>) {
    if let Some(rest) = addr.strip_prefix('[') {
        if let Some((host, tail)) = rest.split_once(']') {
            return (host, tail.strip_prefix(':').and_then(|p| p.parse().ok()));
        }
    }
    if addr.parse::<IpAddr>().is_ok() {
        return (addr, None);
    }
    match addr.rsplit_once(':') {
        Some((h, p)) => match p.parse() {
            Ok(port) => (h, Some(port)),
            Err(_) => (addr, None),
        },
        None => (addr, None),
    }
}

pub fn join_host_port(host: &str, port: u16) -> String {
    if host.contains(':') {
        format!("[{host}]:{port}")
    } else {
        format!("{host}:{port}")
    }
}
