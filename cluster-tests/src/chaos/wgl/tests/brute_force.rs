//! The checker against a brute-force enumeration of every order of a small history's
//! operations, on thousands of random and perturbed simulated histories.

use std::collections::HashMap;

use super::random::{simulate, Rng, Sim};
use super::{cas, rd, wr};
use crate::chaos::wgl::*;

struct BfOp {
    call: usize,
    ret: usize,
    required: bool,
    op: Op,
    result: Option<OpResult>,
}

/// The key's operations: failed ones dropped, indeterminate ones optional.
fn bf_ops(events: &[Event], key: &str) -> Vec<BfOp> {
    let mut pending: HashMap<u64, (usize, Op)> = HashMap::new();
    let mut out = Vec::new();
    for (i, e) in events.iter().enumerate() {
        match e {
            Event::Invoke { process, op, .. } => {
                pending.insert(*process, (i, op.clone()));
            }
            Event::Complete {
                process, outcome, ..
            } => {
                let Some((call, op)) = pending.remove(process) else {
                    continue;
                };
                match outcome {
                    Outcome::Fail => {}
                    Outcome::Info => out.push(BfOp {
                        call,
                        ret: usize::MAX,
                        required: false,
                        op,
                        result: None,
                    }),
                    Outcome::Ok(r) => out.push(BfOp {
                        call,
                        ret: i,
                        required: true,
                        op,
                        result: Some(r.clone()),
                    }),
                }
            }
        }
    }
    for (_, (call, op)) in pending {
        out.push(BfOp {
            call,
            ret: usize::MAX,
            required: false,
            op,
            result: None,
        });
    }
    out.retain(|o| o.op.key() == key);
    out
}

fn bf_step(o: &BfOp, s: &Option<String>) -> Option<Option<String>> {
    match (&o.op, &o.result) {
        (Op::Read { .. }, Some(OpResult::Read(v))) => (v == s).then(|| s.clone()),
        (Op::Read { .. }, _) => Some(s.clone()),
        (Op::Write { value, .. }, _) => Some(Some(value.clone())),
        (Op::Cas { expect, new, .. }, res) => {
            let hit = s.as_deref() == Some(expect.as_str());
            match res {
                Some(OpResult::Cas(true)) => hit.then(|| Some(new.clone())),
                Some(OpResult::Cas(false)) => (!hit).then(|| s.clone()),
                _ => Some(if hit { Some(new.clone()) } else { s.clone() }),
            }
        }
    }
}

/// Exhaustive search over all real-time-respecting orders, no memoization or pruning.
fn bf(ops: &[BfOp], placed: &mut [bool], s: &Option<String>, fin: Option<&Option<String>>) -> bool {
    let done = ops
        .iter()
        .zip(placed.iter())
        .all(|(o, &p)| p || !o.required);
    if done && fin.is_none_or(|f| f == s) {
        return true;
    }
    for i in 0..ops.len() {
        if placed[i] {
            continue;
        }
        let blocked = (0..ops.len())
            .any(|j| j != i && !placed[j] && ops[j].required && ops[j].ret < ops[i].call);
        if blocked {
            continue;
        }
        if let Some(next) = bf_step(&ops[i], s) {
            placed[i] = true;
            let found = bf(ops, placed, &next, fin);
            placed[i] = false;
            if found {
                return true;
            }
        }
    }
    false
}

/// Random (mostly not linearizable) small histories on one key with arbitrary results.
fn random_small_history(rng: &mut Rng) -> Vec<Event> {
    enum P {
        Idle,
        Busy(Op),
        /// Invoked and never completes.
        Gone,
    }
    let vals = ["a", "b", "c"];
    let n_ops = 2 + rng.below(6);
    let mut events = Vec::new();
    let mut procs: Vec<P> = (0..3).map(|_| P::Idle).collect();
    let mut issued = 0;
    let mut t = 0;
    loop {
        let busy = procs.iter().any(|p| matches!(p, P::Busy(_)));
        let idle = procs.iter().any(|p| matches!(p, P::Idle));
        if !busy && (issued >= n_ops || !idle) {
            break;
        }
        t += 1;
        let p = rng.below(3);
        procs[p] = match std::mem::replace(&mut procs[p], P::Idle) {
            P::Idle if issued < n_ops => {
                issued += 1;
                let op = match rng.below(3) {
                    0 => rd("k"),
                    1 => wr("k", vals[rng.below(3)]),
                    _ => cas("k", vals[rng.below(3)], vals[rng.below(3)]),
                };
                events.push(Event::invoke(t, p as u64, op.clone()));
                P::Busy(op)
            }
            P::Idle => P::Idle,
            P::Gone => P::Gone,
            P::Busy(_) if rng.pct(8) => P::Gone,
            P::Busy(op) => {
                let outcome = match rng.below(10) {
                    0 => Outcome::Info,
                    1 => Outcome::Fail,
                    _ => Outcome::Ok(match &op {
                        Op::Read { .. } => OpResult::Read(
                            [None, Some("a"), Some("b"), Some("c")][rng.below(4)].map(String::from),
                        ),
                        Op::Write { .. } => OpResult::Write,
                        Op::Cas { .. } => OpResult::Cas(rng.pct(50)),
                    }),
                };
                events.push(Event::complete(t, p as u64, outcome));
                P::Idle
            }
        };
    }
    events
}

