//! Private keys at rest: every private key in the replicated state (certificate keys, the ACME
//! account key) is sealed with the cluster data key before it is proposed, so the Raft log, the
//! snapshots and a stolen disk hold only ciphertext (docs/keys-at-rest.md).
//!
//! The data key is a 32-byte secret every node reads from a file or the environment; it never
//! enters Raft. A sealed value names the key that sealed it (`aes-256-gcm:<key-id>`, the id being
//! derived from the key), so a node can hold the new key and the previous ones during a rotation
//! and open whatever the log contains, while it seals only with the current one.
//!
//! AES-256-GCM with a random 96-bit nonce per seal; the entry's identity (certificate name, ACME
//! directory) is the associated data, so a ciphertext moved onto another entry does not open.

use std::fmt;
use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};

use base64::Engine;
use ring::aead::{Aad, LessSafeKey, Nonce, UnboundKey, AES_256_GCM, NONCE_LEN};
use ring::rand::{SecureRandom, SystemRandom};
use serde::{Deserialize, Serialize};
use zeroize::Zeroizing;

/// The scheme of unencrypted values: entries written before data keys existed. They are still
/// served; `portcullis secrets rewrap` seals them.
pub const PLAINTEXT: &str = "none";
const SCHEME: &str = "aes-256-gcm";
/// The current data key, base64. Takes precedence over `secrets.data_key_file`.
pub const ENV_DATA_KEY: &str = "PORTCULLIS_DATA_KEY";
/// Comma-separated previous data keys, base64, still accepted for opening during a rotation.
pub const ENV_PREVIOUS_DATA_KEYS: &str = "PORTCULLIS_PREVIOUS_DATA_KEYS";

/// Associated data of a certificate's private key.
pub fn cert_aad(name: &str) -> Vec<u8> {
    [b"portcullis certificate key\0".as_slice(), name.as_bytes()].concat()
}

/// Associated data of the ACME account credentials.
pub fn account_aad(directory: &str) -> Vec<u8> {
    [
        b"portcullis acme account\0".as_slice(),
        directory.as_bytes(),
    ]
    .concat()
}

#[derive(Debug, thiserror::Error)]
pub enum SecretsError {
    #[error("no cluster data key: set [secrets] data_key_file or {ENV_DATA_KEY} (create one with `portcullis secrets gen-key`)")]
    NoDataKey,
    #[error("{origin}: cannot read the data key: {source}")]
    Read {
        origin: String,
        source: std::io::Error,
    },
    #[error("{origin}: readable by group or others (mode {mode:o}); a data key must be private to its owner (chmod 600)")]
    Permissions { origin: String, mode: u32 },
    #[error("{origin}: not a data key: expected 32 bytes as base64 (44 characters)")]
    Malformed { origin: String },
    #[error("sealed with {scheme:?}, which is not a data key this node holds (it has: {held}); add that key to [secrets] previous_data_key_files")]
    UnknownKey { scheme: String, held: String },
    #[error("unknown key protection {0:?}")]
    UnknownScheme(String),
    #[error("does not open with data key {0}: the value was altered, belongs to another entry, or the key file is wrong")]
    Open(String),
    #[error("the system random generator failed")]
    Random,
}

/// `[secrets]` in the node configuration.
#[derive(Debug, Clone, Default, Serialize, Deserialize, PartialEq)]
#[serde(deny_unknown_fields, default)]
pub struct SecretsConfig {
    /// The current data key (base64 of 32 bytes, mode 0600). New values are sealed with it.
    pub data_key_file: PathBuf,
    /// Earlier data keys, only for opening values sealed before a rotation.
    pub previous_data_key_files: Vec<PathBuf>,
}

struct DataKey {
    id: String,
    key: LessSafeKey,
}

impl DataKey {
    fn from_base64(text: &str, origin: &str) -> Result<DataKey, SecretsError> {
        let malformed = || SecretsError::Malformed {
            origin: origin.to_string(),
        };
        let raw = Zeroizing::new(
            base64::engine::general_purpose::STANDARD
                .decode(text.trim())
                .map_err(|_| malformed())?,
        );
        if raw.len() != 32 {
            return Err(malformed());
        }
        // The id names the key without revealing it: a hash of the key under its own label.
        let digest = ring::digest::digest(
            &ring::digest::SHA256,
            &[b"portcullis data key id\0".as_slice(), &raw].concat(),
        );
        let id = digest.as_ref()[..8]
            .iter()
            .map(|b| format!("{b:02x}"))
            .collect();
        let key = LessSafeKey::new(UnboundKey::new(&AES_256_GCM, &raw).map_err(|_| malformed())?);
        Ok(DataKey { id, key })
    }

