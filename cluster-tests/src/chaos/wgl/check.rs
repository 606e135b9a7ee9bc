//! The entry points: split the history by key, and for each key build its model (interned
//! values, required operations, classes of indeterminate ones), search it, and explain a
//! failure.

use std::collections::{BTreeMap, BTreeSet, HashMap, HashSet};

use super::history::{partition, Event, Op, OpResult, Outcome, RawOp};
use super::model::{Class, Kind, ReqOp, Values, ABSENT, INF, UNOBSERVED};
use super::report::{explain, CheckResult, KeyResult, Verdict};
use super::search::{Search, SearchOutcome};

/// Search limits.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct CheckOptions {
    /// Per key, the most search configurations to explore before giving up with
    /// [`Verdict::Unknown`]. The memo table holds at most one entry (about 100 bytes) per
    /// configuration; the default bounds a key to a few hundred MB and tens of seconds.
    pub max_configurations: u64,
}

impl Default for CheckOptions {
    fn default() -> Self {
        CheckOptions {
            max_configurations: 2_000_000,
        }
    }
}

/// Checks that the history is linearizable, key by key, with the default budget.
pub fn check_history(events: &[Event]) -> CheckResult {
    check_history_with(events, &CheckOptions::default())
}

/// [`check_history`] with explicit search limits.
pub fn check_history_with(events: &[Event], opts: &CheckOptions) -> CheckResult {
    check_all(events, None, opts)
}

/// Checks the history and, for every key, that the value observed at the end of the run (for
/// example on every node after convergence) is produced by some linearization of that key's
/// operations. Keys missing from `final_state` are expected to be absent; keys in `final_state`
/// with no operation in the history must be absent (`None`).
pub fn check_history_with_final_state(
    events: &[Event],
    final_state: &BTreeMap<String, Option<String>>,
    opts: &CheckOptions,
) -> CheckResult {
    check_all(events, Some(final_state), opts)
}

/// Whether `final_value` is what the register `key` holds after some linearization of the
/// history's operations on `key` (`events` may contain other keys; they are ignored). False also
/// when the key's operations are not linearizable at all, or the verdict is unknown. An
/// acknowledged write lost at the end of the run shows up here.
pub fn final_value_consistent(events: &[Event], key: &str, final_value: Option<&str>) -> bool {
    let part = partition(events);
    let empty = Vec::new();
    let ops = part.per_key.get(key).unwrap_or(&empty);
    check_key(key, ops, Some(final_value), &CheckOptions::default()).is_ok()
}

fn check_all(
    events: &[Event],
    final_state: Option<&BTreeMap<String, Option<String>>>,
    opts: &CheckOptions,
) -> CheckResult {
    let part = partition(events);
    let mut per_key = BTreeMap::new();
    let empty = Vec::new();
    let mut keys: BTreeSet<&str> = part.per_key.keys().map(String::as_str).collect();
    if let Some(fs) = final_state {
        keys.extend(fs.keys().map(String::as_str));
    }
    for key in keys {
        let ops = part.per_key.get(key).unwrap_or(&empty);
        let fin = final_state.map(|fs| fs.get(key).and_then(|v| v.as_deref()));
        per_key.insert(key.to_string(), check_key(key, ops, fin, opts));
    }
    let ok = part.errors.is_empty() && per_key.values().all(KeyResult::is_ok);
    CheckResult {
        ok,
        per_key,
        history_errors: part.errors,
    }
}

