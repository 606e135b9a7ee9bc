//! Automatic certificates (issue 6): ACME against any directory, with one orderer per cluster.
//!
//! - [`config`]: the `[acme]` section.
//! - [`orderer`]: the task every node runs. It takes the orderer lease through Raft; only the
//!   holder talks to the CA. It keeps the account in the replicated state, orders and renews
//!   certificates, publishes HTTP-01 answers through Raft, and writes certificates with fenced
//!   commands so a holder that lost its lease cannot overwrite its successor.
//! - [`responder`]: answers HTTP-01 and TLS-ALPN-01 validation requests on every node from the
//!   replicated answers, so the CA may reach any node.
//! - [`dns01`]: DNS-01 TXT records through RFC 2136 updates signed with TSIG (lease holder
//!   only).
//! - [`tls_alpn`]: the RFC 8737 challenge certificate and the `acme-tls/1` handshake.
//! - [`metrics`]: certificate expiry and orderer metrics.

pub mod config;
pub mod dns01;
pub mod metrics;
pub mod orderer;
pub mod responder;
pub mod tls_alpn;

pub use config::AcmeConfig;
pub use metrics::AcmeMetrics;
pub use responder::ReplicatedResponder;

/// Unix seconds from the local clock.
/// Sealed account credentials travel as base64 text: the replicated field is a string.
pub(crate) fn encode_sealed(sealed: &[u8]) -> String {
    use base64::Engine;
    base64::engine::general_purpose::STANDARD.encode(sealed)
}

/// The sealed bytes of stored account credentials (plaintext ones as they are). Undecodable
/// text yields nothing, which then fails to open with the data key's error.
pub(crate) fn decode_sealed(scheme: &str, credentials: &str) -> Vec<u8> {
    use base64::Engine;
    if scheme == crate::secrets::PLAINTEXT {
        return credentials.as_bytes().to_vec();
    }
    base64::engine::general_purpose::STANDARD
        .decode(credentials)
        .unwrap_or_default()
}

pub(crate) fn unix_now() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_secs())
        .unwrap_or(0)
}

/// Unix milliseconds from the local clock.
pub(crate) fn unix_now_ms() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| u64::try_from(d.as_millis()).unwrap_or(u64::MAX))
        .unwrap_or(0)
}
