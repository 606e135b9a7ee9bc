//! Unit tests of the checker, through the names `wgl` re-exports only: hand-written
//! histories here (known good, known bad, final values, malformed histories, the budget,
//! serde), generated ones in [`random`], and a cross-check with a brute-force checker in
//! [`brute_force`].

mod brute_force;
mod random;

use std::collections::BTreeMap;

use super::*;

// --- history construction helpers -------------------------------------------------------

#[derive(Default)]
struct H {
    ev: Vec<Event>,
    t: u64,
}

impl H {
    fn tick(&mut self) -> u64 {
        self.t += 10;
        self.t
    }
    fn inv(&mut self, p: u64, op: Op) -> &mut Self {
        let t = self.tick();
        self.ev.push(Event::invoke(t, p, op));
        self
    }
    fn done(&mut self, p: u64, outcome: Outcome) -> &mut Self {
        let t = self.tick();
        self.ev.push(Event::complete(t, p, outcome));
        self
    }
    fn ok(&mut self, p: u64, r: OpResult) -> &mut Self {
        self.done(p, Outcome::Ok(r))
    }
    fn read_ok(&mut self, p: u64, v: Option<&str>) -> &mut Self {
        self.ok(p, OpResult::Read(v.map(String::from)))
    }
    fn write_ok(&mut self, p: u64) -> &mut Self {
        self.ok(p, OpResult::Write)
    }
    fn cas_ok(&mut self, p: u64, b: bool) -> &mut Self {
        self.ok(p, OpResult::Cas(b))
    }
    fn info(&mut self, p: u64) -> &mut Self {
        self.done(p, Outcome::Info)
    }
    fn fail(&mut self, p: u64) -> &mut Self {
        self.done(p, Outcome::Fail)
    }
    /// A complete sequential write by `p`.
    fn w(&mut self, p: u64, k: &str, v: &str) -> &mut Self {
        self.inv(p, wr(k, v)).write_ok(p)
    }
    /// A complete sequential read by `p`.
    fn r(&mut self, p: u64, k: &str, v: Option<&str>) -> &mut Self {
        self.inv(p, rd(k)).read_ok(p, v)
    }
    fn events(&self) -> Vec<Event> {
        self.ev.clone()
    }
}

fn rd(k: &str) -> Op {
    Op::Read { key: k.into() }
}
fn wr(k: &str, v: &str) -> Op {
    Op::Write {
        key: k.into(),
        value: v.into(),
    }
}
fn cas(k: &str, e: &str, n: &str) -> Op {
    Op::Cas {
        key: k.into(),
        expect: e.into(),
        new: n.into(),
    }
}

fn assert_ok(events: &[Event]) {
    let res = check_history(events);
    assert!(res.ok, "expected linearizable:\n{}", res.report());
}

fn assert_bad(events: &[Event]) -> CheckResult {
    let res = check_history(events);
    assert!(!res.ok, "expected NOT linearizable: {events:#?}");
    assert!(res.history_errors.is_empty(), "{:?}", res.history_errors);
    assert!(
        res.per_key
            .values()
            .any(|r| r.verdict == Verdict::NotLinearizable),
        "expected a definite violation, got {res:#?}"
    );
    res
}

fn failure_of<'a>(res: &'a CheckResult, key: &str) -> &'a Failure {
    res.per_key[key].failure.as_ref().expect("a failure report")
}

// --- known-good ---------------------------------------------------------------------------

#[test]
fn empty_history_is_linearizable() {
    let res = check_history(&[]);
    assert!(res.ok);
    assert!(res.per_key.is_empty());
}

#[test]
fn sequential_history() {
    let mut h = H::default();
    h.r(1, "k", None)
        .w(1, "k", "a")
        .r(2, "k", Some("a"))
        .inv(2, cas("k", "a", "b"))
        .cas_ok(2, true)
        .inv(1, cas("k", "a", "c"))
        .cas_ok(1, false)
        .r(1, "k", Some("b"))
        .w(2, "k", "d")
        .r(1, "k", Some("d"));
    assert_ok(&h.events());
}

