//! The WireGuard private key on disk, shared by the gateway ([`super::gateway`]) and the CVM
//! agent ([`super::agent`]). A leaf.

use std::io;
use std::path::Path;

use anyhow::Context;
use portcullis_wg::PrivateKey;

/// Loads the WireGuard private key from `path`, or creates one there (mode 0600) if the file
/// does not exist. A key file readable by group or others is refused, like wg(8) warns.
pub fn load_or_create_key(path: &Path) -> anyhow::Result<PrivateKey> {
    use std::io::Write;
    use std::os::unix::fs::{OpenOptionsExt, PermissionsExt};
    match std::fs::read_to_string(path) {
        Ok(text) => {
            let mode = std::fs::metadata(path)
                .with_context(|| format!("stat {}", path.display()))?
                .permissions()
                .mode();
            if mode & 0o077 != 0 {
                anyhow::bail!(
                    "WireGuard key {} has mode {:o}; it must be 0600 (chmod 600 it)",
                    path.display(),
                    mode & 0o777
                );
            }
            text.trim()
                .parse::<PrivateKey>()
                .with_context(|| format!("WireGuard key {}", path.display()))
        }
        Err(e) if e.kind() == io::ErrorKind::NotFound => {
            let key = PrivateKey::generate();
            let mut f = std::fs::OpenOptions::new()
                .write(true)
                .create_new(true)
                .mode(0o600)
                .open(path)
                .with_context(|| format!("create WireGuard key {}", path.display()))?;
            f.write_all(format!("{}\n", key.to_base64()).as_bytes())
                .and_then(|_| f.sync_all())
                .with_context(|| format!("write WireGuard key {}", path.display()))?;
            Ok(key)
        }
        Err(e) => Err(e).with_context(|| format!("read WireGuard key {}", path.display())),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn key_file_is_created_0600_and_reloaded() {
        use std::os::unix::fs::PermissionsExt;
        let dir = tempfile::tempdir().expect("tmp");
        let path = dir.path().join("wg.key");
        let a = load_or_create_key(&path).expect("create");
        let mode = std::fs::metadata(&path).expect("meta").permissions().mode();
        assert_eq!(mode & 0o777, 0o600);
        let b = load_or_create_key(&path).expect("load");
        assert_eq!(a.public_key(), b.public_key());
        std::fs::set_permissions(&path, std::fs::Permissions::from_mode(0o644)).expect("chmod");
        let e = load_or_create_key(&path).expect_err("0644 refused");
        assert!(e.to_string().contains("0600"), "{e}");
    }
}