    fn scheme(&self) -> String {
        format!("{SCHEME}:{}", self.id)
    }
}

/// The data keys this node holds: the current one seals, all of them open.
#[derive(Default)]
pub struct Keyring {
    current: Option<DataKey>,
    previous: Vec<DataKey>,
}

impl fmt::Debug for Keyring {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Keyring")
            .field("current", &self.current_id())
            .field("previous", &self.previous_ids())
            .finish()
    }
}

/// A freshly generated data key, base64, for a key file.
pub fn generate_key() -> Result<String, SecretsError> {
    let mut raw = Zeroizing::new([0u8; 32]);
    SystemRandom::new()
        .fill(raw.as_mut())
        .map_err(|_| SecretsError::Random)?;
    Ok(base64::engine::general_purpose::STANDARD.encode(raw.as_ref()))
}

fn read_key_file(path: &Path) -> Result<DataKey, SecretsError> {
    let origin = format!("data key file {}", path.display());
    let meta = std::fs::metadata(path).map_err(|source| SecretsError::Read {
        origin: origin.clone(),
        source,
    })?;
    let mode = meta.permissions().mode() & 0o777;
    if mode & 0o077 != 0 {
        return Err(SecretsError::Permissions { origin, mode });
    }
    let text =
        Zeroizing::new(
            std::fs::read_to_string(path).map_err(|source| SecretsError::Read {
                origin: origin.clone(),
                source,
            })?,
        );
    DataKey::from_base64(&text, &origin)
}

impl Keyring {
    /// Loads the keys from the environment (which wins) or the files in `cfg`, resolved against
    /// `base` when relative.
    pub fn load(cfg: &SecretsConfig, base: &Path) -> Result<Keyring, SecretsError> {
        let env = |name: &str| std::env::var(name).ok().filter(|v| !v.trim().is_empty());
        let current = match env(ENV_DATA_KEY) {
            Some(v) => DataKey::from_base64(&v, ENV_DATA_KEY)?,
            None if cfg.data_key_file.as_os_str().is_empty() => {
                return Err(SecretsError::NoDataKey)
            }
            None => read_key_file(&base.join(&cfg.data_key_file))?,
        };
        let mut previous = Vec::new();
        if let Some(v) = env(ENV_PREVIOUS_DATA_KEYS) {
            for (i, k) in v.split(',').filter(|k| !k.trim().is_empty()).enumerate() {
                previous.push(DataKey::from_base64(
                    k,
                    &format!("{ENV_PREVIOUS_DATA_KEYS} entry {}", i + 1),
                )?);
            }
        } else {
            for p in &cfg.previous_data_key_files {
                previous.push(read_key_file(&base.join(p))?);
            }
        }
        Ok(Keyring::new(current, previous))
    }

    fn new(current: DataKey, mut previous: Vec<DataKey>) -> Keyring {
        // Listing the current key again as previous is harmless; keep one copy.
        previous.retain(|k| k.id != current.id);
        Keyring {
            current: Some(current),
            previous,
        }
    }

    /// A keyring from base64 keys (tests and tools).
    pub fn from_base64(current: &str, previous: &[&str]) -> Result<Keyring, SecretsError> {
        let current = DataKey::from_base64(current, "current key")?;
        let previous = previous
            .iter()
            .map(|k| DataKey::from_base64(k, "previous key"))
            .collect::<Result<_, _>>()?;
        Ok(Keyring::new(current, previous))
    }

    /// The id of the key new values are sealed with.
    pub fn current_id(&self) -> Option<&str> {
        self.current.as_ref().map(|k| k.id.as_str())
    }

    pub fn previous_ids(&self) -> Vec<&str> {
        self.previous.iter().map(|k| k.id.as_str()).collect()
    }