#[test]
fn concurrent_overlapping_writes_reads_may_see_either() {
    // Two overlapping writes; concurrent reads see them in either order, and after both
    // complete all reads agree on the one that went last.
    for (during, after) in [("a", "b"), ("b", "a"), ("a", "a"), ("b", "b")] {
        let mut h = H::default();
        h.inv(1, wr("k", "a")).inv(2, wr("k", "b")).inv(3, rd("k"));
        h.read_ok(3, Some(during));
        h.write_ok(1).write_ok(2);
        h.r(3, "k", Some(after)).r(4, "k", Some(after));
        assert_ok(&h.events());
    }
}

#[test]
fn read_concurrent_with_write_sees_old_or_new() {
    for seen in [None, Some("a")] {
        let mut h = H::default();
        h.inv(1, wr("k", "a"))
            .inv(2, rd("k"))
            .read_ok(2, seen)
            .write_ok(1);
        h.r(2, "k", Some("a"));
        assert_ok(&h.events());
    }
}

#[test]
fn indeterminate_write_that_later_appears_in_a_read() {
    // Timed out, then observed much later (it took effect after the client gave up).
    let mut h = H::default();
    h.w(1, "k", "a")
        .inv(2, wr("k", "b"))
        .info(2)
        .r(1, "k", Some("a"))
        .r(3, "k", Some("b"));
    h.r(1, "k", Some("b"));
    assert_ok(&h.events());
    // Same with an invocation that never completed at all.
    let mut h = H::default();
    h.w(1, "k", "a")
        .inv(2, wr("k", "b"))
        .r(1, "k", Some("a"))
        .r(3, "k", Some("b"));
    assert_ok(&h.events());
}

#[test]
fn indeterminate_write_that_never_appears() {
    let mut h = H::default();
    h.w(1, "k", "a")
        .inv(2, wr("k", "b"))
        .info(2)
        .r(1, "k", Some("a"))
        .r(3, "k", Some("a"));
    assert_ok(&h.events());
}

#[test]
fn indeterminate_cas_may_or_may_not_apply() {
    for seen in ["a", "b"] {
        let mut h = H::default();
        h.w(1, "k", "a")
            .inv(2, cas("k", "a", "b"))
            .info(2)
            .r(1, "k", Some(seen));
        assert_ok(&h.events());
    }
    // ... but once it was observed applied, the old value cannot come back.
    let mut h = H::default();
    h.w(1, "k", "a").inv(2, cas("k", "a", "b")).info(2);
    h.r(1, "k", Some("b")).r(1, "k", Some("a"));
    assert_bad(&h.events());
}

#[test]
fn indeterminate_write_cannot_take_effect_before_its_invocation() {
    let mut h = H::default();
    h.w(1, "k", "a")
        .r(1, "k", Some("b"))
        .inv(2, wr("k", "b"))
        .info(2);
    assert_bad(&h.events());
}

#[test]
fn indeterminate_write_can_only_take_effect_once() {
    // a (info), then b overwrites it, then a again: the info write cannot apply twice.
    let mut h = H::default();
    h.inv(1, wr("k", "a")).info(1);
    h.r(2, "k", Some("a"))
        .w(2, "k", "b")
        .r(2, "k", Some("b"))
        .r(2, "k", Some("a"));
    assert_bad(&h.events());
}

#[test]
fn refused_cas_explained_by_indeterminate_unobserved_write() {
    // The CAS saw something other than "a": only the timed-out write of "x" (never read by
    // anyone) explains it, so it must not be dropped.
    let mut h = H::default();
    h.w(1, "k", "a")
        .inv(2, wr("k", "x"))
        .info(2)
        .inv(1, cas("k", "a", "b"))
        .cas_ok(1, false);
    assert_ok(&h.events());
    let mut h = H::default();
    h.w(1, "k", "a").inv(1, cas("k", "a", "b")).cas_ok(1, false);
    assert_bad(&h.events());
}

