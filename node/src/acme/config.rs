//! `[acme]`: where to order certificates and for which names. Disabled by default.

use std::net::SocketAddr;
use std::path::PathBuf;

use serde::{Deserialize, Serialize};

use crate::config::error::{bad, ConfigError};

/// Let's Encrypt's production directory.
pub const LETS_ENCRYPT: &str = "https://acme-v02.api.letsencrypt.org/directory";

#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct AcmeConfig {
    /// Order certificates at all. Default false.
    pub enabled: bool,
    /// The CA's directory URL. Default Let's Encrypt production; use
    /// `https://acme-staging-v02.api.letsencrypt.org/directory` while testing.
    pub directory: String,
    /// Contact URLs for the account, e.g. `mailto:ops@example.com`. Default none.
    pub contact: Vec<String>,
    /// A PEM root to trust, instead of the system roots, for the CA's own HTTPS endpoint (a
    /// private or test CA such as Pebble). Default: the system roots.
    pub extra_root: Option<PathBuf>,
    /// Names to keep certificates for, besides each `edge.base_domains` entry and every verified
    /// custom domain. Wildcards (`*.example.com`) are validated with DNS-01 and need `[acme.dns01]`.
    pub domains: Vec<String>,
    /// How the CA validates names that are not wildcards: `http-01` (port 80), `tls-alpn-01`
    /// (port 443, RFC 8737) or `dns-01` (TXT records through `[acme.dns01]`). Default `http-01`.
    pub challenge: ChallengeChoice,
    /// DNS-01 through RFC 2136 dynamic updates. Required for wildcards and for
    /// `challenge = "dns-01"`. Default: not configured.
    pub dns01: Option<Dns01Config>,
    /// Order certificates for each `edge.base_domains` entry itself. Default true.
    pub include_base_domains: bool,
    /// How long an orderer lease lasts, seconds; the holder renews it every third of this. A
    /// dead orderer is replaced after at most this long. Default 30.
    pub lease_secs: u64,
    /// Longest wait between retries of a failing order, seconds (backoff starts at 5 s and
    /// doubles). Keep it long against a public CA: failed validations count against rate
    /// limits. Default 3600.
    pub retry_max_secs: u64,
    /// How often the orderer looks for work when nothing changes, seconds. Default 60.
    pub check_interval_secs: u64,
    /// Time for each request to the CA, and for the CA to validate an order, seconds. Default 60.
    pub request_timeout_secs: u64,
}

impl Default for AcmeConfig {
    fn default() -> Self {
        AcmeConfig {
            enabled: false,
            directory: LETS_ENCRYPT.into(),
            contact: Vec::new(),
            extra_root: None,
            domains: Vec::new(),
            challenge: ChallengeChoice::Http01,
            dns01: None,
            include_base_domains: true,
            lease_secs: 30,
            retry_max_secs: 3600,
            check_interval_secs: 60,
            request_timeout_secs: 60,
        }
    }
}

/// The validation method for names that are not wildcards.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub enum ChallengeChoice {
    #[serde(rename = "http-01")]
    Http01,
    #[serde(rename = "tls-alpn-01")]
    TlsAlpn01,
    #[serde(rename = "dns-01")]
    Dns01,
}

/// `[acme.dns01]`: where TXT records for DNS-01 are added (RFC 2136 UPDATE signed with TSIG).
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct Dns01Config {
    /// The zone's primary authoritative server that accepts signed updates, e.g.
    /// `"192.0.2.53:53"`. Required.
    pub server: Option<SocketAddr>,
    /// The zone to update, e.g. `example.com`: every DNS-01 name must be inside it. Required.
    pub zone: String,
    /// The TSIG key's name, as the server knows it. Required.
    pub tsig_key_name: String,
    /// The TSIG algorithm. Only `hmac-sha256` (the default).
    pub tsig_algorithm: String,
    /// File holding the TSIG secret (never the config itself): the base64 secret alone, or a
    /// BIND `key` clause (`secret "...";`), or Knot's `keymgr -t` output (`secret: ...`).
    /// Required.
    pub tsig_secret_file: Option<PathBuf>,
    /// TTL of the TXT records, seconds. Default 60.
    pub ttl: u32,
    /// Longest wait for an added record to be answered by `server`, seconds. Default 60.
    pub propagation_timeout_secs: u64,
}

