//! TLS termination: certificates from the replicated store, chosen by SNI.
//!
//! The `ServerConfig` is built once per node; its certificate resolver reads the current
//! [`CertTable`] from the edge snapshot on every handshake, so a certificate committed through
//! Raft is served by the next handshake without rebuilding the config or touching open
//! connections (and the session cache survives rotations).

use std::collections::{BTreeMap, HashMap};
use std::sync::Arc;

use arc_swap::ArcSwap;
use portcullis_raft::state::Certificate;
use rustls::crypto::CryptoProvider;
use rustls::pki_types::{CertificateDer, PrivateKeyDer};
use rustls::server::{ClientHello, ResolvesServerCert};
use rustls::sign::CertifiedKey;

use super::Snapshot;

#[derive(Debug, thiserror::Error)]
pub enum CertError {
    #[error("certificate chain for {name:?}: {reason}")]
    Chain { name: String, reason: String },
    #[error("private key for {name:?}: {reason}")]
    Key { name: String, reason: String },
    #[error("private key for {name:?} is stored with encryption {scheme:?}, which this node cannot decrypt yet")]
    Encrypted { name: String, scheme: String },
}

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

struct Parsed {
    chain_pem: String,
    key: Vec<u8>,
    ck: Arc<CertifiedKey>,
}

/// Certificates by name: exact names, and `*.suffix` wildcards keyed by `suffix`.
#[derive(Default)]
pub struct CertTable {
    exact: HashMap<String, (u64, Arc<CertifiedKey>)>,
    wildcard: HashMap<String, (u64, Arc<CertifiedKey>)>,
    /// Parsed entries by stored name, reused by the next build when unchanged (parsing keys on
    /// every state tick would cost a lot with many certificates).
    parsed: HashMap<String, Parsed>,
}

impl CertTable {
    /// Builds the table from the replicated certificates, reusing `previous` parses. Entries that
    /// fail to parse are skipped and returned so the caller can log them once.
    pub fn build(
        certs: &BTreeMap<String, Certificate>,
        previous: Option<&CertTable>,
    ) -> (CertTable, Vec<CertError>) {
        let mut t = CertTable::default();
        let mut errors = Vec::new();
        for c in certs.values() {
            let reused = previous
                .and_then(|p| p.parsed.get(&c.name))
                .filter(|p| p.chain_pem == c.chain_pem && p.key == c.key)
                .map(|p| p.ck.clone());
            let ck = match reused {
                Some(ck) => ck,
                None => {
                    // key encryption: issue 6 — keys are stored with key_encryption "none" (PEM)
                    // until the cluster data key exists; anything else is skipped, not guessed at.
                    if c.key_encryption != "none" {
                        errors.push(CertError::Encrypted {
                            name: c.name.clone(),
                            scheme: c.key_encryption.clone(),
                        });
                        continue;
                    }
                    match certified_key(&c.name, &c.chain_pem, &c.key) {
                        Ok(ck) => Arc::new(ck),
                        Err(e) => {
                            errors.push(e);
                            continue;
                        }
                    }
                }
            };
            t.parsed.insert(
                c.name.clone(),
                Parsed {
                    chain_pem: c.chain_pem.clone(),
                    key: c.key.clone(),
                    ck: ck.clone(),
                },
            );
            let mut names = c.names.clone();
            names.push(c.name.clone());
            for n in names {
                let n = n.to_ascii_lowercase();
                let (map, key) = match n.strip_prefix("*.") {
                    Some(suffix) => (&mut t.wildcard, suffix.to_string()),
                    None => (&mut t.exact, n),
                };
                // Two certificates for one name: serve the one that expires last.
                let newer = map.get(&key).is_none_or(|(na, _)| *na < c.not_after);
                if newer {
                    map.insert(key, (c.not_after, ck.clone()));
                }
            }
        }
        (t, errors)
    }

    /// Exact name first, then a wildcard one label up (`*.example.com` covers `a.example.com`,
    /// not `a.b.example.com`).
    pub fn lookup(&self, sni: &str) -> Option<Arc<CertifiedKey>> {
        if let Some((_, ck)) = self.exact.get(sni) {
            return Some(ck.clone());
        }
        let (_, parent) = sni.split_once('.')?;
        self.wildcard.get(parent).map(|(_, ck)| ck.clone())
    }