#[test]
fn keys_are_independent() {
    let mut h = H::default();
    h.w(1, "x", "1")
        .w(1, "y", "2")
        .r(2, "x", Some("1"))
        .r(2, "y", Some("2"));
    let res = check_history(&h.events());
    assert!(res.ok, "{}", res.report());
    assert_eq!(res.per_key.len(), 2);
    // A violation on one key does not taint the other.
    h.r(2, "y", Some("1"));
    let res = check_history(&h.events());
    assert!(!res.ok);
    assert!(res.per_key["x"].is_ok());
    assert_eq!(res.per_key["y"].verdict, Verdict::NotLinearizable);
}

#[test]
fn failed_operations_never_take_effect() {
    let mut h = H::default();
    h.w(1, "k", "a")
        .inv(2, wr("k", "b"))
        .fail(2)
        .r(1, "k", Some("a"));
    assert_ok(&h.events());
    let mut h = H::default();
    h.w(1, "k", "a")
        .inv(2, wr("k", "b"))
        .fail(2)
        .r(1, "k", Some("b"));
    assert_bad(&h.events());
}

// --- known-bad ----------------------------------------------------------------------------

#[test]
fn stale_read_is_rejected() {
    // b is acknowledged before the read is invoked, yet the read returns a.
    let mut h = H::default();
    h.w(1, "k", "a").w(2, "k", "b").r(3, "k", Some("a"));
    let res = assert_bad(&h.events());
    let f = failure_of(&res, "k");
    assert_eq!(f.event_index, Some(5), "{}", f.explanation);
    assert_eq!(f.prefix_len, 6);
    assert_eq!(f.possible_values, vec!["\"b\"".to_string()]);
    assert!(
        f.explanation.contains("returned \"a\""),
        "{}",
        f.explanation
    );
    // The report names the key and the violating read.
    assert!(f.explanation.contains("key \"k\""), "{}", f.explanation);
    assert!(f
        .operation
        .as_deref()
        .is_some_and(|o| o.starts_with("process 3: read")));
}

#[test]
fn stale_read_after_a_fresh_read_is_rejected() {
    // Another reader already saw b (so b took effect) and then a later read returns a.
    let mut h = H::default();
    h.w(1, "k", "a").inv(2, wr("k", "b"));
    h.r(3, "k", Some("b")).r(4, "k", Some("a"));
    h.write_ok(2);
    let res = assert_bad(&h.events());
    assert_eq!(failure_of(&res, "k").event_index, Some(6));
}

#[test]
fn lost_acknowledged_write_is_rejected() {
    // The write is acknowledged; a later, non-overlapping read shows the earlier value.
    let mut h = H::default();
    h.r(1, "k", None).w(2, "k", "a").r(1, "k", None);
    assert_bad(&h.events());
    let mut h = H::default();
    h.w(1, "k", "a")
        .w(2, "k", "b")
        .inv(1, rd("k"))
        .read_ok(1, Some("a"));
    assert_bad(&h.events());
}

#[test]
fn cas_success_against_impossible_value_is_rejected() {
    // a was overwritten by b before the CAS was invoked.
    let mut h = H::default();
    h.w(1, "k", "a")
        .w(1, "k", "b")
        .inv(2, cas("k", "a", "c"))
        .cas_ok(2, true);
    let res = assert_bad(&h.events());
    assert_eq!(
        failure_of(&res, "k").possible_values,
        vec!["\"b\"".to_string()]
    );
    // A CAS on an absent key cannot succeed.
    let mut h = H::default();
    h.inv(1, cas("k", "a", "b")).cas_ok(1, true);
    assert_bad(&h.events());
    // ... and fails correctly.
    let mut h = H::default();
    h.inv(1, cas("k", "a", "b"))
        .cas_ok(1, false)
        .r(1, "k", None);
    assert_ok(&h.events());
    // Two CASes from the same value cannot both succeed.
    let mut h = H::default();
    h.w(1, "k", "a")
        .inv(1, cas("k", "a", "b"))
        .inv(2, cas("k", "a", "c"));
    h.cas_ok(1, true).cas_ok(2, true);
    assert_bad(&h.events());
}

