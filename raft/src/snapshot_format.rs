//! The bytes of a snapshot: a header naming the format, then the bincode of [`Applied`].
//!
//! Snapshots travel between nodes (InstallSnapshot) and outlive the binary that wrote them, so a
//! node must be able to tell "a snapshot from a newer build" from "corrupt bytes" and say which.
//! Log entries need no header: `Command` variants are only ever appended, so older entries keep
//! their encoding. The state's shape can change, and then the version here goes up.
//!
//! Formats:
//! - 1: `Applied` holding a [`ClusterStateV1`] (IPv4-only tunnel addresses and pool).
//! - 2: `Applied` holding a [`ClusterStateV2`] (IPv4 or IPv6 tunnel addresses and pool).
//! - 3: `Applied` holding today's `ClusterState` (WAF policies).
//!
//! Header-less snapshots (before the header existed) have the format-1 shape.

use serde::{Deserialize, Serialize};

use crate::state::{ClusterState, ClusterStateV1, ClusterStateV2};
use crate::types::{LogId, StoredMembership};

/// What the state machine holds, and what a snapshot carries: the applied position and the
/// cluster state. Defined beside its encoding; the store (`store.rs`) re-exports it.
#[derive(Debug, Clone, Default, Serialize, Deserialize)]
pub struct Applied {
    pub last_applied: Option<LogId>,
    pub last_membership: StoredMembership,
    pub state: ClusterState,
}

/// Start of every snapshot written by this build. A header-less snapshot (bincode of
/// `Applied`) starts with an `Option` tag, 0 or 1, never `P`, so the two cannot be confused.
const MAGIC: &[u8; 6] = b"PCSNAP";
/// The format this build writes and reads.
pub const FORMAT_VERSION: u16 = 3;

/// The first format this build still reads.
const FORMAT_V1: u16 = 1;
const FORMAT_V2: u16 = 2;

/// `Applied` as formats 0 (header-less) and 1 stored it. Frozen: see `state::legacy`.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct AppliedV1 {
    pub last_applied: Option<LogId>,
    pub last_membership: StoredMembership,
    pub state: ClusterStateV1,
}

/// `Applied` as format 2 stored it. Frozen: see `state::legacy`.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct AppliedV2 {
    pub last_applied: Option<LogId>,
    pub last_membership: StoredMembership,
    pub state: ClusterStateV2,
}

impl From<AppliedV2> for Applied {
    fn from(a: AppliedV2) -> Self {
        Applied {
            last_applied: a.last_applied,
            last_membership: a.last_membership,
            state: a.state.into(),
        }
    }
}

