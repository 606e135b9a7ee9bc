//! TLS-ALPN-01 (RFC 8737) answers from the replicated challenge table.
//!
//! The CA connects to port 443 of the name being validated, offering only the `acme-tls/1`
//! protocol, and expects a self-signed certificate for exactly that name with a critical
//! acmeIdentifier extension (id-pe-acmeIdentifier, 1.3.6.1.5.5.7.1.31) holding the SHA-256 of
//! the key authorization. The orderer publishes the key authorization through Raft, so whichever
//! node the CA reaches builds the same certificate.
//!
//! Isolation from normal traffic: the edge asks for an answer (through its ACME hook,
//! `edge/acme_hook.rs`, which [`super::ReplicatedResponder`] implements with this module) only
//! for a ClientHello whose ALPN list is exactly `acme-tls/1`, and the challenge certificate lives
//! in a `ServerConfig` of its own that offers nothing but `acme-tls/1`; the normal config never
//! offers that protocol. The connection is closed as soon as the handshake is done (RFC 8737 §3).

use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use rustls::pki_types::{CertificateDer, PrivateKeyDer, PrivatePkcs8KeyDer};
use rustls::server::{ClientHello, ResolvesServerCert};
use rustls::sign::CertifiedKey;
use rustls::ServerConfig;
use tokio::io::{AsyncRead, AsyncWrite, AsyncWriteExt};
use tokio_rustls::TlsAcceptor;

use crate::edge::acme_hook::ACME_TLS_1;

/// Most challenge certificates kept; more pending TLS-ALPN-01 names than this just means some
/// are built again on the next validation attempt.
const CACHE_MAX: usize = 256;

