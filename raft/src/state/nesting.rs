//! A bound on how deeply `Command::Batch` and `Response::Batch` nest when decoded.
//!
//! Decoding recurses once per level, so a message of nested batches (12 bytes a level) would
//! overflow a thread's stack long before it reached the cluster port's size cap: about 10,000
//! levels, 120 KB, did in the `raft_payload` fuzz target (docs/fuzzing.md). Every decoder of a
//! peer's message, a forwarded write or a log entry goes through these two fields.
//!
//! `Command::validate` refuses any batch inside a batch and the batcher never proposes one, so
//! no entry a node writes nests at all; the bound only stops hostile bytes. The encoding does
//! not change.

use std::cell::Cell;

use serde::{Deserialize, Deserializer};

/// Deepest nesting decoded. A batch at the top is depth 1.
pub const MAX_BATCH_DEPTH: u32 = 8;

thread_local! {
    /// Batches being decoded on this thread, outermost first.
    static DEPTH: Cell<u32> = const { Cell::new(0) };
}

/// Restores the depth however decoding ends.
struct Level(u32);

impl Drop for Level {
    fn drop(&mut self) {
        DEPTH.with(|d| d.set(self.0));
    }
}

/// `deserialize_with` for a batch's items: a `Vec<T>`, refused below `MAX_BATCH_DEPTH`.
pub(super) fn batch<'de, D, T>(d: D) -> Result<Vec<T>, D::Error>
where
    D: Deserializer<'de>,
    T: Deserialize<'de>,
{
    let depth = DEPTH.with(Cell::get);
    if depth >= MAX_BATCH_DEPTH {
        return Err(serde::de::Error::custom(format!(
            "batch nested deeper than {MAX_BATCH_DEPTH}"
        )));
    }
    let _restore = Level(depth);
    DEPTH.with(|d| d.set(depth + 1));
    Vec::<T>::deserialize(d)
}

#[cfg(test)]
mod tests {
    use super::MAX_BATCH_DEPTH;
    use crate::state::{Command, Response};

    /// `depth` batches around one `RemoveNode`, encoded by hand as bincode writes them:
    /// variant index (u32), then the batch's length (u64).
    fn nested(depth: usize) -> Vec<u8> {
        let mut b = Vec::with_capacity(depth * 12 + 12);
        for _ in 0..depth {
            b.extend_from_slice(&14u32.to_le_bytes());
            b.extend_from_slice(&1u64.to_le_bytes());
        }
        b.extend_from_slice(&1u32.to_le_bytes());
        b.extend_from_slice(&0u64.to_le_bytes());
        b
    }

    #[test]
    fn the_hand_encoding_matches_bincode() {
        let cmd = Command::Batch(vec![Command::Batch(vec![Command::RemoveNode { id: 0 }])]);
        assert_eq!(bincode::serialize(&cmd).expect("encodes"), nested(2));
    }

    #[test]
    fn nesting_is_decoded_up_to_the_bound_and_refused_past_it() {
        let ok: Command = bincode::deserialize(&nested(MAX_BATCH_DEPTH as usize)).expect("decodes");
        assert_eq!(
            bincode::serialize(&ok).expect("encodes"),
            nested(MAX_BATCH_DEPTH as usize)
        );
        let err = bincode::deserialize::<Command>(&nested(MAX_BATCH_DEPTH as usize + 1))
            .expect_err("too deep");
        assert!(err.to_string().contains("nested deeper"), "{err}");
        // The depth is per decode: the next one starts from zero again.
        let _: Command = bincode::deserialize(&nested(MAX_BATCH_DEPTH as usize)).expect("decodes");
        let _: Command = bincode::deserialize(&nested(1)).expect("decodes");
    }

    /// The input the fuzz target crashed on (as 100,000 levels): decoded on a thread with a
    /// tokio worker's 2 MiB stack, it is an error, not a stack overflow.
    #[test]
    fn deep_nesting_is_an_error_not_a_stack_overflow() {
        let bytes = nested(100_000);
        let result = std::thread::Builder::new()
            .stack_size(2 << 20)
            .spawn(move || {
                let cmd = bincode::deserialize::<Command>(&bytes).map(|_| ());
                // Responses nest the same way (variant 5 is `Response::Batch`).
                let mut r = Vec::new();
                for _ in 0..100_000 {
                    r.extend_from_slice(&5u32.to_le_bytes());
                    r.extend_from_slice(&1u64.to_le_bytes());
                }
                r.extend_from_slice(&0u32.to_le_bytes());
                let resp = bincode::deserialize::<Response>(&r).map(|_| ());
                (cmd.is_err(), resp.is_err())
            })
            .expect("spawn")
            .join()
            .expect("no panic");
        assert_eq!(result, (true, true));
    }
}
