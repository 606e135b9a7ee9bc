//! Per-key linearizability checker for chaos-run histories (Wing–Gong–Lowe search with
//! memoization, as in Knossos and Porcupine).
//!
//! Owns the register model a chaos run records (a history of [`Event`]s: [`Op`]s and their
//! [`Outcome`]s), the check of such a history key by key ([`check_history`] and its variants),
//! and what a check returns ([`CheckResult`], with a [`Failure`] report for every bad key). The
//! chaos workload records histories in these types; the chaos run checks them.
//!
//! Imports: std and serde only, nothing else of this crate, so the checker is tested without a
//! cluster. Outside this folder everything goes through the names re-exported here; the files
//! are private. Inside, `history` and `model` are leaves, `search` uses `model`, `report` uses
//! `history` and `model`, and `check` ties them together.
//!
//! Layout:
//! - `history`: the history model (operations, outcomes, events) and its split into per-key
//!   operations.
//! - `check`: the entry points; per key, the model is built, searched and, on failure,
//!   explained.
//! - `model`: one key's operations as the search sees them: interned values, operation kinds
//!   and the register's transition, classes of interchangeable indeterminate operations.
//! - `search`: the Wing–Gong–Lowe search with memoization and its reductions; its doc gives the
//!   algorithm and its complexity.
//! - `report`: verdicts and results, and the explanation of a failure (the shortest
//!   non-linearizable prefix, the stuck operation, the values the register could hold).
//! - `tests`: unit tests through the re-exported names only, among them a cross-check with a
//!   brute-force enumeration on thousands of random histories.

mod check;
mod history;
mod model;
mod report;
mod search;
#[cfg(test)]
mod tests;

pub use check::{
    check_history, check_history_with, check_history_with_final_state, final_value_consistent,
    CheckOptions,
};
pub use history::{sort_by_time, Event, Op, OpResult, Outcome, ProcessId};
pub use report::{CheckResult, Failure, KeyResult, Verdict};
