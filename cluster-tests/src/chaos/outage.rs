//! The majority-side data-plane check: while a partition cuts off a minority, every gateway on
//! the majority side must keep serving HTTPS.
//!
//! The data plane serves from each node's local copy of the replicated state and needs no
//! leader and no quorum, so a partition should not interrupt a gateway that is not itself cut
//! off. The check reuses the probe's per-request results (probe.rs keeps one [`ProbeSample`]
//! per request): for every partition fault it takes the window from the fault's start until it
//! was healed and, per majority-side gateway, the longest part of that window without a
//! successful probe. Above the scenario's `max_majority_outage_ms` the run fails.
//!
//! Which gateways are on the majority side, per fault kind ([`majority_side`]):
//! - `isolate`, `majority-minority`, `one-way`, `link-down`: every node except the cut-off ones
//!   (the target, or the minority). For `one-way` the target still reaches the others but hears
//!   none of them, so it cannot follow or lead: it is the minority of one, the rest keep a
//!   connected majority. `link-down` also cuts the target off from its clients, so only the
//!   others are checked.
//! - `bridge`: every node. The two halves cannot talk to each other, but each half plus the
//!   bridge node is a majority, so no node is cut off from a quorum and every gateway must keep
//!   serving.
//! - other kinds (kill, pause, membership, disk-full, latency, loss) are not partitions and are
//!   not checked here; their effect shows in the whole-run figures.

use std::collections::BTreeMap;

use serde::Serialize;

use super::samples::{window_stats, GatewayStats, WindowStats};
use super::scenario::FaultKind;

/// The gateways that must keep serving while fault `kind` is in force, or `None` when the kind
/// is not a partition. `cut_off` are the nodes that lost contact with the majority (see the
/// module comment for the choice per kind).
pub fn majority_side(kind: FaultKind, cut_off: &[u64], ids: &[u64]) -> Option<Vec<u64>> {
    kind.is_partition().then(|| {
        ids.iter()
            .copied()
            .filter(|i| !cut_off.contains(i))
            .collect()
    })
}

/// One partition fault as the check sees it.
#[derive(Debug, Clone)]
pub struct Span {
    pub fault: usize,
    pub kind: String,
    /// From the fault's start until it was healed (ms since the workload started).
    pub from_ms: u64,
    pub to_ms: u64,
    pub majority: Vec<u64>,
}

/// Nodes one fault took down or cut off, from its start until it was healed.
#[derive(Debug, Clone)]
pub struct Down {
    pub fault: usize,
    pub from_ms: u64,
    pub to_ms: u64,
    pub nodes: Vec<u64>,
}

/// Removes from each partition's majority side the gateways that another fault overlapping it
/// in time took down (killed, paused, cut off): with overlapping faults, being outside this
/// partition's minority does not make a gateway healthy, and its outage is the other fault's
/// doing. The whole window is dropped for such a gateway, not only the overlap, because a
/// restarted node needs time before it serves again.
pub fn exclude_down(spans: Vec<Span>, down: &[Down]) -> Vec<Span> {
    spans
        .into_iter()
        .map(|mut s| {
            let others: Vec<u64> = down
                .iter()
                .filter(|d| d.fault != s.fault && d.from_ms < s.to_ms && s.from_ms < d.to_ms)
                .flat_map(|d| d.nodes.iter().copied())
                .collect();
            s.majority.retain(|id| !others.contains(id));
            s
        })
        .collect()
}

/// One partition window and what the majority-side gateways did in it.
#[derive(Debug, Clone, Serialize)]
pub struct PartitionWindow {
    pub fault: usize,
    pub kind: String,
    pub from_ms: u64,
    pub to_ms: u64,
    pub majority: Vec<u64>,
    /// Per majority-side gateway that the probe covered.
    pub gateways: BTreeMap<u64, WindowStats>,
    /// Every majority-side gateway was probed and stayed within the limit.
    pub ok: bool,
}

