#![no_main]
//! Raft payloads from bytes, as the log store reads entries back from disk and the cluster
//! service decodes peers' messages (bincode): a log entry, a bare `Command`, an AppendEntries
//! request, a forwarded write, a snapshot. Decoding answers an error rather than panics; what
//! decodes encodes back to the same bytes; every decoded command is applied to a fresh state,
//! which must not panic and, when it refuses the command, must leave the state unchanged.
use libfuzzer_sys::fuzz_target;
use openraft::raft::AppendEntriesRequest;
use openraft::EntryPayload;
use portcullis_raft::cluster::ForwardRequest;
use portcullis_raft::snapshot_format;
use portcullis_raft::types::Entry;
use portcullis_raft::{ClusterState, Command, Response, TypeConfig};
use serde::{de::DeserializeOwned, Serialize};

/// Decodes like `raft::network::decode` and `raft::store` do. What decodes encodes, and that
/// encoding decodes to a value with the same encoding. (Not always the input's bytes: a map
/// with repeated or unsorted keys decodes to a sorted map without the repeats.)
fn decode<T: Serialize + DeserializeOwned>(bytes: &[u8]) -> Option<T> {
    let v: T = bincode::deserialize(bytes).ok()?;
    let encoded = bincode::serialize(&v).expect("a decoded value encodes");
    let again: T = bincode::deserialize(&encoded).expect("an encoded value decodes");
    assert_eq!(bincode::serialize(&again).expect("encodes"), encoded);
    Some(v)
}

fn state_bytes(s: &ClusterState) -> Vec<u8> {
    bincode::serialize(s).expect("state encodes")
}

fn apply(cmd: &Command) {
    let mut state = ClusterState::default();
    let before = state_bytes(&state);
    let first = state.apply(1, cmd);
    if cmd.validate().is_err() || matches!(first, Response::Rejected(_)) {
        assert!(matches!(first, Response::Rejected(_)), "{first:?}");
        assert_eq!(
            state_bytes(&state),
            before,
            "a refused command changes nothing"
        );
        return;
    }
    // The same command again, now against the state it made (duplicates, renewals).
    let before = state_bytes(&state);
    if let Response::Rejected(_) = state.apply(2, cmd) {
        assert_eq!(
            state_bytes(&state),
            before,
            "a refused command changes nothing"
        );
    }
}

fn entry(e: &Entry) {
    if let EntryPayload::Normal(cmd) = &e.payload {
        apply(cmd);
    }
}

fuzz_target!(|data: &[u8]| {
    let Some((&kind, bytes)) = data.split_first() else {
        return;
    };
    match kind % 5 {
        0 => {
            if let Some(cmd) = decode::<Command>(bytes) {
                apply(&cmd);
            }
        }
        1 => {
            if let Some(e) = decode::<Entry>(bytes) {
                entry(&e);
            }
        }
        2 => {
            if let Some(req) = decode::<AppendEntriesRequest<TypeConfig>>(bytes) {
                req.entries.iter().for_each(entry);
            }
        }
        3 => {
            if let Some(ForwardRequest::Write(cmd)) = decode::<ForwardRequest>(bytes) {
                apply(&cmd);
            }
        }
        _ => {
            if let Ok(applied) = snapshot_format::decode(bytes) {
                let again = snapshot_format::encode(&applied).expect("encodes");
                let back = snapshot_format::decode(&again).expect("this build reads its own");
                assert_eq!(snapshot_format::encode(&back).expect("encodes"), again);
            }
        }
    }
});
