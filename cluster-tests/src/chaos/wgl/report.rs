//! What a check returns: the verdict and the figures for every key, the result for the whole
//! history, and the explanation of a failure.
//!
//! # Failure reports
//!
//! When a key is not linearizable the search remembers the furthest completion it could not get
//! past, over all orders it tried. The events up to and including that completion (restricted to
//! the key) form the shortest non-linearizable prefix of the history: every shorter prefix is
//! linearizable. The report names that operation, the values the register could hold when it had
//! to take effect, the operations concurrent with it and the ones that completed just before it.

use std::collections::{BTreeMap, BTreeSet};
use std::fmt;

use serde::{Deserialize, Serialize};

use super::history::{Op, OpResult, Outcome, RawOp};
use super::model::{step, ReqOp, Values, INF};

/// The verdict for one key.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Verdict {
    Linearizable,
    NotLinearizable,
    /// The search budget ran out before a verdict.
    Unknown,
}

impl fmt::Display for Verdict {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            Verdict::Linearizable => "linearizable",
            Verdict::NotLinearizable => "NOT linearizable",
            Verdict::Unknown => "unknown (search budget exhausted)",
        })
    }
}

/// Why a key is not linearizable (or where the search stopped, for [`Verdict::Unknown`]).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Failure {
    /// Index (into the checked event slice) of the completion that no linearization gets past.
    /// `None` when all operations linearize but no linearization produces the final value.
    pub event_index: Option<usize>,
    /// `events[..prefix_len]`, restricted to this key, is the shortest prefix of the history that
    /// is not linearizable (for `Unknown`: the furthest point the search reached).
    pub prefix_len: usize,
    /// The operation that could not be linearized.
    pub operation: Option<String>,
    /// The values the register could hold when that operation had to take effect (or, for a
    /// final-value failure, the final values some linearization produces).
    pub possible_values: Vec<String>,
    /// Operations on the key concurrent with that point (invoked before it, not completed).
    pub concurrent: Vec<String>,
    /// Human-readable summary of all of the above.
    pub explanation: String,
}

/// The result for one key.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct KeyResult {
    pub verdict: Verdict,
    /// Operations on the key in the history.
    pub operations: usize,
    /// Of those, indeterminate ones (timed out, or never completed).
    pub indeterminate: usize,
    /// Of those, ones that definitely did not take effect.
    pub failed: usize,
    /// Search configurations explored.
    pub configurations: u64,
    /// Set unless the verdict is `Linearizable`.
    pub failure: Option<Failure>,
}

impl KeyResult {
    pub fn is_ok(&self) -> bool {
        self.verdict == Verdict::Linearizable
    }
}

/// The result for a whole history.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct CheckResult {
    /// Every key is linearizable and the history is well formed.
    pub ok: bool,
    pub per_key: BTreeMap<String, KeyResult>,
    /// Malformed-history problems (a completion with no pending invocation, a process invoking
    /// twice, an outcome of the wrong kind). These make `ok` false: they are harness bugs.
    pub history_errors: Vec<String>,
}

impl CheckResult {
    /// Keys whose verdict is not `Linearizable`.
    pub fn failures(&self) -> impl Iterator<Item = (&String, &KeyResult)> {
        self.per_key.iter().filter(|(_, r)| !r.is_ok())
    }

    /// A multi-line human-readable summary: counts, then every problem in full.
    pub fn report(&self) -> String {
        let ops: usize = self.per_key.values().map(|r| r.operations).sum();
        let mut out = format!(
            "linearizability: {} ({} keys, {} operations, {} keys failing, {} history errors)\n",
            if self.ok { "ok" } else { "FAILED" },
            self.per_key.len(),
            ops,
            self.failures().count(),
            self.history_errors.len()
        );
        for e in &self.history_errors {
            out.push_str(&format!("history error: {e}\n"));
        }
        for (_, r) in self.failures() {
            if let Some(f) = &r.failure {
                out.push_str(&f.explanation);
                out.push('\n');
            }
        }
        out
    }
}

