//! The private keys held sealed in the replicated state, as `KeyStatus` and `RewrapKeys` see
//! them.

use portcullis_raft::state::RewrapTarget;
use portcullis_raft::Cluster;

/// One private key in the replicated state, as `KeyStatus` and `RewrapKeys` see it.
pub(super) struct StoredKey {
    pub(super) target: RewrapTarget,
    /// Certificate name or ACME directory.
    pub(super) name: String,
    pub(super) scheme: String,
    /// The sealed secret (the account's base64 decoded).
    pub(super) stored: Vec<u8>,
    /// The value exactly as stored, which a rewrap names as the one it replaces.
    pub(super) stored_raw: Vec<u8>,
}

impl StoredKey {
    pub(super) fn kind(&self) -> &'static str {
        match self.target {
            RewrapTarget::Certificate(_) => "certificate",
            RewrapTarget::AcmeAccount => "ACME account",
        }
    }
}

pub(super) fn stored_keys(cluster: &Cluster) -> Vec<StoredKey> {
    let applied = cluster.shared.read();
    let mut keys: Vec<StoredKey> = applied
        .state
        .certificates
        .values()
        .map(|c| StoredKey {
            target: RewrapTarget::Certificate(c.name.clone()),
            name: c.name.clone(),
            scheme: c.key_encryption.clone(),
            stored: c.key.clone(),
            stored_raw: c.key.clone(),
        })
        .collect();
    if let Some(a) = &applied.state.acme.account {
        keys.push(StoredKey {
            target: RewrapTarget::AcmeAccount,
            name: a.directory.clone(),
            scheme: a.encryption.clone(),
            stored: crate::acme::decode_sealed(&a.encryption, &a.credentials),
            stored_raw: a.credentials.clone().into_bytes(),
        });
    }
    keys
}
