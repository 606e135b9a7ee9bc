//! `host:port` splitting and joining for backend addresses, IPv6 brackets included, and the
//! connect [`Target`] parsed from them.
//!
//! Pure code over `std`, so the fuzz crate (`node/fuzz`, target `hostport`) compiles this file
//! alone.

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

/// Where to connect: a backend address from [`super::route::Backend::address`].
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct Target {
    pub host: String,
    pub port: u16,
}

impl std::fmt::Display for Target {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        if self.host.contains(':') {
            write!(f, "[{}]:{}", self.host, self.port)
        } else {
            write!(f, "{}:{}", self.host, self.port)
        }
    }
}

impl Target {
    /// Parses `host:port` or `[v6]:port`.
    pub fn parse(addr: &str) -> Option<Target> {
        match split_host_port(addr) {
            (host, Some(port)) if !host.is_empty() => Some(Target {
                host: host.to_string(),
                port,
            }),
            _ => None,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn targets_parse_and_print_back() {
        for (addr, host, port) in [
            ("10.0.0.5:8080", "10.0.0.5", 8080),
            ("[fd00::5]:443", "fd00::5", 443),
            ("backend.internal:80", "backend.internal", 80),
        ] {
            let t = Target::parse(addr).expect(addr);
            assert_eq!((t.host.as_str(), t.port), (host, port));
            assert_eq!(t.to_string(), addr);
            assert_eq!(Target::parse(&join_host_port(host, port)), Some(t));
        }
        for addr in [
            "",
            ":80",
            "[]:80",
            "fd00::5",
            "[fd00::5]",
            "host",
            "host:",
            "host:65536",
        ] {
            assert_eq!(Target::parse(addr), None, "{addr}");
        }
    }
}
