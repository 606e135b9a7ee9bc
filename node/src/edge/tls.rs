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
use rustls::server::{ClientHello, ResolvesServerCert};
use rustls::sign::CertifiedKey;

use super::Snapshot;
use crate::secrets::{cert_aad, Keyring};
use crate::tls::{certified_key, provider, CertError};

/// Opens a stored certificate's key and parses both.
fn load(c: &Certificate, keyring: &Keyring) -> Result<CertifiedKey, CertError> {
    let key_pem = keyring
        .open(&c.key_encryption, &cert_aad(&c.name), &c.key)
        .map_err(|e| CertError::Sealed {
            name: c.name.clone(),
            reason: e.to_string(),
        })?;
    certified_key(&c.name, &c.chain_pem, &key_pem)
}

struct Parsed {
    chain_pem: String,
    key: Vec<u8>,
    names: Vec<String>,
    not_after: u64,
    ck: Arc<CertifiedKey>,
}

/// Certificates by name: exact names, and `*.suffix` wildcards keyed by `suffix`.
///
/// Cloning is cheap (`Arc`s): a state change that touches no certificate keeps the table.
#[derive(Default, Clone)]
pub struct CertTable {
    exact: Arc<HashMap<String, (u64, Arc<CertifiedKey>)>>,
    wildcard: Arc<HashMap<String, (u64, Arc<CertifiedKey>)>>,
    /// Parsed entries by stored name, reused by the next build when unchanged (parsing keys on
    /// every state tick would cost a lot with many certificates). In name order: where two
    /// certificates claim a name with the same expiry, the first one in name order serves.
    parsed: Arc<BTreeMap<String, Arc<Parsed>>>,
    /// Stored (chain, key) that failed to load, by name: not retried or reported again until
    /// the stored value changes.
    rejected: Arc<HashMap<String, (String, Vec<u8>)>>,
}

impl CertTable {
    /// Builds the table from the replicated certificates, reusing `previous` parses and opening
    /// sealed keys with `keyring`. An entry that fails to load is returned as an error (once per
    /// stored value); if an earlier version of it loaded, that one keeps serving, so a corrupt
    /// or unopenable update never takes a working certificate away.
    pub fn build(
        certs: &BTreeMap<String, Certificate>,
        previous: Option<&CertTable>,
        keyring: &Keyring,
    ) -> (CertTable, Vec<CertError>) {
        let mut parsed = BTreeMap::new();
        let mut rejected = HashMap::new();
        let mut errors = Vec::new();
        for c in certs.values() {
            if let Some(p) = Self::entry(c, previous, keyring, &mut rejected, &mut errors) {
                parsed.insert(c.name.clone(), p);
            }
        }
        (Self::index(parsed, rejected), errors)
    }

    /// The table after the certificates named in `touched` changed to the given values
    /// (`None`: removed); the others keep their entries. The same result as [`CertTable::build`]
    /// over the whole new state with `self` as `previous`, at the cost of the touched ones.
    pub(crate) fn update(
        &self,
        touched: &[(String, Option<Certificate>)],
        keyring: &Keyring,
    ) -> (CertTable, Vec<CertError>) {
        if touched.is_empty() {
            return (self.clone(), Vec::new());
        }
        let mut parsed = (*self.parsed).clone();
        let mut rejected = (*self.rejected).clone();
        let mut errors = Vec::new();
        for (name, c) in touched {
            parsed.remove(name);
            rejected.remove(name);
            let Some(c) = c else { continue };
            if let Some(p) = Self::entry(c, Some(self), keyring, &mut rejected, &mut errors) {
                parsed.insert(c.name.clone(), p);
            }
        }
        (Self::index(parsed, rejected), errors)
    }

    /// What serves for stored certificate `c`: its previous parse when unchanged, a fresh
    /// parse, or (when that fails) the previous version, if any.
    fn entry(
        c: &Certificate,
        previous: Option<&CertTable>,
        keyring: &Keyring,
        rejected: &mut HashMap<String, (String, Vec<u8>)>,
        errors: &mut Vec<CertError>,
    ) -> Option<Arc<Parsed>> {
        let prev_parsed = previous.and_then(|p| p.parsed.get(&c.name));
        let same = |chain: &str, key: &[u8]| chain == c.chain_pem && key == c.key.as_slice();
        if let Some(p) = prev_parsed.filter(|p| same(&p.chain_pem, &p.key)) {
            // Nothing changed at all: share the entry instead of copying its PEM.
            let same_names = p
                .names
                .split_last()
                .is_some_and(|(last, rest)| *last == c.name && rest == c.names.as_slice());
            if p.not_after == c.not_after && same_names {
                return Some(p.clone());
            }
        }
        let loaded = match prev_parsed.filter(|p| same(&p.chain_pem, &p.key)) {
            Some(p) => Some(p.ck.clone()),
            None => {
                let known_bad = previous
                    .and_then(|p| p.rejected.get(&c.name))
                    .is_some_and(|(chain, key)| same(chain, key));
                if known_bad {
                    None
                } else {
                    match load(c, keyring) {
                        Ok(ck) => Some(Arc::new(ck)),
                        Err(e) => {
                            errors.push(e);
                            None
                        }
                    }
                }
            }
        };
        match loaded {
            Some(ck) => {
                let mut names = c.names.clone();
                names.push(c.name.clone());
                Some(Arc::new(Parsed {
                    chain_pem: c.chain_pem.clone(),
                    key: c.key.clone(),
                    names,
                    not_after: c.not_after,
                    ck,
                }))
            }
            None => {
                rejected.insert(c.name.clone(), (c.chain_pem.clone(), c.key.clone()));
                prev_parsed.cloned()
            }
        }
    }

