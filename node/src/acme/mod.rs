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
