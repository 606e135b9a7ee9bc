//! Generated histories: a simulator of concurrent clients on real registers (linearizable
//! by construction), mutations that make them not linearizable, and a history of thousands
//! of operations on one key.

use std::collections::{BTreeMap, HashMap};

use crate::chaos::wgl::*;

/// SplitMix64: small, deterministic, good enough for test generation.
pub(super) struct Rng(pub(super) u64);

impl Rng {
    fn next(&mut self) -> u64 {
        self.0 = self.0.wrapping_add(0x9e37_79b9_7f4a_7c15);
        let mut z = self.0;
        z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
        z ^ (z >> 31)
    }
    pub(super) fn below(&mut self, n: usize) -> usize {
        (self.next() % n as u64) as usize
    }
    pub(super) fn pct(&mut self, p: usize) -> bool {
        self.below(100) < p
    }
}

#[derive(Clone, Copy)]
pub(super) struct Sim {
    pub(super) processes: usize,
    pub(super) ops: usize,
    pub(super) keys: usize,
    /// `Some(n)`: values drawn from n small strings (collisions, ABA); `None`: unique values.
    pub(super) small_values: Option<usize>,
    pub(super) info_pct: usize,
    pub(super) fail_pct: usize,
}

enum Phase {
    Idle,
    Invoked(Op),
    Applied(OpResult),
}

fn apply(reg: &mut HashMap<String, Option<String>>, op: &Op) -> OpResult {
    let cur = reg.entry(op.key().to_string()).or_default();
    match op {
        Op::Read { .. } => OpResult::Read(cur.clone()),
        Op::Write { value, .. } => {
            *cur = Some(value.clone());
            OpResult::Write
        }
        Op::Cas { expect, new, .. } => {
            if cur.as_deref() == Some(expect.as_str()) {
                *cur = Some(new.clone());
                OpResult::Cas(true)
            } else {
                OpResult::Cas(false)
            }
        }
    }
}

/// Simulates clients against an atomic register: every operation takes effect at one instant
/// between its invoke and completion (or, if indeterminate, at any later instant or never),
/// so the history is linearizable by construction. Returns the history and the final state.
pub(super) fn simulate(seed: u64, s: Sim) -> (Vec<Event>, HashMap<String, Option<String>>) {
    let mut rng = Rng(seed);
    let mut reg: HashMap<String, Option<String>> = HashMap::new();
    let mut phases: Vec<Phase> = (0..s.processes).map(|_| Phase::Idle).collect();
    let mut lingering: Vec<Op> = Vec::new();
    let mut written: HashMap<String, Vec<String>> = HashMap::new();
    let mut events = Vec::new();
    let (mut issued, mut t, mut counter) = (0usize, 0u64, 0usize);
    loop {
        if issued >= s.ops && phases.iter().all(|p| matches!(p, Phase::Idle)) {
            break;
        }
        t += 1 + rng.below(1000) as u64;
        if !lingering.is_empty() && rng.pct(3) {
            let op = lingering.swap_remove(rng.below(lingering.len()));
            if rng.pct(50) {
                apply(&mut reg, &op);
            }
        }
        let p = rng.below(s.processes);
        let pid = p as u64;
        let phase = std::mem::replace(&mut phases[p], Phase::Idle);
        phases[p] = match phase {
            Phase::Idle if issued < s.ops => {
                issued += 1;
                let key = format!("k{}", rng.below(s.keys));
                let roll = rng.below(10);
                let mut value = || match s.small_values {
                    Some(n) => format!("{}", rng.below(n)),
                    None => {
                        counter += 1;
                        format!("v{counter}")
                    }
                };
                let op = if roll < 4 {
                    Op::Read { key }
                } else if roll < 7 {
                    let value = value();
                    written.entry(key.clone()).or_default().push(value.clone());
                    Op::Write { key, value }
                } else {
                    let new = value();
                    let expect = match (s.small_values, written.get(&key)) {
                        (None, Some(w)) if !w.is_empty() => {
                            let back = rng.below(w.len().min(3));
                            w[w.len() - 1 - back].clone()
                        }
                        (None, _) => "v0".to_string(),
                        (Some(n), _) => format!("{}", rng.below(n)),
                    };
                    written.entry(key.clone()).or_default().push(new.clone());
                    Op::Cas { key, expect, new }
                };
                events.push(Event::invoke(t, pid, op.clone()));
                Phase::Invoked(op)
            }
            Phase::Idle => Phase::Idle,
            Phase::Invoked(op) => {
                let roll = rng.below(100);
                if roll < s.fail_pct {
                    events.push(Event::complete(t, pid, Outcome::Fail));
                    Phase::Idle
                } else if roll < s.fail_pct + s.info_pct {
                    events.push(Event::complete(t, pid, Outcome::Info));
                    lingering.push(op);
                    Phase::Idle
                } else if roll < 50 {
                    Phase::Applied(apply(&mut reg, &op))
                } else {
                    Phase::Invoked(op)
                }
            }
            Phase::Applied(res) => {
                if rng.pct(s.info_pct) {
                    events.push(Event::complete(t, pid, Outcome::Info));
                    Phase::Idle
                } else if rng.pct(60) {
                    events.push(Event::complete(t, pid, Outcome::Ok(res)));
                    Phase::Idle
                } else {
                    Phase::Applied(res)
                }
            }
        };
    }
    (events, reg)
}

