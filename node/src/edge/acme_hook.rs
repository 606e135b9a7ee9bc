//! The hook ACME plugs into the data plane: HTTP-01 answers on the plain port (`redirect.rs`)
//! and TLS-ALPN-01 answers on the HTTPS port (`conn.rs`). The edge reaches both challenges only
//! through [`AcmeResponder`]; the `acme` module implements it, and nothing in the edge imports
//! `acme`.

use std::sync::Arc;
use std::time::Duration;

use rustls::ServerConfig;

use super::upstream::BoxedIo;

/// The ALPN protocol id of TLS-ALPN-01 (RFC 8737).
pub const ACME_TLS_1: &[u8] = b"acme-tls/1";

/// True for a ClientHello that offers `acme-tls/1` and nothing else, as RFC 8737 §3 requires of
/// a validating CA. A client that also offers `h2` is ordinary traffic.
pub fn is_acme_tls(alpn: &[Vec<u8>]) -> bool {
    matches!(alpn, [only] if only.as_slice() == ACME_TLS_1)
}

/// Answers ACME HTTP-01 and TLS-ALPN-01 challenges. The ACME issue plugs the replicated account
/// key in here: any node can compute the key authorization for any pending order.
#[async_trait::async_trait]
pub trait AcmeResponder: Send + Sync + 'static {
    /// The key authorization for `token` on `host`, if an order is pending for it.
    fn http01(&self, host: &str, token: &str) -> Option<String>;

    /// The TLS-ALPN-01 (RFC 8737) config for `name`, if a TLS-ALPN-01 answer is pending for it:
    /// used only for ClientHellos that offer nothing but `acme-tls/1` ([`is_acme_tls`]).
    fn tls_alpn01(&self, _name: &str) -> Option<Arc<ServerConfig>> {
        None
    }

    /// Completes the `acme-tls/1` handshake for `name` with `cfg`, the config
    /// [`AcmeResponder::tls_alpn01`] gave, within `limit`, then closes the connection. `io`
    /// replays the ClientHello the edge has already read. Asked only after `tls_alpn01` gave a
    /// config, so a responder that gives none needs no answer of its own.
    async fn answer_tls_alpn01(
        &self,
        _cfg: Arc<ServerConfig>,
        _io: BoxedIo,
        name: &str,
        _limit: Duration,
    ) -> Result<(), Box<dyn std::error::Error + Send + Sync>> {
        Err(format!("no TLS-ALPN-01 answer for {name:?}").into())
    }
}

/// No ACME: every challenge path is a 404, and no `acme-tls/1` handshake is answered.
pub struct NoAcme;

impl AcmeResponder for NoAcme {
    fn http01(&self, _host: &str, _token: &str) -> Option<String> {
        None
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn only_exactly_acme_tls_1_is_a_validation() {
        assert!(is_acme_tls(&[ACME_TLS_1.to_vec()]));
        assert!(!is_acme_tls(&[]));
        assert!(!is_acme_tls(&[b"h2".to_vec()]));
        assert!(!is_acme_tls(&[ACME_TLS_1.to_vec(), b"h2".to_vec()]));
    }
}