/// The [`Failure`] of a key whose search ended without a linearization.
#[allow(clippy::too_many_arguments)]
pub(super) fn explain(
    key: &str,
    raw: &[RawOp],
    req: &[ReqOp],
    values: &Values,
    verdict: Verdict,
    best_r: Option<usize>,
    best_states: &BTreeSet<u32>,
    final_value: Option<Option<&str>>,
    configurations: u64,
) -> Failure {
    let r = best_r.unwrap_or(0);
    let stuck = req.iter().find(|q| q.ret == r);
    // The values in which the stuck operation is impossible (inside a run of indeterminate
    // operations the search may also have stopped in a value where it is possible, but only
    // after trying it in the value before the run).
    let mut states: Vec<u32> = best_states
        .iter()
        .copied()
        .filter(|&s| stuck.is_none_or(|q| step(q.kind, s).is_none()))
        .collect();
    if states.is_empty() {
        states = best_states.iter().copied().collect();
    }
    let possible_values: Vec<String> = states.iter().map(|&s| values.show(s)).collect();
    let possible = if possible_values.is_empty() {
        "(none)".to_string()
    } else {
        possible_values.join(", ")
    };
    let mut text = match verdict {
        Verdict::Unknown => format!(
            "key {key:?}: verdict unknown: the search budget ran out after {configurations} \
             configurations."
        ),
        _ => format!("key {key:?} is NOT linearizable."),
    };
    if best_r == Some(INF) {
        // Every operation linearizes; the final value is the problem.
        let fin = show_value(final_value.flatten());
        text.push_str(&format!(
            "\nEvery operation can be linearized, but no linearization leaves the final value \
             {fin}.\nFinal values some linearization produces: {possible}."
        ));
        let last: Vec<String> = raw
            .iter()
            .filter(|o| matches!(o.op, Op::Write { .. } | Op::Cas { .. }))
            .filter(|o| o.outcome != Outcome::Fail)
            .rev()
            .take(5)
            .map(describe)
            .collect();
        if !last.is_empty() {
            text.push_str("\nLast writes and CASes (most recent first):");
            for l in &last {
                text.push_str(&format!("\n  {l}"));
            }
        }
        return Failure {
            event_index: None,
            prefix_len: raw
                .iter()
                .map(|o| o.completion.map_or(o.invoke_index, |c| c.0) + 1)
                .max()
                .unwrap_or(0),
            operation: None,
            possible_values,
            concurrent: Vec::new(),
            explanation: text,
        };
    }
    let operation = stuck.map(|q| describe(&raw[q.raw]));
    let stuck_raw = stuck.map(|q| q.raw);
    let ops_in_prefix = raw.iter().filter(|o| o.invoke_index <= r).count();
    if let (Some(op), Verdict::Unknown) = (&operation, verdict) {
        text.push_str(&format!(
            "\nFurthest point reached: event {r} ({ops_in_prefix} operations on this key \
             invoked by then).\nNot yet linearized there: {op}\nValues the register could \
             hold there: {possible}."
        ));
    } else if let Some(op) = &operation {
        text.push_str(&format!(
            "\nShortest non-linearizable prefix: events[..={r}] ({ops_in_prefix} operations on \
             this key).\nCannot linearize: {op}\nWhen it must take effect, the register can only \
             hold: {possible}."
        ));
    } else {
        text.push_str(&format!("\nFurthest point reached: event {r}."));
    }
    let call = stuck.map_or(r, |q| q.call);
    let mut before: Vec<(usize, &RawOp)> = raw
        .iter()
        .filter(|o| matches!(o.outcome, Outcome::Ok(_)))
        .filter_map(|o| o.completion.filter(|c| c.0 < call).map(|c| (c.0, o)))
        .collect();
    before.sort_by_key(|&(c, _)| std::cmp::Reverse(c));
    let before: Vec<String> = before.iter().take(5).map(|(_, o)| describe(o)).collect();
    let mut concurrent_all: Vec<&RawOp> = raw
        .iter()
        .enumerate()
        .filter(|(i, o)| {
            Some(*i) != stuck_raw
                && o.outcome != Outcome::Fail
                && !(o.outcome == Outcome::Info && matches!(o.op, Op::Read { .. }))
                && o.invoke_index < r
                && (o.outcome == Outcome::Info || o.completion.is_none_or(|c| c.0 > call))
        })
        .map(|(_, o)| o)
        .collect();
    // Nearest first: with many timeouts, the ancient ones matter least.
    concurrent_all.sort_by_key(|o| std::cmp::Reverse(o.invoke_index));
    let concurrent: Vec<String> = concurrent_all
        .iter()
        .take(16)
        .map(|o| describe(o))
        .collect();
    if !before.is_empty() {
        text.push_str("\nLast operations acknowledged before it was invoked (most recent first):");
        for b in &before {
            text.push_str(&format!("\n  {b}"));
        }
    }
    if !concurrent.is_empty() {
        text.push_str(
            "\nConcurrent or indeterminate operations that could take effect around it \
             (latest first):",
        );
        for c in &concurrent {
            text.push_str(&format!("\n  {c}"));
        }
        if concurrent_all.len() > concurrent.len() {
            text.push_str(&format!(
                "\n  ... and {} more",
                concurrent_all.len() - concurrent.len()
            ));
        }
    }
    Failure {
        event_index: stuck.map(|q| q.ret),
        prefix_len: r + 1,
        operation,
        possible_values,
        concurrent,
        explanation: text,
    }
}

/// One line about a recorded operation: what it did, its result, and where it is in the
/// history.
fn describe(o: &RawOp) -> String {
    let what = match &o.op {
        Op::Read { .. } => "read".to_string(),
        Op::Write { value, .. } => format!("write {value:?}"),
        Op::Cas { expect, new, .. } => format!("cas {expect:?} -> {new:?}"),
    };
    let result = match &o.outcome {
        Outcome::Ok(OpResult::Read(v)) => format!("returned {}", show_value(v.as_deref())),
        Outcome::Ok(OpResult::Write) => "ok".to_string(),
        Outcome::Ok(OpResult::Cas(b)) => format!("returned {b}"),
        Outcome::Fail => "failed".to_string(),
        Outcome::Info => "indeterminate".to_string(),
    };
    let span = match o.completion {
        Some((ci, ct)) => format!(
            "events {}..={} (t={}..{} ns)",
            o.invoke_index, ci, o.invoke_time, ct
        ),
        None => format!(
            "invoked at event {} (t={} ns), never completed",
            o.invoke_index, o.invoke_time
        ),
    };
    format!("process {}: {what} {result} [{span}]", o.process)
}

fn show_value(v: Option<&str>) -> String {
    match v {
        Some(s) => format!("{s:?}"),
        None => "absent".to_string(),
    }
}