    /// Seals `plaintext` with the current key: `(nonce || ciphertext || tag, scheme)`.
    pub fn seal(&self, aad: &[u8], plaintext: &[u8]) -> Result<(Vec<u8>, String), SecretsError> {
        let key = self.current.as_ref().ok_or(SecretsError::NoDataKey)?;
        let mut nonce = [0u8; NONCE_LEN];
        SystemRandom::new()
            .fill(&mut nonce)
            .map_err(|_| SecretsError::Random)?;
        let mut out = Vec::with_capacity(NONCE_LEN + plaintext.len() + AES_256_GCM.tag_len());
        out.extend_from_slice(&nonce);
        out.extend_from_slice(plaintext);
        let tag = key
            .key
            .seal_in_place_separate_tag(
                Nonce::assume_unique_for_key(nonce),
                Aad::from(aad),
                &mut out[NONCE_LEN..],
            )
            .map_err(|_| SecretsError::Random)?;
        out.extend_from_slice(tag.as_ref());
        Ok((out, key.scheme()))
    }

    /// Opens a value stored under `scheme`; plaintext values come back as they are.
    pub fn open(
        &self,
        scheme: &str,
        aad: &[u8],
        sealed: &[u8],
    ) -> Result<Zeroizing<Vec<u8>>, SecretsError> {
        if scheme == PLAINTEXT {
            return Ok(Zeroizing::new(sealed.to_vec()));
        }
        let id = scheme
            .strip_prefix(SCHEME)
            .and_then(|rest| rest.strip_prefix(':'))
            .ok_or_else(|| SecretsError::UnknownScheme(scheme.to_string()))?;
        let key = self
            .current
            .iter()
            .chain(self.previous.iter())
            .find(|k| k.id == id)
            .ok_or_else(|| SecretsError::UnknownKey {
                scheme: scheme.to_string(),
                held: self.held(),
            })?;
        if sealed.len() < NONCE_LEN + AES_256_GCM.tag_len() {
            return Err(SecretsError::Open(id.to_string()));
        }
        let (nonce, body) = sealed.split_at(NONCE_LEN);
        let nonce =
            Nonce::try_assume_unique_for_key(nonce).map_err(|_| SecretsError::Open(id.into()))?;
        let mut buf = Zeroizing::new(body.to_vec());
        let n = key
            .key
            .open_in_place(nonce, Aad::from(aad), &mut buf)
            .map_err(|_| SecretsError::Open(id.to_string()))?
            .len();
        buf.truncate(n);
        Ok(buf)
    }

    /// Where a stored value stands relative to this keyring.
    pub fn classify(&self, scheme: &str) -> Protection {
        if scheme == PLAINTEXT {
            return Protection::Plaintext;
        }
        let id = scheme
            .strip_prefix(SCHEME)
            .and_then(|rest| rest.strip_prefix(':'));
        match id {
            Some(id) if self.current_id() == Some(id) => Protection::Current,
            Some(id) if self.previous.iter().any(|k| k.id == id) => Protection::Previous,
            _ => Protection::Unknown,
        }
    }

    fn held(&self) -> String {
        let ids: Vec<&str> = self
            .current_id()
            .into_iter()
            .chain(self.previous_ids())
            .collect();
        if ids.is_empty() {
            "none".into()
        } else {
            ids.join(", ")
        }
    }
}

/// How a stored private key is protected, seen from one node's keyring.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Protection {
    /// Sealed with this node's current key.
    Current,
    /// Sealed with a key this node keeps only for opening: `secrets rewrap` moves it on.
    Previous,
    /// Stored unencrypted (written before data keys existed).
    Plaintext,
    /// Sealed with a key this node does not hold.
    Unknown,
}

#[cfg(test)]
mod tests {
    use super::*;

    fn key() -> String {
        generate_key().expect("random")
    }

    #[test]
    fn seal_open_round_trip_and_the_scheme_names_the_key() {
        let ring = Keyring::from_base64(&key(), &[]).expect("ring");
        let (sealed, scheme) = ring.seal(&cert_aad("a.test"), b"secret").expect("seal");
        assert_eq!(
            scheme,
            format!("aes-256-gcm:{}", ring.current_id().expect("id"))
        );
        assert!(!sealed.windows(6).any(|w| w == b"secret"));
        let opened = ring
            .open(&scheme, &cert_aad("a.test"), &sealed)
            .expect("open");
        assert_eq!(opened.as_slice(), b"secret");
        // A fresh nonce per seal: the same key sealed twice differs.
        let (again, _) = ring.seal(&cert_aad("a.test"), b"secret").expect("seal");
        assert_ne!(sealed, again);
    }

