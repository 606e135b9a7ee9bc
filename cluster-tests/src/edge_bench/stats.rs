//! The samples of one measurement ([`Stats`] in a [`Window`], a [`Run`]), and the latency
//! histogram and percentile helpers every benchmark driver uses (tunnel-bench and raft-bench
//! too).

use std::time::Instant;

use hdrhistogram::Histogram;

/// A latency histogram in microseconds: 1 µs to 60 s, 3 significant digits.
pub fn latency_histogram() -> Histogram<u64> {
    Histogram::new_with_bounds(1, 60_000_000, 3).expect("static histogram bounds")
}

/// The `q` quantile of a histogram of microseconds, in milliseconds.
pub fn quantile_ms(h: &Histogram<u64>, q: f64) -> f64 {
    h.value_at_quantile(q) as f64 / 1000.0
}

/// The measured window: requests started before `start` (warm-up) or finished after `end` are
/// not counted, and none are started after `end`.
#[derive(Clone, Copy)]
pub struct Window {
    pub start: Instant,
    pub end: Instant,
}

/// What one measurement of one target collected: the latency of every request that completed
/// inside the window (µs), and the errors.
pub struct Stats {
    pub hist: Histogram<u64>,
    pub errors: u64,
    pub first_error: Option<String>,
}

impl Stats {
    pub fn new() -> Stats {
        Stats {
            hist: latency_histogram(),
            errors: 0,
            first_error: None,
        }
    }

    /// Counts a request started at `t0` that just ended with `r`, if it lies inside `w`.
    pub fn done(&mut self, w: Window, t0: Instant, r: &anyhow::Result<()>) {
        let now = Instant::now();
        if t0 < w.start || now > w.end {
            return;
        }
        match r {
            Ok(()) => self.hist.saturating_record((now - t0).as_micros() as u64),
            Err(e) => {
                self.errors += 1;
                if self.first_error.is_none() {
                    self.first_error = Some(format!("{e:#}"));
                }
            }
        }
    }

    pub fn merge(&mut self, o: Stats) -> anyhow::Result<()> {
        self.hist.add(&o.hist)?;
        self.errors += o.errors;
        if self.first_error.is_none() {
            self.first_error = o.first_error;
        }
        Ok(())
    }
}

impl Default for Stats {
    fn default() -> Self {
        Stats::new()
    }
}

/// One measurement of one target in one mode.
pub struct Run {
    pub stats: Stats,
    /// Length of the measured window.
    pub secs: f64,
    /// CPU seconds the target (with its child processes) used in the measured window.
    pub cpu: Option<f64>,
}