#[derive(Debug, thiserror::Error)]
pub enum TlsAlpnError {
    #[error("challenge certificate for {name:?}: {source}")]
    Certificate { name: String, source: rcgen::Error },
    #[error("challenge TLS config: {0}")]
    Tls(#[from] rustls::Error),
    #[error("acme-tls/1 handshake for {name:?}: {source}")]
    Handshake {
        name: String,
        source: std::io::Error,
    },
    #[error("acme-tls/1 handshake for {name:?} timed out after {limit:?}")]
    Timeout { name: String, limit: Duration },
}

/// A TLS config whose only certificate is the RFC 8737 challenge certificate for `name`, and
/// whose only protocol is `acme-tls/1`.
pub fn challenge_config(
    name: &str,
    key_authorization: &str,
) -> Result<Arc<ServerConfig>, TlsAlpnError> {
    let cert_err = |source| TlsAlpnError::Certificate {
        name: name.to_string(),
        source,
    };
    let digest = ring::digest::digest(&ring::digest::SHA256, key_authorization.as_bytes());
    let key = rcgen::KeyPair::generate().map_err(cert_err)?;
    let mut params = rcgen::CertificateParams::new(vec![name.to_string()]).map_err(cert_err)?;
    // rcgen marks the extension critical and wraps the digest in an OCTET STRING (RFC 8737 §3).
    params.custom_extensions = vec![rcgen::CustomExtension::new_acme_identifier(digest.as_ref())];
    let cert = params.self_signed(&key).map_err(cert_err)?;
    let chain = vec![CertificateDer::from(cert.der().to_vec())];
    let key_der = PrivateKeyDer::Pkcs8(PrivatePkcs8KeyDer::from(key.serialize_der()));
    let provider = crate::tls::provider();
    let signer = provider.key_provider.load_private_key(key_der)?;
    // Not `with_single_cert`: it parses the leaf with webpki, which rejects the (unknown to it)
    // critical acmeIdentifier extension. The key was generated for this certificate just above.
    let fixed = Fixed(Arc::new(CertifiedKey::new(chain, signer)));
    let mut cfg = ServerConfig::builder_with_provider(provider)
        .with_protocol_versions(&[&rustls::version::TLS13, &rustls::version::TLS12])?
        .with_no_client_auth()
        .with_cert_resolver(Arc::new(fixed));
    cfg.alpn_protocols = vec![ACME_TLS_1.to_vec()];
    // Nothing follows the handshake, so nothing is worth resuming.
    cfg.send_tls13_tickets = 0;
    Ok(Arc::new(cfg))
}

/// Serves one certificate whatever the ClientHello says (the edge already matched the name).
#[derive(Debug)]
struct Fixed(Arc<CertifiedKey>);

impl ResolvesServerCert for Fixed {
    fn resolve(&self, _: ClientHello<'_>) -> Option<Arc<CertifiedKey>> {
        Some(self.0.clone())
    }
}

/// Challenge configs by token, rebuilt only when the key authorization changes. Building one
/// costs a key generation and a signature; the CA connects several times per validation (Let's
/// Encrypt validates from several vantage points).
#[derive(Default)]
pub struct ChallengeCache {
    // A std mutex: held only for a map lookup or insert, never across an await or a key
    // generation.
    by_token: Mutex<HashMap<String, (String, Arc<ServerConfig>)>>,
}

impl ChallengeCache {
    /// The config for `token`'s answer, from the cache or freshly built.
    pub fn get(
        &self,
        token: &str,
        name: &str,
        key_authorization: &str,
    ) -> Result<Arc<ServerConfig>, TlsAlpnError> {
        if let Ok(map) = self.by_token.lock() {
            if let Some((ka, cfg)) = map.get(token) {
                if ka == key_authorization {
                    return Ok(cfg.clone());
                }
            }
        }
        let cfg = challenge_config(name, key_authorization)?;
        if let Ok(mut map) = self.by_token.lock() {
            // Finished challenges are never looked up again; dropping everything now and then
            // bounds the map without tracking the table.
            if map.len() >= CACHE_MAX {
                map.clear();
            }
            map.insert(
                token.to_string(),
                (key_authorization.to_string(), cfg.clone()),
            );
        }
        Ok(cfg)
    }
}

/// Completes the `acme-tls/1` handshake with the challenge certificate on `io` (which replays
/// the already-read ClientHello), then closes the connection.
pub async fn answer<IO>(
    cfg: Arc<ServerConfig>,
    io: IO,
    name: &str,
    limit: Duration,
) -> Result<(), TlsAlpnError>
where
    IO: AsyncRead + AsyncWrite + Unpin,
{
    let timeout = || TlsAlpnError::Timeout {
        name: name.to_string(),
        limit,
    };
    let mut tls = tokio::time::timeout(limit, TlsAcceptor::from(cfg).accept(io))
        .await
        .map_err(|_| timeout())?
        .map_err(|source| TlsAlpnError::Handshake {
            name: name.to_string(),
            source,
        })?;
    tracing::info!(%name, "answered ACME tls-alpn-01 challenge");
    // The close_notify is a courtesy; the CA has what it needs once the handshake is done.
    let _ = tokio::time::timeout(limit, tls.shutdown()).await;
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    use rustls::client::danger::{HandshakeSignatureValid, ServerCertVerified, ServerCertVerifier};
    use rustls::pki_types::{ServerName, UnixTime};
    use rustls::DigitallySignedStruct;
    use tokio_rustls::TlsConnector;

    /// The CA does not verify the chain (the certificate is self-signed); it inspects the leaf.
    #[derive(Debug)]
    struct AcceptAny;

    impl ServerCertVerifier for AcceptAny {
        fn verify_server_cert(
            &self,
            _: &CertificateDer<'_>,
            _: &[CertificateDer<'_>],
            _: &ServerName<'_>,
            _: &[u8],
            _: UnixTime,
        ) -> Result<ServerCertVerified, rustls::Error> {
            Ok(ServerCertVerified::assertion())
        }
        fn verify_tls12_signature(
            &self,
            _: &[u8],
            _: &CertificateDer<'_>,
            _: &DigitallySignedStruct,
        ) -> Result<HandshakeSignatureValid, rustls::Error> {
            Ok(HandshakeSignatureValid::assertion())
        }
        fn verify_tls13_signature(
            &self,
            _: &[u8],
            _: &CertificateDer<'_>,
            _: &DigitallySignedStruct,
        ) -> Result<HandshakeSignatureValid, rustls::Error> {
            Ok(HandshakeSignatureValid::assertion())
        }
        fn supported_verify_schemes(&self) -> Vec<rustls::SignatureScheme> {
            crate::tls::provider()
                .signature_verification_algorithms
                .supported_schemes()
        }
    }

    fn client(alpn: &[&[u8]]) -> TlsConnector {
        let mut cfg = rustls::ClientConfig::builder_with_provider(crate::tls::provider())
            .with_safe_default_protocol_versions()
            .expect("versions")
            .dangerous()
            .with_custom_certificate_verifier(Arc::new(AcceptAny))
            .with_no_client_auth();
        cfg.alpn_protocols = alpn.iter().map(|p| p.to_vec()).collect();
        TlsConnector::from(Arc::new(cfg))
    }

    #[tokio::test]
    async fn handshake_serves_the_rfc8737_certificate() {
        let ka = "tok.thumb";
        let cache = ChallengeCache::default();
        let cfg = cache.get("tok", "a.example.com", ka).expect("config");
        assert!(Arc::ptr_eq(
            &cfg,
            &cache.get("tok", "a.example.com", ka).expect("cached")
        ));
        let (server_io, client_io) = tokio::io::duplex(64 * 1024);
        let server = tokio::spawn(async move {
            answer(cfg, server_io, "a.example.com", Duration::from_secs(5)).await
        });
        let name = ServerName::try_from("a.example.com").expect("name");
        let tls = client(&[ACME_TLS_1])
            .connect(name, client_io)
            .await
            .expect("handshake");
        let (_, conn) = tls.get_ref();
        assert_eq!(conn.alpn_protocol(), Some(ACME_TLS_1));
        let leaf = conn.peer_certificates().expect("certs")[0].clone();
        let (_, x509) = x509_parser::parse_x509_certificate(leaf.as_ref()).expect("x509");
        let sans: Vec<String> = x509
            .subject_alternative_name()
            .expect("san")
            .expect("san present")
            .value
            .general_names
            .iter()
            .map(|g| g.to_string())
            .collect();
        assert_eq!(sans, vec!["DNSName(a.example.com)".to_string()]);
        let ext = x509
            .extensions()
            .iter()
            .find(|e| e.oid.to_id_string() == "1.3.6.1.5.5.7.1.31")
            .expect("acmeIdentifier extension");
        assert!(ext.critical);
        let digest = ring::digest::digest(&ring::digest::SHA256, ka.as_bytes());
        // DER OCTET STRING: tag 0x04, length 32, then the digest.
        let mut expected = vec![0x04, 0x20];
        expected.extend_from_slice(digest.as_ref());
        assert_eq!(ext.value, expected.as_slice());
        server.await.expect("join").expect("answered");
    }

    #[tokio::test]
    async fn a_client_without_acme_tls_1_gets_nothing() {
        let cfg = challenge_config("a.example.com", "tok.thumb").expect("config");
        let (server_io, client_io) = tokio::io::duplex(64 * 1024);
        let server = tokio::spawn(async move {
            answer(cfg, server_io, "a.example.com", Duration::from_secs(5)).await
        });
        let name = ServerName::try_from("a.example.com").expect("name");
        assert!(client(&[b"h2"]).connect(name, client_io).await.is_err());
        assert!(server.await.expect("join").is_err());
    }
}
