//! The probe's per-request results and the figures drawn from them, shared by the probe that
//! records them (`probe.rs`) and the majority-side check that cuts windows out of them
//! (`outage.rs`). A leaf, so neither imports the other.

use serde::Serialize;

/// Per-gateway probe results.
#[derive(Debug, Clone, Default, Serialize)]
pub struct GatewayStats {
    pub requests: u64,
    pub errors: u64,
    pub error_rate: f64,
    /// Longest time without a successful probe (ms).
    pub longest_outage_ms: u64,
    /// When the probe of this gateway stopped (ms since the workload started).
    pub probed_until_ms: u64,
    /// Every request's outcome, in order: the majority-side check (outage.rs) cuts the
    /// partition windows out of it. Not in the JSON report (about 10 per second per gateway).
    #[serde(skip)]
    pub samples: Vec<ProbeSample>,
}

/// One probe request: when it completed (ms since the workload started) and whether the
/// gateway answered 200.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ProbeSample {
    pub at_ms: u64,
    pub ok: bool,
}

/// Probe figures of one gateway inside one time window.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize)]
pub struct WindowStats {
    /// Probes that completed inside the window.
    pub requests: u64,
    pub errors: u64,
    /// Longest part of the window without a successful probe (ms).
    pub longest_outage_ms: u64,
}

/// Probe figures for the window `from_ms..to_ms` (ms since the probe started).
///
/// An outage is the stretch between two consecutive successful probes (completion times), or
/// between the probe's start (0) or end (`probed_until_ms`) and the nearest success; the figure
/// is the longest part of any outage that lies inside the window. An outage that began before
/// the window counts only from the window's start (what happened before the fault is not the
/// fault's doing), one still going on when the window closes counts up to its end. Time after
/// `probed_until_ms` is unknown and not counted.
pub fn window_stats(
    samples: &[ProbeSample],
    probed_until_ms: u64,
    from_ms: u64,
    to_ms: u64,
) -> WindowStats {
    let mut w = WindowStats::default();
    for s in samples {
        if (from_ms..=to_ms).contains(&s.at_ms) {
            w.requests += 1;
            if !s.ok {
                w.errors += 1;
            }
        }
    }
    let end = to_ms.min(probed_until_ms);
    let mut last_ok = 0;
    let successes = samples.iter().filter(|s| s.ok).map(|s| s.at_ms);
    for next_ok in successes.chain(std::iter::once(probed_until_ms)) {
        let overlap = next_ok.min(end).saturating_sub(last_ok.max(from_ms));
        w.longest_outage_ms = w.longest_outage_ms.max(overlap);
        last_ok = last_ok.max(next_ok);
    }
    w
}