#[test]
fn agrees_with_brute_force_on_random_small_histories() {
    let mut rng = Rng(42);
    let (mut yes, mut no) = (0, 0);
    let (mut fin_yes, mut fin_no) = (0, 0);
    for case in 0..4000 {
        let events = random_small_history(&mut rng);
        let ops = bf_ops(&events, "k");
        let mut placed = vec![false; ops.len()];
        let expected = bf(&ops, &mut placed, &None, None);
        let res = check_history(&events);
        assert!(res.history_errors.is_empty());
        assert_eq!(
            res.ok,
            expected,
            "case {case}: brute force says {expected}: {events:#?}\n{}",
            res.report()
        );
        if expected {
            yes += 1;
        } else {
            no += 1;
        }
        let fin = [None, Some("a"), Some("b"), Some("c")][rng.below(4)];
        let fin_owned = fin.map(String::from);
        let expected = bf(&ops, &mut placed, &None, Some(&fin_owned));
        assert_eq!(
            final_value_consistent(&events, "k", fin),
            expected,
            "case {case}: final {fin:?}, brute force says {expected}: {events:#?}"
        );
        if expected {
            fin_yes += 1;
        } else {
            fin_no += 1;
        }
    }
    // Both verdicts must be well represented, or the comparison proves little.
    assert!(yes > 500 && no > 500, "{yes} linearizable, {no} not");
    assert!(
        fin_yes > 300 && fin_no > 300,
        "{fin_yes} final ok, {fin_no} not"
    );
}

#[test]
fn agrees_with_brute_force_on_perturbed_simulated_histories() {
    // Mostly-linearizable histories with many timeouts, failures, ABA values or unique values,
    // half of them with one result perturbed: exercises the indeterminate-operation
    // reductions where they matter.
    let mut rng = Rng(7);
    let (mut yes, mut no, mut fin_checked) = (0, 0, 0);
    for case in 0..3000u64 {
        let sim = Sim {
            processes: 2 + rng.below(3),
            ops: 3 + rng.below(6),
            keys: 1,
            small_values: [Some(2), Some(3), None][rng.below(3)],
            info_pct: 5 + rng.below(20),
            fail_pct: rng.below(8),
        };
        let (mut events, reg) = simulate(case, sim);
        if rng.pct(50) {
            let done: Vec<usize> = events
                .iter()
                .enumerate()
                .filter(|(_, e)| {
                    matches!(
                        e,
                        Event::Complete {
                            outcome: Outcome::Ok(_),
                            ..
                        }
                    )
                })
                .map(|(i, _)| i)
                .collect();
            if !done.is_empty() {
                let i = done[rng.below(done.len())];
                let pick = ["0", "1", "2", "v1", "v2", "v3"][rng.below(6)];
                if let Event::Complete {
                    outcome: Outcome::Ok(res),
                    ..
                } = &mut events[i]
                {
                    match res {
                        OpResult::Read(v) => {
                            *v = if rng.pct(20) {
                                None
                            } else {
                                Some(pick.to_string())
                            }
                        }
                        OpResult::Cas(b) => *b = !*b,
                        OpResult::Write => {}
                    }
                }
            }
        }
        let ops = bf_ops(&events, "k0");
        let mut placed = vec![false; ops.len()];
        let expected = bf(&ops, &mut placed, &None, None);
        let res = check_history(&events);
        assert_eq!(
            res.ok,
            expected,
            "case {case}: brute force says {expected}: {events:#?}\n{}",
            res.report()
        );
        if expected {
            yes += 1;
            let fin = reg.get("k0").cloned().flatten();
            let fin = if rng.pct(30) {
                Some(["0", "1", "v1", "v2"][rng.below(4)].to_string())
            } else {
                fin
            };
            let expected = bf(&ops, &mut placed, &None, Some(&fin));
            assert_eq!(
                final_value_consistent(&events, "k0", fin.as_deref()),
                expected,
                "case {case}: final {fin:?}, brute force says {expected}: {events:#?}"
            );
            fin_checked += 1;
        } else {
            no += 1;
        }
    }
    assert!(yes > 1000 && no > 300, "{yes} linearizable, {no} not");
    assert!(fin_checked > 1000);
}
