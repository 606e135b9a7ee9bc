//! HTTP-01 and TLS-ALPN-01 answers from the replicated state: whichever node the CA reaches can
//! answer, because the orderer publishes every key authorization through Raft before asking the
//! CA to validate.

use std::sync::Arc;
use std::time::Duration;

use portcullis_raft::state::ChallengeKind;
use portcullis_raft::store::SharedState;

use super::tls_alpn::ChallengeCache;
use crate::edge::acme_hook::AcmeResponder;
use crate::edge::upstream::BoxedIo;

pub struct ReplicatedResponder {
    shared: SharedState,
    tls_alpn: ChallengeCache,
}

impl ReplicatedResponder {
    pub fn new(shared: SharedState) -> Self {
        ReplicatedResponder {
            shared,
            tls_alpn: ChallengeCache::default(),
        }
    }
}

#[async_trait::async_trait]
impl AcmeResponder for ReplicatedResponder {
    fn http01(&self, host: &str, token: &str) -> Option<String> {
        // A short read of the applied state; no await while the guard is held.
        let applied = self.shared.read();
        let c = applied.state.acme.challenges.get(token)?;
        // The answer is only for the name it was published for: a token is not a secret, but
        // serving it under any Host would let one order's answer validate another name. Only
        // HTTP-01 answers: a key authorization published for another method is not meant to
        // be fetchable over plain HTTP.
        if c.name != host || c.kind != ChallengeKind::Http01 {
            return None;
        }
        tracing::info!(%host, %token, "answered ACME http-01 challenge");
        Some(c.key_authorization.clone())
    }

    fn tls_alpn01(&self, name: &str) -> Option<Arc<rustls::ServerConfig>> {
        let (token, ka) = {
            let applied = self.shared.read();
            let c = applied
                .state
                .acme
                .challenge_for(ChallengeKind::TlsAlpn01, name)?;
            (c.token.clone(), c.key_authorization.clone())
        };
        match self.tls_alpn.get(&token, name, &ka) {
            Ok(cfg) => Some(cfg),
            Err(e) => {
                tracing::warn!(error = %e, "cannot answer ACME tls-alpn-01 challenge");
                None
            }
        }
    }

    async fn answer_tls_alpn01(
        &self,
        cfg: Arc<rustls::ServerConfig>,
        io: BoxedIo,
        name: &str,
        limit: Duration,
    ) -> Result<(), Box<dyn std::error::Error + Send + Sync>> {
        Ok(super::tls_alpn::answer(cfg, io, name, limit).await?)
    }
}

#[cfg(test)]
mod tests {
    use portcullis_raft::state::{AcmeChallenge, ClusterState};

    use super::*;

    #[test]
    fn answers_only_the_published_token_for_its_name() {
        let mut state = ClusterState::default();
        state.acme.challenges.insert(
            "tok".into(),
            AcmeChallenge {
                token: "tok".into(),
                name: "a.example.com".into(),
                key_authorization: "tok.thumb".into(),
                created_at: 0,
                kind: ChallengeKind::Http01,
            },
        );
        state.acme.challenges.insert(
            "alpn".into(),
            AcmeChallenge {
                token: "alpn".into(),
                name: "c.example.com".into(),
                key_authorization: "alpn.thumb".into(),
                created_at: 0,
                kind: ChallengeKind::TlsAlpn01,
            },
        );
        let r = ReplicatedResponder::new(SharedState::detached(state));
        assert_eq!(
            r.http01("a.example.com", "tok").as_deref(),
            Some("tok.thumb")
        );
        assert_eq!(r.http01("b.example.com", "tok"), None);
        assert_eq!(r.http01("a.example.com", "other"), None);
        // Each answer only through its own method.
        assert_eq!(r.http01("c.example.com", "alpn"), None);
        assert!(r.tls_alpn01("a.example.com").is_none());
        assert!(r.tls_alpn01("b.example.com").is_none());
        let cfg = r.tls_alpn01("c.example.com").expect("tls-alpn-01 answer");
        assert_eq!(cfg.alpn_protocols, vec![b"acme-tls/1".to_vec()]);
    }
}