impl From<AppliedV1> for Applied {
    fn from(a: AppliedV1) -> Self {
        Applied {
            last_applied: a.last_applied,
            last_membership: a.last_membership,
            state: a.state.into(),
        }
    }
}

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
        // Written before the header existed, in the format-1 shape.
        return bincode::deserialize::<AppliedV1>(data)
            .map(Applied::from)
            .map_err(|e| SnapshotFormatError::Legacy(e.to_string()));
    };
    let (version, body) = match rest {
        [a, b, body @ ..] => (u16::from_le_bytes([*a, *b]), body),
        _ => return Err(SnapshotFormatError::Truncated),
    };
    match version {
        FORMAT_VERSION => {
            bincode::deserialize(body).map_err(|e| SnapshotFormatError::Body(e.to_string()))
        }
        FORMAT_V2 => bincode::deserialize::<AppliedV2>(body)
            .map(Applied::from)
            .map_err(|e| SnapshotFormatError::Body(e.to_string())),
        FORMAT_V1 => bincode::deserialize::<AppliedV1>(body)
            .map(Applied::from)
            .map_err(|e| SnapshotFormatError::Body(e.to_string())),
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
    fn round_trip_with_an_ipv6_pool() {
        let mut a = sample();
        let pool = Command::SetTunnelPool {
            base: "fd00:1::".parse().expect("ip"),
            prefix_len: 64,
        };
        assert_eq!(a.state.apply(2, &pool), crate::state::Response::Ok);
        let reg = Command::RegisterInstanceV2(crate::state::Instance {
            instance_id: "web-1".into(),
            app: "web".into(),
            region: "r".into(),
            wg_public_key: "k".into(),
            ..Default::default()
        });
        a.state.apply(3, &reg);
        let bytes = encode(&a).expect("encode");
        assert!(bytes.starts_with(b"PCSNAP\x03\x00"));
        let back = decode(&bytes).expect("decode");
        assert_eq!(back.state, a.state);
        assert_eq!(
            back.state.instances["web-1"].tunnel_ip,
            Some("fd00:1::1".parse().expect("ip"))
        );
    }

    /// A format-1 state as an older build wrote it: built from the frozen legacy structs.
    fn v1_applied() -> AppliedV1 {
        use crate::state::{InstanceV1, TunnelPoolV1};
        let a = sample();
        let inst = InstanceV1 {
            instance_id: "web-7".into(),
            app: "web".into(),
            region: "r".into(),
            wg_public_key: "k7".into(),
            tunnel_ip: Some(std::net::Ipv4Addr::new(100, 64, 0, 7)),
            backend_addr: None,
            registered_at: 42,
        };
        AppliedV1 {
            last_applied: a.last_applied,
            last_membership: a.last_membership.clone(),
            state: ClusterStateV1 {
                nodes: a.state.nodes.clone(),
                regions: a.state.regions.clone(),
                apps: a.state.apps.clone(),
                domains: a.state.domains.clone(),
                certificates: a.state.certificates.clone(),
                instances: [("web-7".to_string(), inst)].into_iter().collect(),
                tunnel_pool: TunnelPoolV1 {
                    base: std::net::Ipv4Addr::new(100, 64, 0, 0),
                    prefix_len: 10,
                    next_offset: 7,
                    free: [3u32, 5].into_iter().collect(),
                },
                registers: a.state.registers.clone(),
                acme: a.state.acme.clone(),
                instance_weights: [("web-7".to_string(), 3)].into_iter().collect(),
            },
        }
    }

    fn assert_converted(back: &Applied) {
        let i = &back.state.instances["web-7"];
        assert_eq!(i.tunnel_ip, Some("100.64.0.7".parse().expect("ip")));
        assert_eq!(i.registered_at, 42);
        assert_eq!(back.state.instance_weights["web-7"], 3);
        assert!(back.state.apps.contains_key("web"));
        let pool = &back.state.tunnel_pool;
        assert_eq!(pool.to_string(), "100.64.0.0/10");
        assert_eq!(pool.next_offset, 7);
        assert_eq!(pool.free.iter().copied().collect::<Vec<_>>(), vec![3, 5]);
        // The converted pool keeps allocating where the old one stopped: freed offsets first.
        let mut s = back.state.clone();
        let r = s.apply(
            9,
            &Command::RegisterInstanceV2(crate::state::Instance {
                instance_id: "web-8".into(),
                app: "web".into(),
                region: "r".into(),
                ..Default::default()
            }),
        );
        match r {
            crate::state::Response::InstanceV2(i) => {
                assert_eq!(i.tunnel_ip, Some("100.64.0.3".parse().expect("ip")))
            }
            other => panic!("unexpected {other:?}"),
        }
    }

    #[test]
    fn format_1_snapshots_decode_and_convert() {
        let v1 = v1_applied();
        let mut bytes = b"PCSNAP\x01\x00".to_vec();
        bytes.extend(bincode::serialize(&v1).expect("v1 body"));
        assert_converted(&decode(&bytes).expect("format 1"));
    }

    #[test]
    fn header_less_snapshots_decode_as_format_1() {
        let legacy = bincode::serialize(&v1_applied()).expect("legacy");
        assert_converted(&decode(&legacy).expect("legacy decode"));
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
        assert!(matches!(
            decode(b"PCSNAP\x02\x00\xff\xff"),
            Err(SnapshotFormatError::Body(_))
        ));
        assert!(decode(&[0xff; 3]).is_err());
    }
}