impl Default for Dns01Config {
    fn default() -> Self {
        Dns01Config {
            server: None,
            zone: String::new(),
            tsig_key_name: String::new(),
            tsig_algorithm: "hmac-sha256".into(),
            tsig_secret_file: None,
            ttl: 60,
            propagation_timeout_secs: 60,
        }
    }
}

fn is_dns_name(d: &str) -> bool {
    d.contains('.')
        && d.split('.').all(|l| {
            !l.is_empty()
                && l.len() <= 63
                && l.bytes()
                    .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'-')
        })
}

/// Whether `name` (a plain name or `*.` wildcard) is `zone` or below it.
pub fn in_zone(name: &str, zone: &str) -> bool {
    let name = name.strip_prefix("*.").unwrap_or(name);
    name == zone || name.strip_suffix(zone).is_some_and(|p| p.ends_with('.'))
}

impl Dns01Config {
    fn validate(&self) -> Result<(), ConfigError> {
        if self.server.is_none() {
            return Err(bad("acme.dns01.server", "is required (host:port)"));
        }
        if !is_dns_name(&self.zone) {
            return Err(bad(
                "acme.dns01.zone",
                format!("{:?} is not a lowercase DNS name", self.zone),
            ));
        }
        if self.tsig_key_name.is_empty()
            || self.tsig_key_name.len() > 253
            || !self
                .tsig_key_name
                .split('.')
                .all(|l| !l.is_empty() && l.len() <= 63 && l.bytes().all(|b| b.is_ascii_graphic()))
        {
            return Err(bad(
                "acme.dns01.tsig_key_name",
                format!("{:?} is not a DNS name", self.tsig_key_name),
            ));
        }
        if self.tsig_algorithm != "hmac-sha256" {
            return Err(bad(
                "acme.dns01.tsig_algorithm",
                format!("{:?} is not supported (hmac-sha256)", self.tsig_algorithm),
            ));
        }
        if self.tsig_secret_file.is_none() {
            return Err(bad(
                "acme.dns01.tsig_secret_file",
                "is required (the secret never goes in the config)",
            ));
        }
        if !(1..=600).contains(&self.propagation_timeout_secs) {
            return Err(bad(
                "acme.dns01.propagation_timeout_secs",
                format!("{} must be within 1..=600", self.propagation_timeout_secs),
            ));
        }
        Ok(())
    }
}

