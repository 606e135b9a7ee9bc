//! The configuration's error type. A leaf: every section's `validate()` (`dns`, `acme`, the
//! edge's) returns it without importing the whole configuration, which imports them.

use std::path::PathBuf;

#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    #[error("cannot read config {path}: {source}")]
    Read {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("invalid config {path}: {message}")]
    Parse { path: PathBuf, message: String },
    #[error("invalid config: field `{field}`: {reason}")]
    Field { field: &'static str, reason: String },
}

/// A field's error: its dotted name and why it is wrong.
pub fn bad(field: &'static str, reason: impl Into<String>) -> ConfigError {
    ConfigError::Field {
        field,
        reason: reason.into(),
    }
}
