//! Which keys of the applied state each applied entry may have changed.
//!
//! Every node derives views from the applied state: the edge's routing snapshot, the WireGuard
//! peer table. Recomputing them from the whole state after every entry costs O(instances) per
//! change (seconds of CPU per change at 65,000 CVMs, with the read lock held, which blocks
//! `apply`). The state machine instead records, next to the state and under the same write
//! lock, which keys each entry touched. A consumer keeps a [`ChangeCursor`] and, under one read
//! lock, gets the state and the keys touched since its cursor ([`SharedState::read_changes`]),
//! so it copies out only those and rebuilds the rest of its view outside the lock.
//!
//! The journal is local to each node and never replicated or persisted: it is derived from the
//! commands as they are applied, so it changes neither the log, the snapshot format nor what
//! `apply` does. It is bounded; a consumer that falls further behind than [`JOURNAL_CAPACITY`]
//! entries, or that meets a snapshot install, is told [`Delta::Everything`] and rebuilds in full.
//!
//! "Touched" is conservative: a key may be named although its value did not change (a
//! rejected command, a renewal); consumers compare. A key whose value changed is always named.
//!
//! [`SharedState::read_changes`]: crate::store::SharedState::read_changes

use std::collections::{BTreeSet, VecDeque};

use crate::state::{AcmeCommand, ClusterState, Command, RewrapTarget};

/// How many touched keys the journal keeps. Consumers catch up every few tens of milliseconds,
/// so they lag by a handful of entries; a burst beyond this (a mass expiry) costs one full
/// rebuild instead of memory.
pub const JOURNAL_CAPACITY: usize = 1 << 16;

/// One key an applied entry may have changed.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Touched {
    /// `instances[id]` (and `instance_weights[id]`).
    Instance(String),
    /// `apps[name]`.
    App(String),
    /// `domains[name]`.
    Domain(String),
    /// `certificates[name]`.
    Certificate(String),
    /// `nodes` or `regions`.
    Topology,
    /// Anything: the state was replaced (snapshot install) or changed in a way not tracked by
    /// key (the tunnel pool).
    Everything,
}

/// Adds what `cmd` may change in `state` (the state *before* it is applied) to `out`.
pub fn touched(state: &ClusterState, cmd: &Command, out: &mut Vec<Touched>) {
    match cmd {
        Command::UpsertNode(_)
        | Command::RemoveNode { .. }
        | Command::SetNodeStatus { .. }
        | Command::UpsertRegion(_) => out.push(Touched::Topology),
        Command::CreateApp { name, .. } | Command::CreateAppV2 { name, .. } => {
            out.push(Touched::App(name.clone()))
        }
        Command::DeleteApp { name } => {
            // The app's instances and domains go with it (see `ClusterState::apply`).
            out.push(Touched::App(name.clone()));
            out.extend(
                state
                    .instances
                    .values()
                    .filter(|i| &i.app == name)
                    .map(|i| Touched::Instance(i.instance_id.clone())),
            );
            out.extend(
                state
                    .domains
                    .values()
                    .filter(|d| &d.app == name)
                    .map(|d| Touched::Domain(d.name.clone())),
            );
        }
        Command::RegisterInstance(i) => out.push(Touched::Instance(i.instance_id.clone())),
        Command::RegisterInstanceV2(i) => out.push(Touched::Instance(i.instance_id.clone())),
        Command::RegisterInstanceV3(r) => {
            out.push(Touched::Instance(r.instance.instance_id.clone()))
        }
        Command::RemoveInstance { instance_id }
        | Command::SetInstanceWeight { instance_id, .. } => {
            out.push(Touched::Instance(instance_id.clone()))
        }
        Command::ExpireInstances(list) => out.extend(
            list.iter()
                .map(|s| Touched::Instance(s.instance_id.clone())),
        ),
        Command::SetTunnelPool { .. } => out.push(Touched::Everything),
        Command::AddDomain(d) => out.push(Touched::Domain(d.name.clone())),
        Command::VerifyDomainClaim { name, .. }
        | Command::VerifyDomain { name }
        | Command::RemoveDomain { name } => out.push(Touched::Domain(name.clone())),
        Command::PutCertificate(c) => out.push(Touched::Certificate(c.name.clone())),
        Command::RemoveCertificate { name } => out.push(Touched::Certificate(name.clone())),
        Command::SetWafPolicy { app: Some(app), .. } => out.push(Touched::App(app.clone())),
        // The default applies to every app without a policy of its own.
        Command::SetWafPolicy { app: None, .. } => out.push(Touched::Everything),
        Command::RewrapKeys(list) => {
            for r in list {
                if let RewrapTarget::Certificate(name) = &r.target {
                    out.push(Touched::Certificate(name.clone()));
                }
            }
        }
        Command::Acme(AcmeCommand::PutCertificate { cert, .. }) => {
            out.push(Touched::Certificate(cert.name.clone()))
        }
        // The rest of the ACME state (account, lease, challenges, orders) and the registers
        // are read directly by their users, never through a derived view.
        Command::Acme(_) | Command::CasRegister { .. } => {}
        Command::Batch(cmds) => {
            for c in cmds {
                touched(state, c, out);
            }
        }
    }
}

/// A consumer's position in the journal.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ChangeCursor(u64);

/// The keys touched since a cursor, deduplicated.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Changes {
    pub instances: BTreeSet<String>,
    pub apps: BTreeSet<String>,
    pub domains: BTreeSet<String>,
    pub certificates: BTreeSet<String>,
    /// Nodes or regions changed.
    pub topology: bool,
}

impl Changes {
    pub fn is_empty(&self) -> bool {
        self == &Changes::default()
    }
}

/// What changed since a consumer's cursor.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Delta {
    /// Rebuild from the whole state.
    Everything,
    Keys(Changes),
}

