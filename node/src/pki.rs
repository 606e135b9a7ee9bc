//! Files on disk for the cluster's credentials: the CA, node certificates, the admin token.
//!
//! Layout of a PKI directory:
//! `ca.pem`, `ca.key` (keep offline), `admin.token`, `data.key` (the cluster data key that
//! seals private keys at rest), and `node-<id>/{cert.pem,key.pem}`.

use std::io::Write;
use std::os::unix::fs::OpenOptionsExt;
use std::path::{Path, PathBuf};

use anyhow::{bail, Context};
use portcullis_raft::tls;
use rand::RngCore;

/// Writes `contents` to a new file readable only by its owner.
pub fn write_private(path: &Path, contents: &[u8]) -> anyhow::Result<()> {
    let mut f = std::fs::OpenOptions::new()
        .write(true)
        .create(true)
        .truncate(true)
        .mode(0o600)
        .open(path)
        .with_context(|| format!("create {}", path.display()))?;
    // `mode` applies only to a file this call creates; one that existed keeps its own.
    f.set_permissions(std::os::unix::fs::PermissionsExt::from_mode(0o600))
        .with_context(|| format!("chmod 600 {}", path.display()))?;
    f.write_all(contents)
        .with_context(|| format!("write {}", path.display()))?;
    f.sync_all()
        .with_context(|| format!("sync {}", path.display()))
}

pub fn random_token() -> String {
    let mut b = [0u8; 32];
    rand::thread_rng().fill_bytes(&mut b);
    b.iter().map(|x| format!("{x:02x}")).collect()
}

/// The cluster data key's file name in a PKI directory.
pub const DATA_KEY_FILE: &str = "data.key";

/// Creates a new CA, an admin token, a data key, and certificates for `node_ids`.
pub fn init(dir: &Path, node_ids: &[u64]) -> anyhow::Result<()> {
    std::fs::create_dir_all(dir).with_context(|| format!("create {}", dir.display()))?;
    if dir.join("ca.key").exists() {
        bail!(
            "{} already holds a cluster CA; refusing to overwrite it",
            dir.display()
        );
    }
    let ca = tls::generate_ca("local")?;
    std::fs::write(dir.join("ca.pem"), &ca.cert_pem).context("write ca.pem")?;
    write_private(&dir.join("ca.key"), ca.key_pem.as_bytes())?;
    write_private(&dir.join("admin.token"), random_token().as_bytes())?;
    let data_key = zeroize::Zeroizing::new(crate::secrets::generate_key()?);
    write_private(
        &dir.join(DATA_KEY_FILE),
        format!("{}\n", data_key.as_str()).as_bytes(),
    )?;
    for id in node_ids {
        issue(dir, *id)?;
    }
    Ok(())
}

/// Issues `node-<id>/cert.pem` and `key.pem` from the CA in `dir`.
pub fn issue(dir: &Path, id: u64) -> anyhow::Result<PathBuf> {
    if id == 0 {
        bail!("node id 0 is reserved");
    }
    let ca_pem = std::fs::read_to_string(dir.join("ca.pem"))
        .with_context(|| format!("read {}/ca.pem", dir.display()))?;
    let ca_key = std::fs::read_to_string(dir.join("ca.key"))
        .with_context(|| format!("read {}/ca.key", dir.display()))?;
    let issued = tls::issue_node_cert(&ca_pem, &ca_key, id)?;
    let out = node_dir(dir, id);
    std::fs::create_dir_all(&out).with_context(|| format!("create {}", out.display()))?;
    std::fs::write(out.join("cert.pem"), issued.cert_pem).context("write cert.pem")?;
    write_private(&out.join("key.pem"), issued.key_pem.as_bytes())?;
    Ok(out)
}

pub fn node_dir(dir: &Path, id: u64) -> PathBuf {
    dir.join(format!("node-{id}"))
}

/// The development CA that `portcullis up` creates to sign certificates for its base domain:
/// `dev-ca.pem` (give it to clients as `--cacert`) and `dev-ca.key`, next to the cluster CA.
/// It is not the cluster CA: trusting it for HTTPS grants nothing on the cluster port.
pub fn init_dev_ca(dir: &Path) -> anyhow::Result<PathBuf> {
    let ca = tls::generate_ca("development (HTTPS)")?;
    let path = dir.join("dev-ca.pem");
    std::fs::write(&path, &ca.cert_pem).context("write dev-ca.pem")?;
    write_private(&dir.join("dev-ca.key"), ca.key_pem.as_bytes())?;
    Ok(path)
}

/// Issues a server certificate for `names` from the development CA in `dir`.
pub fn issue_dev_cert(dir: &Path, names: &[String]) -> anyhow::Result<tls::Issued> {
    use rcgen::{CertificateParams, DnType, ExtendedKeyUsagePurpose, Issuer, KeyPair};
    let ca_pem = std::fs::read_to_string(dir.join("dev-ca.pem"))
        .with_context(|| format!("read {}/dev-ca.pem", dir.display()))?;
    let ca_key = std::fs::read_to_string(dir.join("dev-ca.key"))
        .with_context(|| format!("read {}/dev-ca.key", dir.display()))?;
    let issuer = Issuer::from_ca_cert_pem(&ca_pem, KeyPair::from_pem(&ca_key)?)?;
    let mut params = CertificateParams::new(names.to_vec())?;
    if let Some(first) = names.first() {
        params
            .distinguished_name
            .push(DnType::CommonName, first.clone());
    }
    params.extended_key_usages = vec![ExtendedKeyUsagePurpose::ServerAuth];
    params.not_before = rcgen::date_time_ymd(2024, 1, 1);
    params.not_after = rcgen::date_time_ymd(2035, 1, 1);
    let key = KeyPair::generate()?;
    let cert = params.signed_by(&key, &issuer)?;
    Ok(tls::Issued {
        cert_pem: cert.pem(),
        key_pem: key.serialize_pem(),
    })
}
