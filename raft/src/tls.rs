//! The cluster CA and node certificates for mutual TLS on the cluster port.
//!
//! Each node certificate names the node as `node-<id>.<CLUSTER_DOMAIN>`. A client dials a peer
//! with that name as the expected server name, so a peer that answers with another node's
//! certificate (a wrong node id behind an address) fails the handshake; a peer without a
//! certificate from the cluster CA fails it on either side.

use std::path::Path;

use rcgen::{
    BasicConstraints, CertificateParams, DnType, ExtendedKeyUsagePurpose, IsCa, Issuer, KeyPair,
    KeyUsagePurpose,
};

/// The DNS suffix used only inside node certificates.
pub const CLUSTER_DOMAIN: &str = "portcullis.cluster";

/// The certificate name a node with this id must present.
pub fn node_server_name(id: u64) -> String {
    format!("node-{id}.{CLUSTER_DOMAIN}")
}

#[derive(Debug, thiserror::Error)]
pub enum TlsError {
    #[error("cannot read {path}: {source}")]
    Read {
        path: String,
        source: std::io::Error,
    },
    #[error("certificate generation failed: {0}")]
    Generate(#[from] rcgen::Error),
}

/// PEM material a node needs: the cluster CA, its own certificate and key.
#[derive(Clone)]
pub struct TlsMaterial {
    pub ca_pem: String,
    pub cert_pem: String,
    pub key_pem: String,
}

impl std::fmt::Debug for TlsMaterial {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        // Never print the key.
        f.debug_struct("TlsMaterial").finish_non_exhaustive()
    }
}

impl TlsMaterial {
    pub fn load(ca: &Path, cert: &Path, key: &Path) -> Result<Self, TlsError> {
        let read = |p: &Path| {
            std::fs::read_to_string(p).map_err(|source| TlsError::Read {
                path: p.display().to_string(),
                source,
            })
        };
        Ok(TlsMaterial {
            ca_pem: read(ca)?,
            cert_pem: read(cert)?,
            key_pem: read(key)?,
        })
    }
}

/// A freshly generated certificate and its key, both PEM.
pub struct Issued {
    pub cert_pem: String,
    pub key_pem: String,
}

/// Creates a new cluster CA (ten years; the CA key stays with the operator).
pub fn generate_ca(cluster_name: &str) -> Result<Issued, TlsError> {
    let mut params = CertificateParams::new(Vec::<String>::new())?;
    params.distinguished_name.push(
        DnType::CommonName,
        format!("portcullis cluster CA {cluster_name}"),
    );
    params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
    params.key_usages = vec![
        KeyUsagePurpose::KeyCertSign,
        KeyUsagePurpose::CrlSign,
        KeyUsagePurpose::DigitalSignature,
    ];
    params.not_before = rcgen::date_time_ymd(2024, 1, 1);
    params.not_after = rcgen::date_time_ymd(2036, 1, 1);
    let key = KeyPair::generate()?;
    let cert = params.self_signed(&key)?;
    Ok(Issued {
        cert_pem: cert.pem(),
        key_pem: key.serialize_pem(),
    })
}

/// Issues a certificate for node `id`, usable as both TLS server and client.
pub fn issue_node_cert(ca_cert_pem: &str, ca_key_pem: &str, id: u64) -> Result<Issued, TlsError> {
    let ca_key = KeyPair::from_pem(ca_key_pem)?;
    let issuer = Issuer::from_ca_cert_pem(ca_cert_pem, ca_key)?;
    let mut params = CertificateParams::new(vec![node_server_name(id)])?;
    params
        .distinguished_name
        .push(DnType::CommonName, node_server_name(id));
    params.extended_key_usages = vec![
        ExtendedKeyUsagePurpose::ServerAuth,
        ExtendedKeyUsagePurpose::ClientAuth,
    ];
    params.not_before = rcgen::date_time_ymd(2024, 1, 1);
    params.not_after = rcgen::date_time_ymd(2036, 1, 1);
    let key = KeyPair::generate()?;
    let cert = params.signed_by(&key, &issuer)?;
    Ok(Issued {
        cert_pem: cert.pem(),
        key_pem: key.serialize_pem(),
    })
}

