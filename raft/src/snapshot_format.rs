//! The bytes of a snapshot: a header naming the format, then the bincode of [`Applied`].
//!
//! Snapshots travel between nodes (InstallSnapshot) and outlive the binary that wrote them, so a
//! node must be able to tell "a snapshot from a newer build" from "corrupt bytes" and say which.
//! Log entries need no header: `Command` variants are only ever appended, so older entries keep
//! their encoding. The state's shape can change, and then the version here goes up.

use crate::store::Applied;

/// Start of every snapshot written by this build. A header-less snapshot (bincode of
/// `Applied`) starts with an `Option` tag, 0 or 1, never `P`, so the two cannot be confused.
const MAGIC: &[u8; 6] = b"PCSNAP";
/// The format this build writes and reads.
pub const FORMAT_VERSION: u16 = 1;

#[derive(Debug, thiserror::Error)]
pub enum SnapshotFormatError {
    #[error("snapshot format {found} is newer than this build reads ({FORMAT_VERSION}): upgrade portcullis on this node")]
    Newer { found: u16 },
    #[error("snapshot format {0} is unknown")]
    Unknown(u16),
    #[error("snapshot header is truncated")]
    Truncated,
    #[error("snapshot body does not decode: {0}")]
    Body(String),
    #[error("snapshot has no format header and is not a snapshot of an earlier build: {0}")]
    Legacy(String),
}

pub fn encode(applied: &Applied) -> Result<Vec<u8>, bincode::Error> {
    let body = bincode::serialize(applied)?;
    let mut out = Vec::with_capacity(MAGIC.len() + 2 + body.len());
    out.extend_from_slice(MAGIC);
    out.extend_from_slice(&FORMAT_VERSION.to_le_bytes());
    out.extend_from_slice(&body);
    Ok(out)
}

pub fn decode(data: &[u8]) -> Result<Applied, SnapshotFormatError> {
    let Some(rest) = data.strip_prefix(MAGIC.as_slice()) else {
        // Written before the header existed: readable while the state's shape is unchanged.
        return bincode::deserialize(data).map_err(|e| SnapshotFormatError::Legacy(e.to_string()));
    };
    let (version, body) = match rest {
        [a, b, body @ ..] => (u16::from_le_bytes([*a, *b]), body),
        _ => return Err(SnapshotFormatError::Truncated),
    };
    match version {
        FORMAT_VERSION => {
            bincode::deserialize(body).map_err(|e| SnapshotFormatError::Body(e.to_string()))
        }
        v if v > FORMAT_VERSION => Err(SnapshotFormatError::Newer { found: v }),
        v => Err(SnapshotFormatError::Unknown(v)),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::state::Command;

    fn sample() -> Applied {
        let mut a = Applied::default();
        a.state.apply(
            1,
            &Command::CreateApp {
                name: "web".into(),
                ports: vec![80],
                lb: "round-robin".into(),
            },
        );
        a
    }

    #[test]
    fn round_trip_and_legacy() {
        let a = sample();
        let bytes = encode(&a).expect("encode");
        assert!(bytes.starts_with(b"PCSNAP\x01\x00"));
        let back = decode(&bytes).expect("decode");
        assert_eq!(back.state, a.state);
        // A snapshot from before the header: the bare bincode still reads.
        let legacy = bincode::serialize(&a).expect("legacy");
        assert_eq!(decode(&legacy).expect("legacy decode").state, a.state);
    }

    #[test]
    fn newer_truncated_and_garbage_are_told_apart() {
        let mut bytes = encode(&sample()).expect("encode");
        bytes[6..8].copy_from_slice(&7u16.to_le_bytes());
        let e = decode(&bytes).expect_err("newer");
        assert!(matches!(e, SnapshotFormatError::Newer { found: 7 }));
        assert!(e.to_string().contains("upgrade"), "{e}");
        assert!(matches!(
            decode(b"PCSNAP\x01"),
            Err(SnapshotFormatError::Truncated)
        ));
        assert!(matches!(
            decode(b"PCSNAP\x00\x00"),
            Err(SnapshotFormatError::Unknown(0))
        ));
        assert!(matches!(
            decode(b"PCSNAP\x01\x00\xff\xff"),
            Err(SnapshotFormatError::Body(_))
        ));
        assert!(decode(&[0xff; 3]).is_err());
    }
}