fn ok_reads(events: &[Event]) -> Vec<usize> {
    events
        .iter()
        .enumerate()
        .filter(|(_, e)| {
            matches!(
                e,
                Event::Complete {
                    outcome: Outcome::Ok(OpResult::Read(_)),
                    ..
                }
            )
        })
        .map(|(i, _)| i)
        .collect()
}

fn set_read(events: &mut [Event], idx: usize, v: Option<&str>) {
    if let Event::Complete { outcome, .. } = &mut events[idx] {
        *outcome = Outcome::Ok(OpResult::Read(v.map(String::from)));
    }
}

/// For each completion index: the index of its invocation.
fn invoke_of(events: &[Event]) -> HashMap<usize, usize> {
    let mut pending = HashMap::new();
    let mut out = HashMap::new();
    for (i, e) in events.iter().enumerate() {
        match e {
            Event::Invoke { process, .. } => {
                pending.insert(*process, i);
            }
            Event::Complete { process, .. } => {
                if let Some(inv) = pending.remove(process) {
                    out.insert(i, inv);
                }
            }
        }
    }
    out
}

fn op_at(events: &[Event], i: usize) -> &Op {
    match &events[i] {
        Event::Invoke { op, .. } => op,
        Event::Complete { .. } => panic!("not an invocation"),
    }
}

const SIMS: [Sim; 4] = [
    Sim {
        processes: 5,
        ops: 400,
        keys: 2,
        small_values: Some(3),
        info_pct: 3,
        fail_pct: 2,
    },
    Sim {
        processes: 8,
        ops: 600,
        keys: 3,
        small_values: None,
        info_pct: 4,
        fail_pct: 2,
    },
    Sim {
        processes: 3,
        ops: 300,
        keys: 1,
        small_values: Some(2),
        info_pct: 8,
        fail_pct: 5,
    },
    Sim {
        processes: 10,
        ops: 800,
        keys: 1,
        small_values: None,
        info_pct: 2,
        fail_pct: 0,
    },
];

#[test]
fn random_linearizable_histories_are_accepted() {
    for (si, sim) in SIMS.iter().enumerate() {
        for seed in 0..12u64 {
            let (events, reg) = simulate(seed * 31 + si as u64, *sim);
            let res = check_history(&events);
            assert!(res.ok, "sim {si} seed {seed}:\n{}", res.report());
            let fin: BTreeMap<String, Option<String>> = reg.into_iter().collect();
            let res = check_history_with_final_state(&events, &fin, &CheckOptions::default());
            assert!(
                res.ok,
                "sim {si} seed {seed} with final state:\n{}",
                res.report()
            );
        }
    }
}

#[test]
fn random_histories_with_an_impossible_read_are_rejected() {
    for (si, sim) in SIMS.iter().enumerate() {
        for seed in 0..12u64 {
            let (events, _) = simulate(seed * 31 + si as u64, *sim);
            let reads = ok_reads(&events);
            assert!(!reads.is_empty());
            let mut rng = Rng(seed ^ 0xdead_beef);
            let victim = reads[rng.below(reads.len())];
            let mut bad = events.clone();
            set_read(&mut bad, victim, Some("never-written"));
            let res = check_history(&bad);
            assert!(
                !res.ok,
                "sim {si} seed {seed}: mutation at event {victim} not detected"
            );
            let key = op_at(&events, invoke_of(&events)[&victim])
                .key()
                .to_string();
            let kr = &res.per_key[&key];
            assert_eq!(kr.verdict, Verdict::NotLinearizable);
            let f = kr.failure.as_ref().expect("failure");
            // The mutated read is the first thing that breaks, so it is reported exactly.
            assert_eq!(
                f.event_index,
                Some(victim),
                "sim {si} seed {seed}:\n{}",
                f.explanation
            );
            // The unmutated prefix up to just before it is fine.
            assert!(check_history(&bad[..victim]).ok);
        }
    }
}