/// The bounded journal of touched keys. Lives beside the applied state and is written under
/// the same write lock, so a reader holding the read lock sees the two agree.
#[derive(Debug, Default)]
pub(crate) struct Journal {
    /// Sequence number of `entries[0]`.
    start: u64,
    entries: VecDeque<Touched>,
}

impl Journal {
    fn end(&self) -> u64 {
        self.start + self.entries.len() as u64
    }

    pub(crate) fn record(&mut self, touched: impl IntoIterator<Item = Touched>) {
        for t in touched {
            if t == Touched::Everything {
                self.everything();
                continue;
            }
            if self.entries.len() == JOURNAL_CAPACITY {
                self.entries.pop_front();
                self.start += 1;
            }
            self.entries.push_back(t);
        }
    }

    /// The whole state changed: every existing cursor must rebuild in full.
    pub(crate) fn everything(&mut self) {
        // Takes a sequence number of its own, so a cursor handed out before (equal to the old
        // end) is distinguishable from one handed out after.
        self.start = self.end() + 1;
        self.entries.clear();
    }

    /// What changed since `cursor` (`None`: never read), and the cursor to use next time.
    pub(crate) fn since(&self, cursor: Option<ChangeCursor>) -> (Delta, ChangeCursor) {
        let next = ChangeCursor(self.end());
        let from = match cursor {
            // Older cursors lost entries to the capacity bound or to `everything`.
            Some(ChangeCursor(c)) if c >= self.start => c,
            _ => return (Delta::Everything, next),
        };
        let mut ch = Changes::default();
        let skip = usize::try_from(from - self.start).unwrap_or(usize::MAX);
        for t in self.entries.iter().skip(skip) {
            match t {
                Touched::Instance(id) => {
                    ch.instances.insert(id.clone());
                }
                Touched::App(n) => {
                    ch.apps.insert(n.clone());
                }
                Touched::Domain(n) => {
                    ch.domains.insert(n.clone());
                }
                Touched::Certificate(n) => {
                    ch.certificates.insert(n.clone());
                }
                Touched::Topology => ch.topology = true,
                // Never stored: `record` turns it into `everything()`.
                Touched::Everything => return (Delta::Everything, next),
            }
        }
        (Delta::Keys(ch), next)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    fn keys(d: Delta) -> Changes {
        match d {
            Delta::Keys(c) => c,
            Delta::Everything => panic!("expected keys"),
        }
    }

    #[test]
    fn cursors_see_what_came_after_them() {
        let mut j = Journal::default();
        let (d, c0) = j.since(None);
        assert_eq!(d, Delta::Everything);
        j.record([Touched::Instance("a".into()), Touched::App("x".into())]);
        let (d, c1) = j.since(Some(c0));
        let ch = keys(d);
        assert_eq!(ch.instances.len(), 1);
        assert_eq!(ch.apps.len(), 1);
        let (d, _) = j.since(Some(c1));
        assert!(keys(d).is_empty());
        j.everything();
        assert_eq!(j.since(Some(c1)).0, Delta::Everything);
        let (_, c2) = j.since(Some(c1));
        j.record([Touched::Topology]);
        assert!(keys(j.since(Some(c2)).0).topology);
    }

    #[test]
    fn a_consumer_that_falls_behind_rebuilds_in_full() {
        let mut j = Journal::default();
        let (_, c0) = j.since(None);
        j.record((0..JOURNAL_CAPACITY).map(|i| Touched::Instance(i.to_string())));
        assert_eq!(keys(j.since(Some(c0)).0).instances.len(), JOURNAL_CAPACITY);
        j.record([Touched::Instance("one more".into())]);
        assert_eq!(j.since(Some(c0)).0, Delta::Everything);
    }

    /// Every key whose value differs after a command is named by `touched`.
    fn assert_covers(before: &ClusterState, after: &ClusterState, t: &[Touched]) {
        if t.contains(&Touched::Everything) {
            return;
        }
        let has = |x: Touched| t.contains(&x);
        let ids: BTreeSet<&String> = before
            .instances
            .keys()
            .chain(after.instances.keys())
            .chain(before.instance_weights.keys())
            .chain(after.instance_weights.keys())
            .collect();
        for id in ids {
            let changed = before.instances.get(id) != after.instances.get(id)
                || before.instance_weights.get(id) != after.instance_weights.get(id);
            assert!(
                !changed || has(Touched::Instance(id.clone())),
                "instance {id}"
            );
        }
        for n in before.apps.keys().chain(after.apps.keys()) {
            let changed = before.apps.get(n) != after.apps.get(n);
            assert!(!changed || has(Touched::App(n.clone())), "app {n}");
        }
        for n in before.domains.keys().chain(after.domains.keys()) {
            let changed = before.domains.get(n) != after.domains.get(n);
            assert!(!changed || has(Touched::Domain(n.clone())), "domain {n}");
        }
        for n in before.certificates.keys().chain(after.certificates.keys()) {
            let changed = before.certificates.get(n) != after.certificates.get(n);
            assert!(!changed || has(Touched::Certificate(n.clone())), "cert {n}");
        }
        let topo = before.nodes != after.nodes || before.regions != after.regions;
        assert!(!topo || has(Touched::Topology), "topology");
    }

    proptest! {
        #[test]
        fn touched_names_every_changed_key(
            cmds in proptest::collection::vec(crate::state::tests::command(), 0..60)
        ) {
            let mut s = ClusterState::default();
            for (i, c) in cmds.iter().enumerate() {
                let mut t = Vec::new();
                touched(&s, c, &mut t);
                let before = s.clone();
                s.apply(i as u64 + 1, c);
                assert_covers(&before, &s, &t);
            }
        }
    }
}
