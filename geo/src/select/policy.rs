//! The per-app load-balancing policy string: `round-robin`, `least-conn`, `hash:ip`,
//! `hash:header=NAME`, `hash:cookie=NAME`, `geo`, `geo+METHOD`.

use std::fmt;
use std::str::FromStr;

use serde::{Deserialize, Serialize};

/// How an app's requests are spread over its backends.
#[derive(Debug, Clone, PartialEq, Eq, Hash, Default, Serialize, Deserialize)]
#[serde(try_from = "String", into = "String")]
pub enum LbPolicy {
    /// `round-robin`: weighted round robin.
    #[default]
    RoundRobin,
    /// `least-conn`: fewest in-flight connections per unit of weight.
    LeastConn,
    /// `hash:…`: consistent hash (Maglev with bounded load) of a request key.
    Hash(HashKey),
    /// `geo` / `geo+METHOD`: nearest healthy region first, then METHOD inside the region
    /// (round robin when no method is given).
    Geo(RegionMethod),
}

/// What a `hash:` policy hashes.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub enum HashKey {
    /// `hash:ip` (or `hash`): the client address.
    ClientIp,
    /// `hash:header=NAME`: a request header's value; the name is stored in lower case.
    /// Requests without the header fall back to the client address.
    Header(String),
    /// `hash:cookie=NAME`: a cookie's value (case-sensitive name). Requests without the
    /// cookie fall back to the client address.
    Cookie(String),
}

/// The method used inside a region by `geo+METHOD`.
#[derive(Debug, Clone, PartialEq, Eq, Hash, Default)]
pub enum RegionMethod {
    /// `geo` or `geo+round-robin`.
    #[default]
    RoundRobin,
    /// `geo+least-conn`.
    LeastConn,
    /// `geo+hash:…`.
    Hash(HashKey),
}

/// A policy string that does not parse. The message quotes the input.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error(
    "invalid load-balancing policy {input:?}: {reason} (expected round-robin, least-conn, \
     hash:ip, hash:header=NAME, hash:cookie=NAME, geo or geo+METHOD)"
)]
pub struct PolicyParseError {
    /// The rejected string.
    pub input: String,
    /// What is wrong with it.
    pub reason: String,
}

/// Longest header or cookie name accepted.
const MAX_NAME_LEN: usize = 128;

impl LbPolicy {
    /// The key a `hash:` policy (plain or inside `geo+`) needs from the request, so the
    /// caller knows which header or cookie to pass as [`crate::select::SelectInput::hash_key`].
    pub fn hash_key(&self) -> Option<&HashKey> {
        match self {
            LbPolicy::Hash(key) | LbPolicy::Geo(RegionMethod::Hash(key)) => Some(key),
            _ => None,
        }
    }
}

impl FromStr for LbPolicy {
    type Err = PolicyParseError;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        let fail = |reason: String| PolicyParseError {
            input: s.to_owned(),
            reason,
        };
        if let Some(inner) = s.strip_prefix("geo+") {
            return parse_method(inner).map(LbPolicy::Geo).map_err(fail);
        }
        if s == "geo" {
            return Ok(LbPolicy::Geo(RegionMethod::RoundRobin));
        }
        parse_method(s).map(LbPolicy::from).map_err(fail)
    }
}

/// Parses the non-geographic methods.
fn parse_method(s: &str) -> Result<RegionMethod, String> {
    match s {
        "round-robin" => return Ok(RegionMethod::RoundRobin),
        "least-conn" => return Ok(RegionMethod::LeastConn),
        "hash" | "hash:ip" => return Ok(RegionMethod::Hash(HashKey::ClientIp)),
        "" => return Err("empty method".into()),
        _ => {}
    }
    if s == "geo" || s.starts_with("geo+") {
        return Err("geo cannot be nested".into());
    }
    let Some(key) = s.strip_prefix("hash:") else {
        return Err(format!("unknown method {s:?}"));
    };
    if let Some(name) = key.strip_prefix("header=") {
        check_token(name, "header")?;
        Ok(RegionMethod::Hash(HashKey::Header(
            name.to_ascii_lowercase(),
        )))
    } else if let Some(name) = key.strip_prefix("cookie=") {
        check_token(name, "cookie")?;
        Ok(RegionMethod::Hash(HashKey::Cookie(name.to_owned())))
    } else {
        Err(format!(
            "unknown hash key {key:?} (expected ip, header=NAME or cookie=NAME)"
        ))
    }
}

/// Header and cookie names are RFC 9110 tokens.
fn check_token(name: &str, what: &str) -> Result<(), String> {
    if name.is_empty() {
        return Err(format!("empty {what} name"));
    }
    if name.len() > MAX_NAME_LEN {
        return Err(format!(
            "{what} name is {} bytes, longer than {MAX_NAME_LEN}",
            name.len()
        ));
    }
    match name.chars().find(|&c| !is_tchar(c)) {
        Some(c) => Err(format!("{what} name {name:?} contains {c:?}")),
        None => Ok(()),
    }
}

fn is_tchar(c: char) -> bool {
    c.is_ascii_alphanumeric() || "!#$%&'*+-.^_`|~".contains(c)
}

impl From<RegionMethod> for LbPolicy {
    fn from(m: RegionMethod) -> Self {
        match m {
            RegionMethod::RoundRobin => LbPolicy::RoundRobin,
            RegionMethod::LeastConn => LbPolicy::LeastConn,
            RegionMethod::Hash(key) => LbPolicy::Hash(key),
        }
    }
}

impl fmt::Display for HashKey {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            HashKey::ClientIp => f.write_str("hash:ip"),
            HashKey::Header(name) => write!(f, "hash:header={name}"),
            HashKey::Cookie(name) => write!(f, "hash:cookie={name}"),
        }
    }
}

impl fmt::Display for RegionMethod {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            RegionMethod::RoundRobin => f.write_str("round-robin"),
            RegionMethod::LeastConn => f.write_str("least-conn"),
            RegionMethod::Hash(key) => key.fmt(f),
        }
    }
}

impl fmt::Display for LbPolicy {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            LbPolicy::RoundRobin => f.write_str("round-robin"),
            LbPolicy::LeastConn => f.write_str("least-conn"),
            LbPolicy::Hash(key) => key.fmt(f),
            // `geo` alone is the canonical spelling of `geo+round-robin`.
            LbPolicy::Geo(RegionMethod::RoundRobin) => f.write_str("geo"),
            LbPolicy::Geo(method) => write!(f, "geo+{method}"),
        }
    }
}

impl TryFrom<String> for LbPolicy {
    type Error = PolicyParseError;
    fn try_from(s: String) -> Result<Self, Self::Error> {
        s.parse()
    }
}

impl From<LbPolicy> for String {
    fn from(p: LbPolicy) -> Self {
        p.to_string()
    }
}

#[cfg(test)]
mod tests;
