//! WireGuard keys: Curve25519 key pairs in the base64 form `wg(8)` uses.

use std::fmt;
use std::str::FromStr;

use base64::engine::general_purpose::STANDARD;
use base64::Engine;
use boringtun::x25519;

/// A peer's public key (32 bytes). Displays and parses as standard base64, like `wg pubkey`.
#[derive(Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct PublicKey([u8; 32]);

impl PublicKey {
    /// Wraps raw key bytes.
    pub fn from_bytes(bytes: [u8; 32]) -> Self {
        Self(bytes)
    }

    /// The raw key bytes.
    pub fn as_bytes(&self) -> &[u8; 32] {
        &self.0
    }

    /// Standard base64, as in wg-quick configurations.
    pub fn to_base64(&self) -> String {
        STANDARD.encode(self.0)
    }

    pub(crate) fn to_x25519(self) -> x25519::PublicKey {
        x25519::PublicKey::from(self.0)
    }
}

/// Both key kinds are 32 bytes in standard base64; the caller decides how much of the input its
/// error may show.
fn decode_key(s: &str) -> Result<[u8; 32], &'static str> {
    let bytes = STANDARD
        .decode(s.trim())
        .map_err(|_| "not standard base64")?;
    bytes.try_into().map_err(|_| "does not decode to 32 bytes")
}

/// A key that does not decode. Messages carry the offending public key; a private key's text is
/// never echoed, only its length. Its own type (not [`crate::WgError`]'s) so that keys depend on
/// nothing else in the crate.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum KeyError {
    /// A public key that is not 32 bytes of standard base64.
    #[error("invalid WireGuard public key {value:?}: {reason}")]
    InvalidPublicKey {
        /// The text that was given.
        value: String,
        /// What is wrong with it.
        reason: &'static str,
    },
    /// A private key that does not decode.
    #[error("invalid WireGuard private key ({len} characters): {reason}")]
    InvalidPrivateKey {
        /// Length of the rejected text.
        len: usize,
        /// What is wrong with it.
        reason: &'static str,
    },
}

impl FromStr for PublicKey {
    type Err = KeyError;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        decode_key(s)
            .map(Self)
            .map_err(|reason| KeyError::InvalidPublicKey {
                value: s.to_string(),
                reason,
            })
    }
}

impl fmt::Display for PublicKey {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.to_base64())
    }
}

impl fmt::Debug for PublicKey {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "PublicKey({})", self.to_base64())
    }
}

/// This endpoint's private key. `Debug` never prints it; `to_base64` is for writing the 0600 key file.
#[derive(Clone)]
pub struct PrivateKey([u8; 32]);

impl PrivateKey {
    /// A fresh random key from the OS generator, clamped as `wg genkey` does.
    pub fn generate() -> Self {
        let mut bytes: [u8; 32] = rand::random();
        // Curve25519 clamping, so the file we write is byte-identical to what wg(8) would accept
        // and show back; x25519 clamps on use anyway.
        bytes[0] &= 248;
        bytes[31] &= 127;
        bytes[31] |= 64;
        Self(bytes)
    }

    /// Wraps raw key bytes.
    pub fn from_bytes(bytes: [u8; 32]) -> Self {
        Self(bytes)
    }

    /// Standard base64 (the content of a wg-quick `PrivateKey =` line).
    pub fn to_base64(&self) -> String {
        STANDARD.encode(self.0)
    }

    /// The matching public key.
    pub fn public_key(&self) -> PublicKey {
        PublicKey(x25519::PublicKey::from(&self.to_x25519()).to_bytes())
    }

    pub(crate) fn to_x25519(&self) -> x25519::StaticSecret {
        x25519::StaticSecret::from(self.0)
    }
}

impl FromStr for PrivateKey {
    type Err = KeyError;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        // Never echo the text back: it might be a real key with a typo.
        decode_key(s)
            .map(Self)
            .map_err(|reason| KeyError::InvalidPrivateKey {
                len: s.len(),
                reason,
            })
    }
}

impl fmt::Debug for PrivateKey {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "PrivateKey(<redacted>, public {})", self.public_key())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn public_key_round_trips_base64() {
        let k = PrivateKey::generate().public_key();
        let parsed: PublicKey = k.to_base64().parse().expect("parse");
        assert_eq!(parsed, k);
    }

    #[test]
    fn bad_public_key_names_the_value() {
        let err = "abc".parse::<PublicKey>().expect_err("must fail");
        assert!(err.to_string().contains("\"abc\""), "{err}");
        let short = STANDARD.encode([1u8; 31]);
        let err = short.parse::<PublicKey>().expect_err("must fail");
        assert!(err.to_string().contains("32 bytes"), "{err}");
    }

    #[test]
    fn private_key_is_never_printed() {
        let k = PrivateKey::generate();
        let secret = k.to_base64();
        assert!(!format!("{k:?}").contains(&secret));
        let err = "not a key!".parse::<PrivateKey>().expect_err("must fail");
        assert!(!err.to_string().contains("not a key"), "{err}");
    }

    #[test]
    fn matches_rfc7748_public_key_derivation() {
        // RFC 7748 section 6.1, Alice's key pair.
        let sk: [u8; 32] = [
            0x77, 0x07, 0x6d, 0x0a, 0x73, 0x18, 0xa5, 0x7d, 0x3c, 0x16, 0xc1, 0x72, 0x51, 0xb2,
            0x66, 0x45, 0xdf, 0x4c, 0x2f, 0x87, 0xeb, 0xc0, 0x99, 0x2a, 0xb1, 0x77, 0xfb, 0xa5,
            0x1d, 0xb9, 0x2c, 0x2a,
        ];
        let pk: [u8; 32] = [
            0x85, 0x20, 0xf0, 0x09, 0x89, 0x30, 0xa7, 0x54, 0x74, 0x8b, 0x7d, 0xdc, 0xb4, 0x3e,
            0xf7, 0x5a, 0x0d, 0xbf, 0x3a, 0x0d, 0x26, 0x38, 0x1a, 0xf4, 0xeb, 0xa4, 0xa9, 0x8e,
            0xaa, 0x9b, 0x4e, 0x6a,
        ];
        assert_eq!(PrivateKey::from_bytes(sk).public_key().as_bytes(), &pk);
    }
}
