//! TLS helpers for the whole node, a leaf (it imports nothing of the crate): the crypto
//! provider, a PEM chain and key parsed into a rustls `CertifiedKey`, and what a certificate
//! covers. The data plane's certificate table and rustls config are in `edge/tls.rs`; the
//! launcher, the demo app, the admin API and ACME use these directly.

use std::sync::Arc;

use rustls::crypto::CryptoProvider;
use rustls::pki_types::{CertificateDer, PrivateKeyDer};
use rustls::sign::CertifiedKey;

/// Why a certificate or its key does not load. `Sealed`: a stored key that the cluster data key
/// does not open (the data plane's certificate table).
#[derive(Debug, thiserror::Error)]
pub enum CertError {
    #[error("certificate chain for {name:?}: {reason}")]
    Chain { name: String, reason: String },
    #[error("private key for {name:?}: {reason}")]
    Key { name: String, reason: String },
    #[error("private key for {name:?} does not open: {reason}")]
    Sealed { name: String, reason: String },
}

/// The crypto provider of every rustls config the node builds (ring).
pub fn provider() -> Arc<CryptoProvider> {
    Arc::new(rustls::crypto::ring::default_provider())
}

/// Parses a PEM chain and PEM private key into a rustls `CertifiedKey`, checking that the key
/// belongs to the leaf certificate.
pub fn certified_key(
    name: &str,
    chain_pem: &str,
    key_pem: &[u8],
) -> Result<CertifiedKey, CertError> {
    let chain_err = |reason: String| CertError::Chain {
        name: name.to_string(),
        reason,
    };
    let key_err = |reason: String| CertError::Key {
        name: name.to_string(),
        reason,
    };
    let chain: Vec<CertificateDer<'static>> = rustls_pemfile::certs(&mut chain_pem.as_bytes())
        .collect::<Result<_, _>>()
        .map_err(|e| chain_err(e.to_string()))?;
    if chain.is_empty() {
        return Err(chain_err("no CERTIFICATE block in the PEM".into()));
    }
    let key: PrivateKeyDer<'static> = rustls_pemfile::private_key(&mut &key_pem[..])
        .map_err(|e| key_err(e.to_string()))?
        .ok_or_else(|| key_err("no PRIVATE KEY block in the PEM".into()))?;
    let signer = provider()
        .key_provider
        .load_private_key(key)
        .map_err(|e| key_err(e.to_string()))?;
    let ck = CertifiedKey::new(chain, signer);
    ck.keys_match()
        .map_err(|e| key_err(format!("does not match the leaf certificate: {e}")))?;
    Ok(ck)
}

/// What `cert import` records about a certificate besides the PEM.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct CertMeta {
    /// DNS names from the leaf's subjectAltName, lowercased.
    pub names: Vec<String>,
    /// Unix seconds.
    pub not_after: u64,
    pub issuer: String,
}

/// Validates a chain and key for import: they parse, the key matches the leaf, and the leaf
/// covers `name` (exactly, or through a one-level wildcard).
pub fn inspect(name: &str, chain_pem: &str, key_pem: &[u8]) -> Result<CertMeta, CertError> {
    let ck = certified_key(name, chain_pem, key_pem)?;
    let chain_err = |reason: String| CertError::Chain {
        name: name.to_string(),
        reason,
    };
    let leaf = ck.end_entity_cert().map_err(|e| chain_err(e.to_string()))?;
    let (_, x509) =
        x509_parser::parse_x509_certificate(leaf.as_ref()).map_err(|e| chain_err(e.to_string()))?;
    let mut names = Vec::new();
    if let Ok(Some(san)) = x509.subject_alternative_name() {
        for gn in &san.value.general_names {
            if let x509_parser::extensions::GeneralName::DNSName(d) = gn {
                names.push(d.to_ascii_lowercase());
            }
        }
    }
    let wanted = name.to_ascii_lowercase();
    let covered = names.iter().any(|n| {
        *n == wanted
            || n.strip_prefix("*.")
                .is_some_and(|suffix| wanted.split_once('.').is_some_and(|(_, p)| p == suffix))
    });
    if !covered {
        return Err(chain_err(format!(
            "the leaf certificate names {names:?}, which do not cover {wanted:?}"
        )));
    }
    let not_after = u64::try_from(x509.validity().not_after.timestamp()).unwrap_or(0);
    Ok(CertMeta {
        names,
        not_after,
        issuer: x509.issuer().to_string(),
    })
}

#[cfg(test)]
pub(crate) mod tests {
    use super::*;

    /// A self-signed certificate for `names`: (chain PEM, key PEM).
    pub(crate) fn issue(names: &[&str]) -> (String, String) {
        let key = rcgen::KeyPair::generate().expect("key");
        let params =
            rcgen::CertificateParams::new(names.iter().map(|s| s.to_string()).collect::<Vec<_>>())
                .expect("params");
        let cert = params.self_signed(&key).expect("sign");
        (cert.pem(), key.serialize_pem())
    }

    #[test]
    fn inspect_checks_coverage() {
        let (chain, key) = issue(&["*.apps.test", "apps.test"]);
        let meta = inspect("*.apps.test", &chain, key.as_bytes()).expect("wildcard itself");
        assert_eq!(
            meta.names,
            vec!["*.apps.test".to_string(), "apps.test".to_string()]
        );
        assert!(meta.not_after > 0);
        inspect("web.apps.test", &chain, key.as_bytes()).expect("covered by the wildcard");
        assert!(inspect("other.test", &chain, key.as_bytes()).is_err());
        let (_, other_key) = issue(&["x.test"]);
        assert!(matches!(
            inspect("apps.test", &chain, other_key.as_bytes()),
            Err(CertError::Key { .. })
        ));
    }
}
