//! `[acme]`: where to order certificates and for which names. Disabled by default.

use std::path::PathBuf;

use serde::{Deserialize, Serialize};

use crate::config::ConfigError;

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
    /// custom domain. Wildcards (`*.example.com`) need DNS-01, which is not implemented yet; they
    /// are skipped with a warning.
    pub domains: Vec<String>,
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
            include_base_domains: true,
            lease_secs: 30,
            retry_max_secs: 3600,
            check_interval_secs: 60,
            request_timeout_secs: 60,
        }
    }
}

fn bad(field: &'static str, reason: impl Into<String>) -> ConfigError {
    ConfigError::Field {
        field,
        reason: reason.into(),
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
}
