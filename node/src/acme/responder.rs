//! HTTP-01 answers from the replicated state: whichever node the CA reaches can answer, because
//! the orderer publishes every key authorization through Raft before asking the CA to validate.

use portcullis_raft::store::SharedState;

use crate::edge::redirect::AcmeResponder;

pub struct ReplicatedResponder {
    shared: SharedState,
}

impl ReplicatedResponder {
    pub fn new(shared: SharedState) -> Self {
        ReplicatedResponder { shared }
    }
}

impl AcmeResponder for ReplicatedResponder {
    fn http01(&self, host: &str, token: &str) -> Option<String> {
        // A short read of the applied state; no await while the guard is held.
        let applied = self.shared.read();
        let c = applied.state.acme.challenges.get(token)?;
        // The answer is only for the name it was published for: a token is not a secret, but
        // serving it under any Host would let one order's answer validate another name.
        if c.name != host {
            return None;
        }
        tracing::info!(%host, %token, "answered ACME http-01 challenge");
        Some(c.key_authorization.clone())
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
            },
        );
        let r = ReplicatedResponder::new(SharedState::detached(state));
        assert_eq!(
            r.http01("a.example.com", "tok").as_deref(),
            Some("tok.thumb")
        );
        assert_eq!(r.http01("b.example.com", "tok"), None);
        assert_eq!(r.http01("a.example.com", "other"), None);
    }
}