    pub fn len(&self) -> usize {
        self.parsed.len()
    }

    pub fn is_empty(&self) -> bool {
        self.parsed.is_empty()
    }
}

/// Chooses the certificate by SNI from the edge's current snapshot.
#[derive(Debug)]
struct SnapshotResolver {
    snapshot: Arc<ArcSwap<Snapshot>>,
}

impl ResolvesServerCert for SnapshotResolver {
    fn resolve(&self, hello: ClientHello<'_>) -> Option<Arc<CertifiedKey>> {
        let name = hello.server_name()?.to_ascii_lowercase();
        self.snapshot.load().certs.lookup(&name)
    }
}

/// TLS 1.2 and 1.3 only (rustls has nothing older), ALPN h2 then http/1.1, stateful session
/// resumption (rustls' default cache) plus stateless tickets.
pub fn server_config(
    snapshot: Arc<ArcSwap<Snapshot>>,
) -> Result<Arc<rustls::ServerConfig>, rustls::Error> {
    let mut cfg = rustls::ServerConfig::builder_with_provider(provider())
        .with_protocol_versions(&[&rustls::version::TLS13, &rustls::version::TLS12])?
        .with_no_client_auth()
        .with_cert_resolver(Arc::new(SnapshotResolver { snapshot }));
    cfg.alpn_protocols = vec![b"h2".to_vec(), b"http/1.1".to_vec()];
    cfg.ticketer = rustls::crypto::ring::Ticketer::new()?;
    Ok(Arc::new(cfg))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn issue(names: &[&str]) -> (String, String) {
        let key = rcgen::KeyPair::generate().expect("key");
        let params =
            rcgen::CertificateParams::new(names.iter().map(|s| s.to_string()).collect::<Vec<_>>())
                .expect("params");
        let cert = params.self_signed(&key).expect("sign");
        (cert.pem(), key.serialize_pem())
    }

    fn entry(name: &str, names: &[&str], not_after: u64) -> Certificate {
        let (chain_pem, key) = issue(names);
        Certificate {
            name: name.into(),
            names: names.iter().map(|s| s.to_string()).collect(),
            chain_pem,
            key: key.into_bytes(),
            key_encryption: "none".into(),
            not_after,
            issuer: "test".into(),
        }
    }

    #[test]
    fn exact_then_one_level_wildcard() {
        let mut certs = BTreeMap::new();
        certs.insert(
            "*.apps.test".into(),
            entry("*.apps.test", &["*.apps.test"], 10),
        );
        certs.insert(
            "web.apps.test".into(),
            entry("web.apps.test", &["web.apps.test"], 10),
        );
        let (t, errors) = CertTable::build(&certs, None);
        assert!(errors.is_empty(), "{errors:?}");
        let exact = t.lookup("web.apps.test").expect("exact");
        let wild = t.lookup("api.apps.test").expect("wildcard");
        assert!(!Arc::ptr_eq(&exact, &wild));
        assert!(t.lookup("a.b.apps.test").is_none());
        assert!(t.lookup("apps.test").is_none());
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

    #[test]
    fn rebuild_reuses_unchanged_and_skips_bad() {
        let mut certs = BTreeMap::new();
        certs.insert("a.test".into(), entry("a.test", &["a.test"], 10));
        let mut bad = entry("b.test", &["b.test"], 10);
        bad.key = entry("x.test", &["x.test"], 1).key; // someone else's key
        certs.insert("b.test".into(), bad);
        let mut enc = entry("c.test", &["c.test"], 10);
        enc.key_encryption = "aes-256-gcm".into();
        certs.insert("c.test".into(), enc);
        let (t1, errors) = CertTable::build(&certs, None);
        assert_eq!(errors.len(), 2, "{errors:?}");
        let (t2, _) = CertTable::build(&certs, Some(&t1));
        let (a1, a2) = (
            t1.lookup("a.test").expect("a1"),
            t2.lookup("a.test").expect("a2"),
        );
        assert!(
            Arc::ptr_eq(&a1, &a2),
            "unchanged certificate is not re-parsed"
        );
        assert!(t2.lookup("b.test").is_none());
    }
}