/// The verdict for one key's operations (`raw`, sorted by invocation), optionally with the
/// value the register must hold at the end.
fn check_key(
    key: &str,
    raw: &[RawOp],
    final_value: Option<Option<&str>>,
    opts: &CheckOptions,
) -> KeyResult {
    let indeterminate = raw.iter().filter(|o| o.outcome == Outcome::Info).count();
    let failed = raw.iter().filter(|o| o.outcome == Outcome::Fail).count();

    // First pass: the values some operation can tell apart — read results, CAS expectations and
    // the final value. Values written by indeterminate operations that are not among them all
    // behave alike (no read returns them, no CAS expects them) and are merged into UNOBSERVED.
    // `observed_strict` leaves out refused CASes' expectations, for the drop rule below.
    let mut values = Values::new();
    let mut has_refused = false;
    let mut observed_strict: HashSet<u32> = HashSet::new();
    if let Some(Some(f)) = final_value {
        observed_strict.insert(values.id(f));
    }
    for o in raw {
        match (&o.op, &o.outcome) {
            (Op::Read { .. }, Outcome::Ok(OpResult::Read(Some(v)))) => {
                observed_strict.insert(values.id(v));
            }
            (Op::Cas { expect, .. }, Outcome::Ok(OpResult::Cas(true)) | Outcome::Info) => {
                observed_strict.insert(values.id(expect));
            }
            (Op::Cas { expect, .. }, Outcome::Ok(OpResult::Cas(false))) => {
                has_refused = true;
                values.id(expect);
            }
            _ => {}
        }
    }
    values.seal_observable();

    let mut req: Vec<ReqOp> = Vec::new();
    let mut classes: Vec<Class> = Vec::new();
    let mut class_of: HashMap<Kind, usize> = HashMap::new();
    for (i, o) in raw.iter().enumerate() {
        let ret = match (&o.outcome, o.completion) {
            (Outcome::Ok(_), Some((ci, _))) => ci,
            _ => INF,
        };
        let kind = match (&o.op, &o.outcome) {
            (_, Outcome::Fail) | (Op::Read { .. }, Outcome::Info) => continue,
            (Op::Read { .. }, Outcome::Ok(OpResult::Read(v))) => match v {
                Some(v) => Kind::Read(values.id(v)),
                None => Kind::Read(ABSENT),
            },
            (Op::Write { value, .. }, Outcome::Ok(_)) => Kind::Write(values.id(value)),
            (Op::Write { value, .. }, _) => Kind::Write(values.info_written(value)),
            (Op::Cas { expect, new, .. }, Outcome::Ok(OpResult::Cas(true))) => Kind::CasOk {
                expect: values.id(expect),
                new: values.id(new),
            },
            (Op::Cas { expect, .. }, Outcome::Ok(OpResult::Cas(false))) => Kind::CasRefused {
                expect: values.id(expect),
            },
            (Op::Cas { expect, new, .. }, _) => Kind::CasMaybe {
                expect: values.id(expect),
                new: values.info_written(new),
            },
            // Outcome kinds that do not fit the operation were turned into Info by `partition`.
            (Op::Read { .. }, Outcome::Ok(_)) => continue,
        };
        if ret == INF {
            // Indeterminate. If it can only write a value nothing observes and no refused CAS
            // could benefit from the register holding some other value, linearizing it can only
            // hurt: drop it (it never happened).
            let new = match kind {
                Kind::Write(v) | Kind::CasMaybe { new: v, .. } => v,
                _ => continue,
            };
            if !has_refused && !observed_strict.contains(&new) {
                continue;
            }
            let c = *class_of.entry(kind).or_insert_with(|| {
                classes.push(Class {
                    kind,
                    members: Vec::new(),
                });
                classes.len() - 1
            });
            classes[c].members.push((o.invoke_index, i));
        } else {
            req.push(ReqOp {
                call: o.invoke_index,
                ret,
                kind,
                raw: i,
            });
        }
    }
    // `raw` is sorted by invocation, so `req` and every class are too.
    let mut by_ret: Vec<u32> = (0..req.len()).map(|i| i as u32).collect();
    by_ret.sort_by_key(|&i| req[i as usize].ret);
    let final_id = final_value.map(|f| match f {
        Some(v) => values.id(v),
        None => ABSENT,
    });

    // live[v]: the last completion of a required operation that can tell the register holding v
    // apart from holding some other value (a read returning v, a CAS expecting v), extended
    // through indeterminate CASes expecting v (they may turn v into a value that matters), and
    // INF for the final value. Once the search is past live[v] (r > live[v]), v is as good as
    // UNOBSERVED: nothing left can observe it.
    let mut live = vec![0usize; values.names.len()];
    for q in &req {
        if let Kind::Read(v) | Kind::CasOk { expect: v, .. } | Kind::CasRefused { expect: v } =
            q.kind
        {
            live[v as usize] = live[v as usize].max(q.ret);
        }
    }
    if let Some(f) = final_id {
        live[f as usize] = INF;
    }
    live[UNOBSERVED as usize] = 0;
    let mut cas_expects = HashSet::new();
    loop {
        let mut changed = false;
        for class in &classes {
            if let Kind::CasMaybe { expect, new } = class.kind {
                cas_expects.insert(expect);
                if live[new as usize] > live[expect as usize] {
                    live[expect as usize] = live[new as usize];
                    changed = true;
                }
            }
        }
        if !changed {
            break;
        }
    }

    let mut search = Search::new(
        &req,
        &by_ret,
        &classes,
        &live,
        &cas_expects,
        final_id,
        opts.max_configurations,
    );
    let outcome = search.run();
    let configurations = search.configurations;
    let verdict = match outcome {
        SearchOutcome::Linearizable => Verdict::Linearizable,
        SearchOutcome::NotLinearizable => Verdict::NotLinearizable,
        SearchOutcome::Unknown => Verdict::Unknown,
    };
    let failure = (verdict != Verdict::Linearizable).then(|| {
        explain(
            key,
            raw,
            &req,
            &values,
            verdict,
            search.best_r,
            &search.best_states,
            final_value,
            configurations,
        )
    });
    KeyResult {
        verdict,
        operations: raw.len(),
        indeterminate,
        failed,
        configurations,
        failure,
    }
}