    /// The name maps over `parsed`, in name order.
    fn index(
        parsed: BTreeMap<String, Arc<Parsed>>,
        rejected: HashMap<String, (String, Vec<u8>)>,
    ) -> CertTable {
        let mut exact = HashMap::new();
        let mut wildcard = HashMap::new();
        for entry in parsed.values() {
            for n in &entry.names {
                let n = n.to_ascii_lowercase();
                let (map, key) = match n.strip_prefix("*.") {
                    Some(suffix) => (&mut wildcard, suffix.to_string()),
                    None => (&mut exact, n),
                };
                // Two certificates for one name: serve the one that expires last.
                let newer = map
                    .get(&key)
                    .is_none_or(|(na, _): &(u64, _)| *na < entry.not_after);
                if newer {
                    map.insert(key, (entry.not_after, entry.ck.clone()));
                }
            }
        }
        CertTable {
            exact: Arc::new(exact),
            wildcard: Arc::new(wildcard),
            parsed: Arc::new(parsed),
            rejected: Arc::new(rejected),
        }
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

    /// Every name with its expiry and leaf certificate, and the rejected names, in a canonical
    /// order, for comparing two tables.
    #[cfg(test)]
    pub(crate) fn dump(&self) -> String {
        let names = |m: &HashMap<String, (u64, Arc<CertifiedKey>)>| {
            let v: BTreeMap<String, (u64, Vec<u8>)> = m
                .iter()
                .map(|(k, (na, ck))| (k.clone(), (*na, ck.cert[0].to_vec())))
                .collect();
            v
        };
        let parsed: Vec<_> = self
            .parsed
            .iter()
            .map(|(n, p)| (n.clone(), p.names.clone(), p.not_after, p.chain_pem.len()))
            .collect();
        let rejected: BTreeMap<_, _> = self.rejected.iter().collect();
        format!(
            "{:?}",
            (names(&self.exact), names(&self.wildcard), parsed, rejected)
        )
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
    use crate::tls::tests::issue;

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
        let (t, errors) = CertTable::build(&certs, None, &Keyring::default());
        assert!(errors.is_empty(), "{errors:?}");
        let exact = t.lookup("web.apps.test").expect("exact");
        let wild = t.lookup("api.apps.test").expect("wildcard");
        assert!(!Arc::ptr_eq(&exact, &wild));
        assert!(t.lookup("a.b.apps.test").is_none());
        assert!(t.lookup("apps.test").is_none());
    }

    #[test]
    fn rebuild_reuses_unchanged_and_skips_bad() {
        let none = Keyring::default();
        let mut certs = BTreeMap::new();
        certs.insert("a.test".into(), entry("a.test", &["a.test"], 10));
        let mut bad = entry("b.test", &["b.test"], 10);
        bad.key = entry("x.test", &["x.test"], 1).key; // someone else's key
        certs.insert("b.test".into(), bad);
        let mut enc = entry("c.test", &["c.test"], 10);
        enc.key_encryption = "aes-256-gcm:0011223344556677".into();
        certs.insert("c.test".into(), enc);
        let (t1, errors) = CertTable::build(&certs, None, &none);
        assert_eq!(errors.len(), 2, "{errors:?}");
        let (t2, errors) = CertTable::build(&certs, Some(&t1), &none);
        assert!(
            errors.is_empty(),
            "a known-bad entry is reported once: {errors:?}"
        );
        let (a1, a2) = (
            t1.lookup("a.test").expect("a1"),
            t2.lookup("a.test").expect("a2"),
        );
        assert!(
            Arc::ptr_eq(&a1, &a2),
            "unchanged certificate is not re-parsed"
        );
        assert!(t2.lookup("b.test").is_none());
        assert!(t2.lookup("c.test").is_none());
    }

    #[test]
    fn sealed_keys_open_and_a_bad_update_keeps_the_old_certificate() {
        let ring =
            Keyring::from_base64(&crate::secrets::generate_key().expect("key"), &[]).expect("ring");
        let seal = |mut c: Certificate| {
            let (key, scheme) = ring.seal(&cert_aad(&c.name), &c.key).expect("seal");
            c.key = key;
            c.key_encryption = scheme;
            c
        };
        let mut certs = BTreeMap::new();
        certs.insert("a.test".into(), seal(entry("a.test", &["a.test"], 10)));
        let (t1, errors) = CertTable::build(&certs, None, &ring);
        assert!(errors.is_empty(), "{errors:?}");
        let served = t1.lookup("a.test").expect("sealed key opens and serves");
        // Without the data key the same entry does not load.
        let (t0, errors) = CertTable::build(&certs, None, &Keyring::default());
        assert!(
            matches!(errors.as_slice(), [CertError::Sealed { .. }]),
            "{errors:?}"
        );
        assert!(t0.lookup("a.test").is_none());
        // A renewal whose sealed key was corrupted: reported, and the old one keeps serving.
        let mut renewed = seal(entry("a.test", &["a.test"], 20));
        let last = renewed.key.len() - 1;
        renewed.key[last] ^= 1;
        certs.insert("a.test".into(), renewed);
        let (t2, errors) = CertTable::build(&certs, Some(&t1), &ring);
        assert!(
            matches!(errors.as_slice(), [CertError::Sealed { .. }]),
            "{errors:?}"
        );
        let still = t2.lookup("a.test").expect("old certificate still served");
        assert!(Arc::ptr_eq(&served, &still));
        // A good renewal then replaces it.
        certs.insert("a.test".into(), seal(entry("a.test", &["a.test"], 30)));
        let (t3, errors) = CertTable::build(&certs, Some(&t2), &ring);
        assert!(errors.is_empty(), "{errors:?}");
        assert!(!Arc::ptr_eq(
            &served,
            &t3.lookup("a.test").expect("renewed")
        ));
    }
}