/// The result of the check, as it goes into the JSON report (`majority_data_plane`).
#[derive(Debug, Clone, Default, Serialize)]
pub struct MajorityDataPlane {
    /// The limit: the scenario's `max_majority_outage_ms`.
    pub max_outage_ms: u64,
    pub windows: Vec<PartitionWindow>,
    /// Per gateway, the longest outage over the windows in which it was on the majority side.
    pub longest_outage_ms: BTreeMap<u64, u64>,
    /// One line per broken limit, or why a window could not be checked; empty when it passed.
    pub violations: Vec<String>,
    pub ok: bool,
}

impl MajorityDataPlane {
    /// Whether the probe measured a majority-side outage above the limit (not merely a window
    /// it could not check).
    pub fn outage_seen(&self) -> bool {
        self.windows.iter().any(|w| {
            w.gateways
                .values()
                .any(|g| g.longest_outage_ms > self.max_outage_ms)
        })
    }
}

/// Checks every partition window against the limit. `probe` is `None` when the data-plane
/// probe did not run; with partition faults that fails the check (it could not be made).
pub fn check(
    spans: &[Span],
    probe: Option<&BTreeMap<u64, GatewayStats>>,
    max_outage_ms: u64,
) -> MajorityDataPlane {
    let mut r = MajorityDataPlane {
        max_outage_ms,
        ..Default::default()
    };
    if !spans.is_empty() && probe.is_none() {
        r.violations.push(format!(
            "the data-plane probe did not run: the majority side of {} partition fault(s) was \
             not checked",
            spans.len()
        ));
    }
    for s in spans {
        let mut w = PartitionWindow {
            fault: s.fault,
            kind: s.kind.clone(),
            from_ms: s.from_ms,
            to_ms: s.to_ms,
            majority: s.majority.clone(),
            gateways: BTreeMap::new(),
            ok: probe.is_some(),
        };
        let label = format!(
            "fault {} ({}, {}..{} ms, majority side {:?})",
            s.fault, s.kind, s.from_ms, s.to_ms, s.majority
        );
        for id in &s.majority {
            let Some(g) = probe.and_then(|p| p.get(id)) else {
                if probe.is_some() {
                    w.ok = false;
                    r.violations
                        .push(format!("gateway {id}: no probe results during {label}"));
                }
                continue;
            };
            if s.from_ms >= g.probed_until_ms {
                w.ok = false;
                r.violations.push(format!(
                    "gateway {id}: the probe had stopped ({} ms) before {label}",
                    g.probed_until_ms
                ));
                continue;
            }
            let ws = window_stats(&g.samples, g.probed_until_ms, s.from_ms, s.to_ms);
            if ws.longest_outage_ms > max_outage_ms {
                w.ok = false;
                r.violations.push(format!(
                    "gateway {id}: no successful HTTPS probe for {} ms during {label}; limit \
                     {max_outage_ms} ms (max_majority_outage_ms)",
                    ws.longest_outage_ms
                ));
            }
            let worst = r.longest_outage_ms.entry(*id).or_default();
            *worst = (*worst).max(ws.longest_outage_ms);
            w.gateways.insert(*id, ws);
        }
        r.windows.push(w);
    }
    r.ok = r.violations.is_empty();
    r
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::chaos::samples::ProbeSample;

    /// A probe every 100 ms from `0` to `until_ms`, failing inside `down` (ms, half-open).
    fn samples(until_ms: u64, down: &[(u64, u64)]) -> Vec<ProbeSample> {
        (1..=until_ms / 100)
            .map(|i| {
                let at_ms = i * 100;
                let ok = !down.iter().any(|(a, b)| (*a..*b).contains(&at_ms));
                ProbeSample { at_ms, ok }
            })
            .collect()
    }

    fn gateway(until_ms: u64, down: &[(u64, u64)]) -> GatewayStats {
        let samples = samples(until_ms, down);
        let whole = window_stats(&samples, until_ms, 0, until_ms);
        GatewayStats {
            requests: whole.requests,
            errors: whole.errors,
            error_rate: whole.errors as f64 / whole.requests.max(1) as f64,
            longest_outage_ms: whole.longest_outage_ms,
            probed_until_ms: until_ms,
            samples,
        }
    }

    #[test]
    fn overlapping_down_nodes_leave_the_majority_side() {
        let spans = vec![
            span(1, 10_000, 20_000, &[2, 3, 4, 5]),
            span(3, 40_000, 50_000, &[1, 2, 3, 4]),
        ];
        let down = [
            // Its own cut-off node is not in its majority anyway; listed to show it is skipped.
            Down {
                fault: 1,
                from_ms: 10_000,
                to_ms: 20_000,
                nodes: vec![1],
            },
            // A pause overlapping the first partition's end.
            Down {
                fault: 2,
                from_ms: 18_000,
                to_ms: 25_000,
                nodes: vec![4],
            },
            // A kill that ended exactly when the second partition began: no overlap.
            Down {
                fault: 0,
                from_ms: 30_000,
                to_ms: 40_000,
                nodes: vec![2],
            },
        ];
        let out = exclude_down(spans, &down);
        assert_eq!(out[0].majority, vec![2, 3, 5]);
        assert_eq!(out[1].majority, vec![1, 2, 3, 4]);
    }

    fn span(fault: usize, from_ms: u64, to_ms: u64, majority: &[u64]) -> Span {
        Span {
            fault,
            kind: "isolate".into(),
            from_ms,
            to_ms,
            majority: majority.to_vec(),
        }
    }

    #[test]
    fn healthy_gateway_has_only_probe_period_gaps() {
        let s = samples(10_000, &[]);
        let w = window_stats(&s, 10_000, 3_050, 6_050);
        assert_eq!(w.requests, 30);
        assert_eq!(w.errors, 0);
        assert_eq!(w.longest_outage_ms, 100);
    }

    #[test]
    fn outage_inside_the_window_counts_in_full() {
        // Probes at 4000..=5900 fail: last success 3900, next 6000.
        let s = samples(10_000, &[(4_000, 6_000)]);
        let w = window_stats(&s, 10_000, 3_000, 8_000);
        assert_eq!(w.longest_outage_ms, 2_100);
        assert_eq!(w.errors, 20);
        // The whole-run figure is the same gap.
        assert_eq!(window_stats(&s, 10_000, 0, 10_000).longest_outage_ms, 2_100);
    }

    #[test]
    fn outage_outside_the_window_does_not_count() {
        let s = samples(10_000, &[(1_000, 3_000)]);
        let w = window_stats(&s, 10_000, 5_000, 8_000);
        assert_eq!(w.longest_outage_ms, 100);
        assert_eq!(w.errors, 0);
        // Before the window, and right up to its start: still only the gap at the edge.
        let w = window_stats(&s, 10_000, 3_000, 8_000);
        assert_eq!(w.longest_outage_ms, 100);
    }

    #[test]
    fn outage_straddling_the_window_is_clipped_to_it() {
        // Last success 1900, next 6000.
        let s = samples(10_000, &[(2_000, 6_000)]);
        // Began before the window: counted from the window's start.
        assert_eq!(
            window_stats(&s, 10_000, 5_000, 8_000).longest_outage_ms,
            1_000
        );
        // Still going when the window closes: counted up to its end.
        assert_eq!(
            window_stats(&s, 10_000, 1_000, 2_500).longest_outage_ms,
            600
        );
        // Covers the whole window.
        assert_eq!(
            window_stats(&s, 10_000, 3_000, 4_000).longest_outage_ms,
            1_000
        );
    }

    #[test]
    fn outage_until_the_probe_stopped_counts_up_to_its_end() {
        // Down from 8000 to the end (10000) and never back.
        let s = samples(10_000, &[(8_000, 20_000)]);
        assert_eq!(
            window_stats(&s, 10_000, 7_000, 12_000).longest_outage_ms,
            2_100
        );
        // No success at all: the outage starts at the probe's start.
        let s = samples(3_000, &[(0, 20_000)]);
        assert_eq!(
            window_stats(&s, 3_000, 1_000, 2_000).longest_outage_ms,
            1_000
        );
    }

    #[test]
    fn majority_side_per_kind() {
        let ids = [1, 2, 3, 4, 5];
        assert_eq!(
            majority_side(FaultKind::Isolate, &[2], &ids),
            Some(vec![1, 3, 4, 5])
        );
        assert_eq!(
            majority_side(FaultKind::MajorityMinority, &[2, 4], &ids),
            Some(vec![1, 3, 5])
        );
        assert_eq!(
            majority_side(FaultKind::OneWay, &[5], &ids),
            Some(vec![1, 2, 3, 4])
        );
        assert_eq!(
            majority_side(FaultKind::LinkDown, &[1], &ids),
            Some(vec![2, 3, 4, 5])
        );
        // A bridge cuts nobody off from a quorum: every gateway must keep serving.
        assert_eq!(
            majority_side(FaultKind::Bridge, &[], &ids),
            Some(ids.to_vec())
        );
        for k in [
            FaultKind::Kill,
            FaultKind::Pause,
            FaultKind::Membership,
            FaultKind::DiskFull,
            FaultKind::Latency,
            FaultKind::Loss,
        ] {
            assert_eq!(majority_side(k, &[1], &ids), None, "{k:?}");
        }
    }

    #[test]
    fn check_passes_when_the_majority_keeps_serving() {
        // Gateway 1 (the isolated minority) is down during the partition; 2 and 3 are not.
        let probe = BTreeMap::from([
            (1, gateway(20_000, &[(5_000, 11_000)])),
            (2, gateway(20_000, &[])),
            (3, gateway(20_000, &[(15_000, 17_000)])),
        ]);
        let r = check(&[span(0, 5_000, 11_000, &[2, 3])], Some(&probe), 1_000);
        assert!(r.ok, "{:?}", r.violations);
        assert!(!r.outage_seen());
        assert_eq!(r.windows.len(), 1);
        assert!(r.windows[0].ok);
        assert_eq!(r.longest_outage_ms, BTreeMap::from([(2, 100), (3, 100)]));
        assert_eq!(r.windows[0].gateways[&2].requests, 61);
    }

    #[test]
    fn check_fails_on_a_majority_side_outage() {
        // Gateway 3 is on the majority side and stops serving for 2 s inside the window.
        let probe = BTreeMap::from([
            (1, gateway(20_000, &[])),
            (2, gateway(20_000, &[])),
            (3, gateway(20_000, &[(7_000, 9_000)])),
        ]);
        let spans = [
            span(0, 1_000, 3_000, &[1, 2, 3]),
            span(1, 5_000, 11_000, &[2, 3]),
        ];
        let r = check(&spans, Some(&probe), 1_000);
        assert!(!r.ok);
        assert!(r.outage_seen());
        assert!(r.windows[0].ok);
        assert!(!r.windows[1].ok);
        assert_eq!(r.longest_outage_ms[&3], 2_100);
        assert_eq!(r.violations.len(), 1, "{:?}", r.violations);
        assert!(
            r.violations[0].contains("gateway 3") && r.violations[0].contains("2100 ms"),
            "{:?}",
            r.violations
        );
        // Just at the limit passes; the limit is an upper bound, not a strict one.
        assert!(check(&spans, Some(&probe), 2_100).ok);
    }

    #[test]
    fn check_fails_when_it_cannot_run() {
        let spans = [span(0, 1_000, 3_000, &[2, 3])];
        let r = check(&spans, None, 1_000);
        assert!(!r.ok);
        assert!(!r.outage_seen());
        assert!(r.violations[0].contains("did not run"));
        // A majority-side gateway the probe has no results for.
        let probe = BTreeMap::from([(2, gateway(20_000, &[]))]);
        let r = check(&spans, Some(&probe), 1_000);
        assert!(!r.ok);
        assert!(r.violations[0].contains("gateway 3"), "{:?}", r.violations);
        // A window after the probe stopped.
        let probe = BTreeMap::from([(2, gateway(500, &[])), (3, gateway(500, &[]))]);
        assert!(!check(&spans, Some(&probe), 1_000).ok);
        // No partition faults: nothing to check, passes even without a probe.
        assert!(check(&[], None, 1_000).ok);
    }
}
