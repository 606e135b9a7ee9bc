//! `ValidationError` and the field checks every command's validation is made of: names, ports,
//! load-balancing policies, coordinates.
//!
//! Pure functions of their arguments: they read no state, and this file imports nothing else of
//! the module, so the files of every layer (`pool.rs`, `acme.rs`, `command.rs`) can use them.

use std::collections::BTreeSet;

/// Most ports an app may declare; keeps entries small and routing tables bounded.
pub const MAX_APP_PORTS: usize = 64;
/// Longest PEM chain or encrypted key accepted in one certificate entry. Raft values stay well
/// under sled's comfortable 128 KiB.
pub const MAX_CERT_BYTES: usize = 64 * 1024;
/// Longest name accepted for regions and instance ids.
const MAX_NAME_LEN: usize = 63;

/// Why a command was refused before it was proposed.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum ValidationError {
    #[error("invalid app name {0:?}: use 1-63 lowercase letters, digits and '-', not starting or ending with '-', and not ending in '-<digits>' (that reads as a port)")]
    AppName(String),
    #[error("invalid port list {0:?}: give 1-64 distinct ports in 1-65535")]
    Ports(Vec<u16>),
    #[error("invalid load-balancing policy {0:?}: expected round-robin, least-conn, hash:ip, hash:header=NAME, hash:cookie=NAME, geo or geo+METHOD")]
    Lb(String),
    #[error("invalid {field} {value:?}: {reason}")]
    Field {
        field: &'static str,
        value: String,
        reason: &'static str,
    },
    #[error("batch nests another batch")]
    NestedBatch,
}

pub(super) fn field(
    field: &'static str,
    value: impl Into<String>,
    reason: &'static str,
) -> ValidationError {
    ValidationError::Field {
        field,
        value: value.into(),
        reason,
    }
}

/// A DNS label as used in `<app>.<base>`.
pub(super) fn is_dns_label(s: &str) -> bool {
    !s.is_empty()
        && s.len() <= 63
        && s.bytes()
            .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'-')
        && !s.starts_with('-')
        && !s.ends_with('-')
}

/// App names share the first label with `<app>-<port>[s|g]`, so a name whose last `-` segment
/// looks like a port would be ambiguous.
pub fn validate_app_name(name: &str) -> Result<(), ValidationError> {
    if !is_dns_label(name) {
        return Err(ValidationError::AppName(name.to_string()));
    }
    if let Some((_, tail)) = name.rsplit_once('-') {
        let digits = tail.trim_end_matches(['s', 'g']);
        if !digits.is_empty() && digits.bytes().all(|b| b.is_ascii_digit()) {
            return Err(ValidationError::AppName(name.to_string()));
        }
    }
    Ok(())
}

pub fn validate_ports(ports: &[u16]) -> Result<(), ValidationError> {
    let distinct: BTreeSet<u16> = ports.iter().copied().collect();
    if ports.is_empty()
        || ports.len() > MAX_APP_PORTS
        || distinct.len() != ports.len()
        || distinct.contains(&0)
    {
        return Err(ValidationError::Ports(ports.to_vec()));
    }
    Ok(())
}

/// The policy grammar is owned by the `geo` crate, which also interprets it; one parser keeps
/// what the log accepts and what the data plane understands the same.
pub fn validate_lb(lb: &str) -> Result<(), ValidationError> {
    lb.parse::<portcullis_geo::LbPolicy>()
        .map(|_| ())
        .map_err(|_| ValidationError::Lb(lb.to_string()))
}

pub(super) fn validate_name(f: &'static str, s: &str) -> Result<(), ValidationError> {
    if s.is_empty() || s.len() > MAX_NAME_LEN {
        return Err(field(f, s, "must be 1-63 characters"));
    }
    if !s
        .bytes()
        .all(|b| b.is_ascii_alphanumeric() || b == b'-' || b == b'_' || b == b'.')
    {
        return Err(field(
            f,
            s,
            "only letters, digits, '-', '_' and '.' are allowed",
        ));
    }
    Ok(())
}

pub(super) fn validate_domain_name(s: &str) -> Result<(), ValidationError> {
    let ok = s.len() <= 253
        && s.contains('.')
        && s.split('.')
            .enumerate()
            .all(|(i, l)| (i == 0 && l == "*") || is_dns_label(l));
    if ok {
        Ok(())
    } else {
        Err(field("domain", s, "must be a lowercase DNS name"))
    }
}

pub(super) fn validate_coords(lat: f64, lon: f64) -> Result<(), ValidationError> {
    if !(-90.0..=90.0).contains(&lat) {
        return Err(field(
            "latitude",
            lat.to_string(),
            "must be within -90..=90",
        ));
    }
    if !(-180.0..=180.0).contains(&lon) {
        return Err(field(
            "longitude",
            lon.to_string(),
            "must be within -180..=180",
        ));
    }
    Ok(())
}

/// The checks shared by both registration shapes.
pub(super) fn validate_instance(
    id: &str,
    app: &str,
    region: &str,
    key: &str,
) -> Result<(), ValidationError> {
    validate_name("instance_id", id)?;
    validate_app_name(app)?;
    validate_name("region", region)?;
    if key.len() > 64 {
        return Err(field("wg_public_key", key, "must be a base64 32-byte key"));
    }
    Ok(())
}