    #[test]
    fn tampering_another_entry_or_another_key_does_not_open() {
        let ring = Keyring::from_base64(&key(), &[]).expect("ring");
        let (mut sealed, scheme) = ring.seal(&cert_aad("a.test"), b"secret").expect("seal");
        assert!(matches!(
            ring.open(&scheme, &cert_aad("b.test"), &sealed),
            Err(SecretsError::Open(_))
        ));
        let other = Keyring::from_base64(&key(), &[]).expect("other");
        assert!(matches!(
            other.open(&scheme, &cert_aad("a.test"), &sealed),
            Err(SecretsError::UnknownKey { .. })
        ));
        let last = sealed.len() - 1;
        sealed[last] ^= 1;
        assert!(matches!(
            ring.open(&scheme, &cert_aad("a.test"), &sealed),
            Err(SecretsError::Open(_))
        ));
        assert!(ring.open(&scheme, b"", &sealed[..5]).is_err());
        assert!(matches!(
            ring.open("rot13", b"", &sealed),
            Err(SecretsError::UnknownScheme(_))
        ));
    }

    #[test]
    fn rotation_opens_old_values_and_seals_with_the_new_key() {
        let (k1, k2) = (key(), key());
        let old = Keyring::from_base64(&k1, &[]).expect("old");
        let (sealed, scheme) = old
            .seal(&account_aad("https://ca/dir"), b"acct")
            .expect("seal");
        let rotated = Keyring::from_base64(&k2, &[&k1]).expect("rotated");
        assert_eq!(rotated.classify(&scheme), Protection::Previous);
        let opened = rotated
            .open(&scheme, &account_aad("https://ca/dir"), &sealed)
            .expect("old value opens");
        let (_, new_scheme) = rotated.seal(b"", &opened).expect("reseal");
        assert_eq!(rotated.classify(&new_scheme), Protection::Current);
        assert_ne!(new_scheme, scheme);
        assert_eq!(old.classify(&new_scheme), Protection::Unknown);
        assert_eq!(old.classify(PLAINTEXT), Protection::Plaintext);
        assert_eq!(
            old.open(PLAINTEXT, b"", b"pem").expect("plain").as_slice(),
            b"pem"
        );
    }

    #[test]
    fn key_files_must_be_private_and_well_formed() {
        let dir = tempfile::tempdir().expect("tempdir");
        let write = |name: &str, text: &str, mode: u32| {
            let p = dir.path().join(name);
            std::fs::write(&p, text).expect("write");
            std::fs::set_permissions(&p, std::fs::Permissions::from_mode(mode)).expect("chmod");
            PathBuf::from(name)
        };
        let good = write("good.key", &format!("{}\n", key()), 0o600);
        let open = write("open.key", &key(), 0o644);
        let short = write("short.key", "c2hvcnQ=", 0o600);
        let cfg = |f: PathBuf| SecretsConfig {
            data_key_file: f,
            previous_data_key_files: vec![],
        };
        assert!(Keyring::load(&cfg(good.clone()), dir.path()).is_ok());
        assert!(matches!(
            Keyring::load(&cfg(open), dir.path()),
            Err(SecretsError::Permissions { .. })
        ));
        assert!(matches!(
            Keyring::load(&cfg(short), dir.path()),
            Err(SecretsError::Malformed { .. })
        ));
        assert!(matches!(
            Keyring::load(&cfg("missing.key".into()), dir.path()),
            Err(SecretsError::Read { .. })
        ));
        assert!(matches!(
            Keyring::load(&SecretsConfig::default(), dir.path()),
            Err(SecretsError::NoDataKey)
        ));
        let msg = SecretsError::NoDataKey.to_string();
        assert!(
            msg.contains("data_key_file") && msg.contains(ENV_DATA_KEY),
            "{msg}"
        );
    }
}