#[test]
fn read_of_a_value_never_written_is_rejected() {
    let mut h = H::default();
    h.w(1, "k", "a")
        .inv(2, wr("k", "b"))
        .inv(3, rd("k"))
        .read_ok(3, Some("zzz"))
        .write_ok(2);
    let res = assert_bad(&h.events());
    let f = failure_of(&res, "k");
    assert!(f.possible_values.contains(&"\"a\"".to_string()), "{f:?}");
    assert!(!f.concurrent.is_empty(), "{f:?}");
}

#[test]
fn reads_flip_flopping_after_writes_complete_are_rejected() {
    let mut h = H::default();
    h.inv(1, wr("k", "a"))
        .inv(2, wr("k", "b"))
        .write_ok(1)
        .write_ok(2);
    h.r(3, "k", Some("a")).r(3, "k", Some("b"));
    assert_bad(&h.events());
}

#[test]
fn shortest_failing_prefix_is_reported() {
    // Fine for a while, then one bad read, then more fine-looking traffic.
    let mut h = H::default();
    for i in 0..20 {
        let v = format!("v{i}");
        h.w(1, "k", &v).r(2, "k", Some(&v));
    }
    let bad_at = h.ev.len() + 3; // completion of the next read
    h.w(1, "k", "x").r(2, "k", Some("v3"));
    for i in 0..20 {
        let v = format!("u{i}");
        h.w(1, "k", &v).r(2, "k", Some(&v));
    }
    let res = assert_bad(&h.events());
    let f = failure_of(&res, "k");
    assert_eq!(f.event_index, Some(bad_at), "{}", f.explanation);
    assert_eq!(f.prefix_len, bad_at + 1);
    // The prefix before it is linearizable, the prefix including it is not.
    assert!(check_history(&h.ev[..bad_at]).ok);
    assert!(!check_history(&h.ev[..=bad_at]).ok);
}

// --- final values -------------------------------------------------------------------------

#[test]
fn final_value_consistency() {
    let mut h = H::default();
    h.w(1, "k", "a").w(2, "k", "b");
    let ev = h.events();
    assert!(final_value_consistent(&ev, "k", Some("b")));
    assert!(
        !final_value_consistent(&ev, "k", Some("a")),
        "acknowledged write b lost"
    );
    assert!(!final_value_consistent(&ev, "k", None));
    assert!(!final_value_consistent(&ev, "k", Some("never")));
    assert!(final_value_consistent(&ev, "other", None));
    assert!(!final_value_consistent(&ev, "other", Some("a")));

    // An indeterminate write may or may not be the final value.
    h.inv(3, wr("k", "c")).info(3);
    let ev = h.events();
    assert!(final_value_consistent(&ev, "k", Some("b")));
    assert!(final_value_consistent(&ev, "k", Some("c")));
    assert!(!final_value_consistent(&ev, "k", Some("a")));

    // Concurrent writes: either may be last.
    let mut h = H::default();
    h.inv(1, wr("k", "a"))
        .inv(2, wr("k", "b"))
        .write_ok(2)
        .write_ok(1);
    let ev = h.events();
    assert!(final_value_consistent(&ev, "k", Some("a")));
    assert!(final_value_consistent(&ev, "k", Some("b")));
    // ... unless a read pinned the order.
    h.r(3, "k", Some("a"));
    assert!(!final_value_consistent(&h.events(), "k", Some("b")));
}