#[test]
fn random_histories_with_a_lost_or_stale_read_are_rejected() {
    let mut lost = 0;
    let mut stale = 0;
    for (si, sim) in SIMS.iter().enumerate() {
        for seed in 0..12u64 {
            let (events, _) = simulate(seed * 31 + si as u64, *sim);
            let inv = invoke_of(&events);
            // (completion index, invoke index, key, value) of acknowledged writes.
            let writes: Vec<(usize, usize, String, String)> = inv
                .iter()
                .filter(|(c, _)| {
                    matches!(
                        events[**c],
                        Event::Complete {
                            outcome: Outcome::Ok(OpResult::Write),
                            ..
                        }
                    )
                })
                .filter_map(|(c, i)| match op_at(&events, *i) {
                    Op::Write { key, value } => Some((*c, *i, key.clone(), value.clone())),
                    _ => None,
                })
                .collect();
            for &r in &ok_reads(&events) {
                let r_inv = inv[&r];
                let key = op_at(&events, r_inv).key();
                // Lost write: an acknowledged write precedes the read, which returns absent.
                if writes.iter().any(|(c, _, k, _)| k == key && *c < r_inv) {
                    let mut bad = events.clone();
                    set_read(&mut bad, r, None);
                    assert!(
                        !check_history(&bad).ok,
                        "sim {si} seed {seed}: lost write at {r}"
                    );
                    lost += 1;
                }
                // Stale read (unique values only): w0 acknowledged before w1 was invoked, w1
                // acknowledged before the read was invoked; the read returns w0's value.
                if sim.small_values.is_none() {
                    let pair = writes.iter().find_map(|w1| {
                        (w1.2 == key && w1.0 < r_inv)
                            .then(|| writes.iter().find(|w0| w0.2 == key && w0.0 < w1.1))
                            .flatten()
                    });
                    if let Some(w0) = pair {
                        let mut bad = events.clone();
                        set_read(&mut bad, r, Some(&w0.3));
                        assert!(
                            !check_history(&bad).ok,
                            "sim {si} seed {seed}: stale read at {r}"
                        );
                        stale += 1;
                    }
                }
                if lost + stale > 2000 {
                    break;
                }
            }
        }
    }
    assert!(
        lost > 100 && stale > 100,
        "too few mutations exercised: {lost} lost, {stale} stale"
    );
}

// --- scale -----------------------------------------------------------------------------------

#[test]
fn thousands_of_ops_on_one_key_with_many_timeouts() {
    // 5000 operations on one key from 10 clients with unique values and ~5% timeouts at each
    // stage (hundreds of indeterminate operations pending forever): accepted quickly, and a
    // single bad read near the end is caught and pinpointed.
    let sim = Sim {
        processes: 10,
        ops: 5000,
        keys: 1,
        small_values: None,
        info_pct: 5,
        fail_pct: 1,
    };
    let (events, _) = simulate(7, sim);
    let res = check_history(&events);
    let kr = &res.per_key["k0"];
    assert!(res.ok, "{}", res.report());
    assert!(
        kr.indeterminate > 500,
        "only {} indeterminate",
        kr.indeterminate
    );
    assert!(
        kr.configurations < 100_000,
        "{} configurations",
        kr.configurations
    );

    let reads = ok_reads(&events);
    let victim = reads[reads.len() * 9 / 10];
    let mut bad = events.clone();
    set_read(&mut bad, victim, Some("never-written"));
    let res = check_history(&bad);
    let kr = &res.per_key["k0"];
    assert_eq!(kr.verdict, Verdict::NotLinearizable, "{}", res.report());
    assert_eq!(
        kr.failure.as_ref().and_then(|f| f.event_index),
        Some(victim)
    );
    assert!(
        kr.configurations < 500_000,
        "{} configurations",
        kr.configurations
    );

    // A small value set (heavy ABA and CAS contention), same size.
    let sim = Sim {
        processes: 10,
        ops: 5000,
        keys: 1,
        small_values: Some(4),
        info_pct: 1,
        fail_pct: 1,
    };
    let (events, _) = simulate(11, sim);
    let res = check_history(&events);
    assert!(res.ok, "{}", res.report());
    assert!(res.per_key["k0"].configurations < 100_000);
    // Without timeouts, a violation late in such a history is found too.
    let sim = Sim { info_pct: 0, ..sim };
    let (events, _) = simulate(11, sim);
    let reads = ok_reads(&events);
    let victim = reads[reads.len() * 9 / 10];
    let mut bad = events.clone();
    set_read(&mut bad, victim, Some("never-written"));
    let res = check_history(&bad);
    assert_eq!(
        res.per_key["k0"].verdict,
        Verdict::NotLinearizable,
        "{}",
        res.report()
    );
}