impl AcmeConfig {
    pub fn validate(&self) -> Result<(), ConfigError> {
        if !self.enabled {
            return Ok(());
        }
        if !(self.directory.starts_with("https://") || self.directory.starts_with("http://")) {
            return Err(bad(
                "acme.directory",
                format!("{:?} is not an http(s) URL", self.directory),
            ));
        }
        for c in &self.contact {
            if !c.contains(':') {
                return Err(bad(
                    "acme.contact",
                    format!("{c:?} must be a URL such as mailto:ops@example.com"),
                ));
            }
        }
        for d in &self.domains {
            let ok = d.contains('.')
                && d.split('.').enumerate().all(|(i, l)| {
                    (i == 0 && l == "*")
                        || (!l.is_empty()
                            && l.len() <= 63
                            && l.bytes()
                                .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'-'))
                });
            if !ok {
                return Err(bad(
                    "acme.domains",
                    format!("{d:?} is not a lowercase DNS name"),
                ));
            }
        }
        match &self.dns01 {
            Some(d) => {
                d.validate()?;
                // Names outside the zone would be updated in a zone the server does not hold;
                // base domains and custom domains are checked when ordered (they can change).
                let dns_names = self
                    .domains
                    .iter()
                    .filter(|n| n.starts_with("*.") || self.challenge == ChallengeChoice::Dns01);
                for n in dns_names {
                    if !in_zone(n, &d.zone) {
                        return Err(bad(
                            "acme.domains",
                            format!("{n:?} is validated with DNS-01 but is outside acme.dns01.zone {:?}", d.zone),
                        ));
                    }
                }
            }
            None if self.challenge == ChallengeChoice::Dns01 => {
                return Err(bad(
                    "acme.challenge",
                    "\"dns-01\" needs an [acme.dns01] section",
                ));
            }
            // Wildcards without DNS-01 stay accepted as before (the orderer skips them with a
            // warning), so configs that list one keep loading.
            None => {}
        }
        if !(3..=600).contains(&self.lease_secs) {
            return Err(bad(
                "acme.lease_secs",
                format!("{} must be within 3..=600", self.lease_secs),
            ));
        }
        for (field, v) in [
            ("acme.retry_max_secs", self.retry_max_secs),
            ("acme.check_interval_secs", self.check_interval_secs),
            ("acme.request_timeout_secs", self.request_timeout_secs),
        ] {
            if v == 0 {
                return Err(bad(field, "must be at least 1"));
            }
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn disabled_by_default_and_validates_when_enabled() {
        let c = AcmeConfig::default();
        assert!(!c.enabled);
        assert!(c.validate().is_ok());
        let bad_dir = AcmeConfig {
            enabled: true,
            directory: "ftp://x".into(),
            ..AcmeConfig::default()
        };
        assert!(bad_dir.validate().is_err());
        let bad_domain = AcmeConfig {
            enabled: true,
            domains: vec!["Example.COM".into()],
            ..AcmeConfig::default()
        };
        assert!(bad_domain.validate().is_err());
        let ok = AcmeConfig {
            enabled: true,
            domains: vec!["*.example.com".into(), "www.example.com".into()],
            ..AcmeConfig::default()
        };
        assert!(ok.validate().is_ok());
    }

    fn dns01(dir: &str) -> Dns01Config {
        Dns01Config {
            server: Some("127.0.0.1:53".parse().expect("addr")),
            zone: "example.com".into(),
            tsig_key_name: "acme-key".into(),
            tsig_secret_file: Some(PathBuf::from(dir)),
            ..Dns01Config::default()
        }
    }

    #[test]
    fn challenge_choice_and_dns01_section() {
        let parsed: AcmeConfig = toml::from_str(
            r#"
            enabled = true
            challenge = "tls-alpn-01"
            "#,
        )
        .expect("parses");
        assert_eq!(parsed.challenge, ChallengeChoice::TlsAlpn01);
        assert!(parsed.validate().is_ok());
        assert!(toml::from_str::<AcmeConfig>(r#"challenge = "tls-sni-01""#).is_err());
        assert_eq!(AcmeConfig::default().challenge, ChallengeChoice::Http01);

        let no_section = AcmeConfig {
            enabled: true,
            challenge: ChallengeChoice::Dns01,
            ..AcmeConfig::default()
        };
        assert!(no_section.validate().is_err());
        let ok = AcmeConfig {
            enabled: true,
            challenge: ChallengeChoice::Dns01,
            domains: vec!["*.example.com".into(), "a.b.example.com".into()],
            dns01: Some(dns01("/etc/key")),
            ..AcmeConfig::default()
        };
        assert!(ok.validate().is_ok(), "{:?}", ok.validate());
        let outside = AcmeConfig {
            domains: vec!["*.example.org".into()],
            ..ok.clone()
        };
        assert!(outside.validate().is_err());
        for broken in [
            Dns01Config {
                server: None,
                ..dns01("/k")
            },
            Dns01Config {
                tsig_secret_file: None,
                ..dns01("/k")
            },
            Dns01Config {
                tsig_algorithm: "hmac-md5".into(),
                ..dns01("/k")
            },
            Dns01Config {
                zone: "Example.com".into(),
                ..dns01("/k")
            },
        ] {
            let c = AcmeConfig {
                dns01: Some(broken),
                ..ok.clone()
            };
            assert!(c.validate().is_err(), "{c:?}");
        }
        assert!(in_zone("*.example.com", "example.com"));
        assert!(in_zone("example.com", "example.com"));
        assert!(in_zone("a.example.com", "example.com"));
        assert!(!in_zone("badexample.com", "example.com"));
    }
}