#[test]
fn check_with_final_state_reports_lost_write() {
    let mut h = H::default();
    h.w(1, "x", "1").w(1, "x", "2").w(2, "y", "9");
    let mut fin = BTreeMap::new();
    fin.insert("x".to_string(), Some("1".to_string()));
    fin.insert("y".to_string(), Some("9".to_string()));
    let res = check_history_with_final_state(&h.events(), &fin, &CheckOptions::default());
    assert!(!res.ok);
    assert!(res.per_key["y"].is_ok());
    let f = failure_of(&res, "x");
    assert_eq!(f.event_index, None);
    assert_eq!(f.possible_values, vec!["\"2\"".to_string()]);
    assert!(
        f.explanation.contains("final value \"1\""),
        "{}",
        f.explanation
    );

    fin.insert("x".to_string(), Some("2".to_string()));
    assert!(check_history_with_final_state(&h.events(), &fin, &CheckOptions::default()).ok);
    // A key nobody wrote must be absent.
    fin.insert("z".to_string(), Some("?".to_string()));
    let res = check_history_with_final_state(&h.events(), &fin, &CheckOptions::default());
    assert_eq!(res.per_key["z"].verdict, Verdict::NotLinearizable);
}

// --- malformed histories, budget, serde ---------------------------------------------------

#[test]
fn malformed_histories_are_reported() {
    let ev = vec![Event::complete(1, 7, Outcome::Ok(OpResult::Write))];
    let res = check_history(&ev);
    assert!(!res.ok);
    assert_eq!(res.history_errors.len(), 1, "{:?}", res.history_errors);

    let mut h = H::default();
    h.inv(1, wr("k", "a")).inv(1, wr("k", "b")).write_ok(1);
    let res = check_history(&h.events());
    assert!(!res.ok);
    assert_eq!(res.history_errors.len(), 1);
    assert!(res.per_key["k"].is_ok());

    let mut h = H::default();
    h.inv(1, rd("k")).write_ok(1);
    let res = check_history(&h.events());
    assert!(!res.ok);
    assert_eq!(res.history_errors.len(), 1);
}

#[test]
fn tiny_budget_gives_unknown_not_ok() {
    let mut h = H::default();
    for p in 0..6 {
        h.inv(p, wr("k", &format!("{p}")));
    }
    for p in 0..6 {
        h.write_ok(p);
    }
    h.r(9, "k", Some("zzz"));
    let res = check_history_with(
        &h.events(),
        &CheckOptions {
            max_configurations: 5,
        },
    );
    assert!(!res.ok);
    assert_eq!(res.per_key["k"].verdict, Verdict::Unknown);
    assert!(res.per_key["k"].failure.is_some());
    assert_eq!(
        check_history(&h.events()).per_key["k"].verdict,
        Verdict::NotLinearizable
    );
}

#[test]
fn history_round_trips_through_json() {
    let mut h = H::default();
    h.w(1, "k", "a")
        .inv(2, cas("k", "a", "b"))
        .info(2)
        .inv(3, rd("k"))
        .read_ok(3, None);
    h.inv(4, wr("k", "c"))
        .fail(4)
        .inv(5, cas("k", "x", "y"))
        .cas_ok(5, false);
    let ev = h.events();
    let json = serde_json::to_string(&ev).expect("serialize");
    assert!(json.contains("\"type\":\"invoke\""), "{json}");
    let back: Vec<Event> = serde_json::from_str(&json).expect("deserialize");
    assert_eq!(back, ev);
    let res = check_history(&ev);
    let json = serde_json::to_string(&res).expect("serialize result");
    let back: CheckResult = serde_json::from_str(&json).expect("deserialize result");
    assert_eq!(back, res);
}

#[test]
fn sort_by_time_orders_events() {
    let mut ev = vec![
        Event::complete(30, 1, Outcome::Ok(OpResult::Write)),
        Event::invoke(10, 1, wr("k", "a")),
        Event::invoke(40, 2, rd("k")),
        Event::complete(50, 2, Outcome::Ok(OpResult::Read(Some("a".into())))),
    ];
    assert!(!check_history(&ev).ok);
    sort_by_time(&mut ev);
    assert_eq!(ev[0].time_ns(), 10);
    assert_eq!(ev[1].process(), 1);
    assert!(check_history(&ev).ok);
}
