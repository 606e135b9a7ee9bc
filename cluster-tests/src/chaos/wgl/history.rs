//! The history model: what the clients record ([`Event`]s of [`Op`]s and their
//! [`Outcome`]s), and its split into per-key operations for the check.
//!
//! # Model
//!
//! Every key is an independent register holding `Option<String>` (initially absent) with three
//! operations, exactly as the cluster's state machine serves them:
//!
//! - [`Op::Read`] returns the current value;
//! - [`Op::Write`] sets the value unconditionally;
//! - [`Op::Cas`] sets `new` if the current value is `Some(expect)` and returns `true`, otherwise
//!   changes nothing and returns `false` (so a CAS on an absent key fails).
//!
//! A history is the list of [`Event`]s recorded by the clients: an [`Event::Invoke`] when a
//! process sends a request and an [`Event::Complete`] when it learns the outcome. The order of the
//! slice is the real-time order (record events under one lock, or call [`sort_by_time`] first if
//! every recorder used the same monotonic clock). Each process has at most one operation in
//! flight. An outcome is
//!
//! - [`Outcome::Ok`]: the operation took effect exactly once, between invoke and completion, with
//!   this result (a CAS that returned `false` is an `Ok(Cas(false))`);
//! - [`Outcome::Fail`]: the operation definitely did not take effect (the server rejected it
//!   without applying it);
//! - [`Outcome::Info`]: indeterminate (a timeout). The operation may take effect at any point
//!   after its invocation — even long after the client gave up — or never. An invocation without
//!   a completion at the end of the history is treated the same way.
//!
//! Because registers on different keys do not interact, a history is linearizable iff its
//! restriction to every key is (linearizability is local), so [`check_history`](super::check_history)
//! partitions by key.

use std::collections::{BTreeMap, HashMap};

use serde::{Deserialize, Serialize};

/// Identifies one client process. A process has at most one operation in flight; after an
/// indeterminate completion it may issue its next operation under the same id.
pub type ProcessId = u64;

/// An operation on one key.
#[derive(Debug, Clone, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(tag = "kind", rename_all = "snake_case")]
pub enum Op {
    /// Read the current value.
    Read { key: String },
    /// Set the value unconditionally.
    Write { key: String, value: String },
    /// Set `new` if the current value is `Some(expect)`.
    Cas {
        key: String,
        expect: String,
        new: String,
    },
}

impl Op {
    /// The key the operation acts on.
    pub fn key(&self) -> &str {
        match self {
            Op::Read { key } | Op::Write { key, .. } | Op::Cas { key, .. } => key,
        }
    }
}

/// The result of an operation that took effect.
#[derive(Debug, Clone, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum OpResult {
    /// A read's value (`None`: the key is absent).
    Read(Option<String>),
    /// A write was applied.
    Write,
    /// Whether a CAS swapped the value.
    Cas(bool),
}

/// How an operation ended, from the client's point of view.
#[derive(Debug, Clone, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Outcome {
    /// Took effect once, with this result.
    Ok(OpResult),
    /// Definitely did not take effect.
    Fail,
    /// Indeterminate: may take effect at any time after its invocation, or never.
    Info,
}

/// One entry of a recorded history.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "type", rename_all = "snake_case")]
pub enum Event {
    /// `process` sent `op` at `time_ns`.
    Invoke {
        time_ns: u64,
        process: ProcessId,
        op: Op,
    },
    /// `process` learned the outcome of its pending operation at `time_ns`.
    Complete {
        time_ns: u64,
        process: ProcessId,
        outcome: Outcome,
    },
}

impl Event {
    pub fn invoke(time_ns: u64, process: ProcessId, op: Op) -> Self {
        Event::Invoke {
            time_ns,
            process,
            op,
        }
    }

    pub fn complete(time_ns: u64, process: ProcessId, outcome: Outcome) -> Self {
        Event::Complete {
            time_ns,
            process,
            outcome,
        }
    }

    pub fn time_ns(&self) -> u64 {
        match self {
            Event::Invoke { time_ns, .. } | Event::Complete { time_ns, .. } => *time_ns,
        }
    }

    pub fn process(&self) -> ProcessId {
        match self {
            Event::Invoke { process, .. } | Event::Complete { process, .. } => *process,
        }
    }
}

/// Stable sort by timestamp, for histories whose recorders appended out of order but stamped
/// events from one monotonic clock. Events with equal timestamps keep their recorded order.
pub fn sort_by_time(events: &mut [Event]) {
    events.sort_by_key(Event::time_ns);
}

/// One operation as recorded, with its effective outcome.
#[derive(Debug, Clone)]
pub(super) struct RawOp {
    pub(super) process: ProcessId,
    pub(super) op: Op,
    pub(super) invoke_index: usize,
    pub(super) invoke_time: u64,
    /// (event index, time) of the completion, if any.
    pub(super) completion: Option<(usize, u64)>,
    /// `Info` also for operations that never completed or completed with a mismatched result.
    pub(super) outcome: Outcome,
}

pub(super) struct Partition {
    pub(super) per_key: BTreeMap<String, Vec<RawOp>>,
    pub(super) errors: Vec<String>,
}

/// Splits the history into per-key operations, each with its effective outcome, sorted by
/// invocation; malformed-history problems are collected, not fatal.
pub(super) fn partition(events: &[Event]) -> Partition {
    let mut pending: HashMap<ProcessId, RawOp> = HashMap::new();
    let mut per_key: BTreeMap<String, Vec<RawOp>> = BTreeMap::new();
    let mut errors = Vec::new();
    let mut finish = |op: RawOp| per_key.entry(op.op.key().to_string()).or_default().push(op);
    for (idx, ev) in events.iter().enumerate() {
        match ev {
            Event::Invoke {
                time_ns,
                process,
                op,
            } => {
                if let Some(prev) = pending.remove(process) {
                    errors.push(format!(
                        "event {idx}: process {process} invoked a new operation while its \
                         operation from event {} is pending (treated as indeterminate)",
                        prev.invoke_index
                    ));
                    finish(prev);
                }
                pending.insert(
                    *process,
                    RawOp {
                        process: *process,
                        op: op.clone(),
                        invoke_index: idx,
                        invoke_time: *time_ns,
                        completion: None,
                        outcome: Outcome::Info,
                    },
                );
            }
            Event::Complete {
                time_ns,
                process,
                outcome,
            } => match pending.remove(process) {
                None => errors.push(format!(
                    "event {idx}: process {process} completed with no operation pending (ignored)"
                )),
                Some(mut raw) => {
                    let fits = matches!(
                        (&raw.op, outcome),
                        (_, Outcome::Fail | Outcome::Info)
                            | (Op::Read { .. }, Outcome::Ok(OpResult::Read(_)))
                            | (Op::Write { .. }, Outcome::Ok(OpResult::Write))
                            | (Op::Cas { .. }, Outcome::Ok(OpResult::Cas(_)))
                    );
                    raw.completion = Some((idx, *time_ns));
                    if fits {
                        raw.outcome = outcome.clone();
                    } else {
                        errors.push(format!(
                            "event {idx}: process {process} completed {:?} with {outcome:?} \
                             (treated as indeterminate)",
                            raw.op
                        ));
                    }
                    finish(raw);
                }
            },
        }
    }
    for (_, raw) in pending {
        finish(raw);
    }
    for ops in per_key.values_mut() {
        ops.sort_by_key(|o| o.invoke_index);
    }
    Partition { per_key, errors }
}