/// The certificate name of a CVM credential for `app`. CVM credentials come from the same
/// cluster CA as node certificates, so the name is what tells them apart: Raft RPCs accept only
/// `node-<id>.` names and CVM registration only `cvm.<app>.` names.
pub fn cvm_client_name(app: &str) -> String {
    format!("cvm.{app}.{CLUSTER_DOMAIN}")
}

/// Issues a CVM credential for `app`: a client-only certificate (it cannot serve the cluster
/// port) named [`cvm_client_name`].
pub fn issue_cvm_cert(ca_cert_pem: &str, ca_key_pem: &str, app: &str) -> Result<Issued, TlsError> {
    let ca_key = KeyPair::from_pem(ca_key_pem)?;
    let issuer = Issuer::from_ca_cert_pem(ca_cert_pem, ca_key)?;
    let name = cvm_client_name(app);
    let mut params = CertificateParams::new(vec![name.clone()])?;
    params.distinguished_name.push(DnType::CommonName, name);
    params.extended_key_usages = vec![ExtendedKeyUsagePurpose::ClientAuth];
    params.not_before = rcgen::date_time_ymd(2024, 1, 1);
    params.not_after = rcgen::date_time_ymd(2036, 1, 1);
    let key = KeyPair::generate()?;
    let cert = params.signed_by(&key, &issuer)?;
    Ok(Issued {
        cert_pem: cert.pem(),
        key_pem: key.serialize_pem(),
    })
}

/// Who is on the other end of a cluster-port connection, judged by the DNS names of its client
/// certificate (already verified against the cluster CA by the TLS layer).
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum PeerRole {
    /// A gateway node (`node-<id>.portcullis.cluster`).
    Node(u64),
    /// A CVM of one app (`cvm.<app>.portcullis.cluster`).
    Cvm(String),
    /// No certificate, an unparsable one, or names of neither kind (or of both kinds).
    Unknown,
}

/// Classifies the leaf certificate (DER) a client presented.
pub fn peer_role(leaf_der: &[u8]) -> PeerRole {
    let Ok((_, cert)) = x509_parser::parse_x509_certificate(leaf_der) else {
        return PeerRole::Unknown;
    };
    let Ok(Some(san)) = cert.subject_alternative_name() else {
        return PeerRole::Unknown;
    };
    let suffix = format!(".{CLUSTER_DOMAIN}");
    let mut roles = Vec::new();
    for name in &san.value.general_names {
        let x509_parser::extensions::GeneralName::DNSName(dns) = name else {
            continue;
        };
        let Some(label) = dns.strip_suffix(suffix.as_str()) else {
            continue;
        };
        if let Some(id) = label.strip_prefix("node-").and_then(|s| s.parse().ok()) {
            roles.push(PeerRole::Node(id));
        } else if let Some(app) = label.strip_prefix("cvm.") {
            if !app.is_empty() && !app.contains('.') {
                roles.push(PeerRole::Cvm(app.to_string()));
            }
        }
    }
    // A certificate claiming two roles is not one we issue; trust neither.
    match roles.len() {
        1 => roles.pop().unwrap_or(PeerRole::Unknown),
        _ => PeerRole::Unknown,
    }
}

#[cfg(test)]
mod role_tests {
    use super::*;

    fn der(pem: &str) -> Vec<u8> {
        let mut r = pem.as_bytes();
        let cert = rustls_pemfile::certs(&mut r)
            .next()
            .expect("one cert")
            .expect("pem");
        cert.to_vec()
    }

    #[test]
    fn node_and_cvm_certificates_are_told_apart() {
        let ca = generate_ca("t").expect("ca");
        let node = issue_node_cert(&ca.cert_pem, &ca.key_pem, 7).expect("node");
        let cvm = issue_cvm_cert(&ca.cert_pem, &ca.key_pem, "shop").expect("cvm");
        assert_eq!(peer_role(&der(&node.cert_pem)), PeerRole::Node(7));
        assert_eq!(peer_role(&der(&cvm.cert_pem)), PeerRole::Cvm("shop".into()));
        assert_eq!(peer_role(&der(&ca.cert_pem)), PeerRole::Unknown);
        assert_eq!(peer_role(b"garbage"), PeerRole::Unknown);
    }
}
