//! The tables: for every mode and target the merged rounds (req/s, percentiles, errors, CPU
//! per request, ratios to the best peer proxy), and the paired comparison of Portcullis with
//! the better peer of each round.

use std::collections::BTreeMap;

use super::stats::{quantile_ms, Run, Stats};
use super::target::{Kind, Mode};

/// Every round of one target in one mode, merged.
pub struct Merged {
    stats: Stats,
    secs: f64,
    per_round: Vec<Round>,
    /// The target's CPU seconds over all measured windows, when every round had them.
    cpu: Option<f64>,
}

/// One round of one target in one mode, kept apart for the paired comparison.
#[derive(Clone, Copy)]
struct Round {
    rate: f64,
    p99_ms: f64,
    cpu_us: Option<f64>,
}

impl Merged {
    fn rate(&self) -> f64 {
        self.stats.hist.len() as f64 / self.secs.max(f64::MIN_POSITIVE)
    }
    fn ms(&self, q: f64) -> f64 {
        quantile_ms(&self.stats.hist, q)
    }
    /// Target CPU microseconds per completed request.
    fn cpu_us(&self) -> Option<f64> {
        cpu_per_request(self.cpu, self.stats.hist.len())
    }
}

/// CPU µs per request from CPU seconds over `requests`; none without requests.
fn cpu_per_request(cpu_secs: Option<f64>, requests: u64) -> Option<f64> {
    cpu_secs
        .filter(|_| requests > 0)
        .map(|c| c * 1e6 / requests as f64)
}

fn ratio(x: f64, of: Option<f64>) -> String {
    match of {
        Some(b) if b > 0.0 => format!("{:.2}", x / b),
        _ => "–".into(),
    }
}

/// The table of every mode and target: rates, percentiles, errors, CPU per request, and their
/// ratios to the best peer proxy.
pub fn table(results: &BTreeMap<(Mode, Kind), Merged>, modes: &[Mode], targets: &[Kind]) -> String {
    let mut s = String::new();
    s.push_str(
        "| mode | target | req/s | p50 ms | p99 ms | p99.9 ms | errors | req/s ÷ best proxy | \
         p50 ÷ best proxy | p99 ÷ best proxy | CPU µs/req | CPU ÷ best proxy | req/s per round |\n",
    );
    s.push_str("|---|---|---|---|---|---|---|---|---|---|---|---|---|\n");
    for &mode in modes {
        // "Best proxy" per metric: the better of nginx and HAProxy on that metric.
        let proxies: Vec<&Merged> = [Kind::Nginx, Kind::Haproxy]
            .iter()
            .filter_map(|k| results.get(&(mode, *k)))
            .collect();
        let best_rate = proxies.iter().map(|m| m.rate()).reduce(f64::max);
        let best_p50 = proxies.iter().map(|m| m.ms(0.5)).reduce(f64::min);
        let best_p99 = proxies.iter().map(|m| m.ms(0.99)).reduce(f64::min);
        let best_cpu = proxies.iter().filter_map(|m| m.cpu_us()).reduce(f64::min);
        for &kind in targets {
            let Some(m) = results.get(&(mode, kind)) else {
                continue;
            };
            let rounds: Vec<String> = m
                .per_round
                .iter()
                .map(|r| format!("{:.0}", r.rate))
                .collect();
            let cpu = m.cpu_us();
            s.push_str(&format!(
                "| {} | {} | {:.0} | {:.2} | {:.2} | {:.2} | {} | {} | {} | {} | {} | {} | {} |\n",
                mode.label(),
                kind.label(),
                m.rate(),
                m.ms(0.5),
                m.ms(0.99),
                m.ms(0.999),
                m.stats.errors,
                ratio(m.rate(), best_rate),
                ratio(m.ms(0.5), best_p50),
                ratio(m.ms(0.99), best_p99),
                cpu.map_or("–".into(), |c| format!("{c:.1}")),
                cpu.map_or("–".into(), |c| ratio(c, best_cpu)),
                rounds.join(", "),
            ));
        }
    }
    s
}

/// Portcullis against the better proxy *of the same round*, per metric: rounds run back to
/// back, so a slow spell of this shared machine weighs on both sides of each ratio. Returns
/// `median (min–max)` and how many rounds Portcullis was at least as good.
fn paired(
    results: &BTreeMap<(Mode, Kind), Merged>,
    mode: Mode,
    metric: impl Fn(&Round) -> Option<f64>,
    higher_is_better: bool,
) -> Option<(String, usize, usize)> {
    let ours = &results.get(&(mode, Kind::Portcullis))?.per_round;
    let proxies: Vec<&Vec<Round>> = [Kind::Nginx, Kind::Haproxy]
        .iter()
        .filter_map(|k| results.get(&(mode, *k)).map(|m| &m.per_round))
        .collect();
    let mut ratios: Vec<f64> = ours
        .iter()
        .enumerate()
        .filter_map(|(i, r)| {
            let best = proxies
                .iter()
                .filter_map(|p| p.get(i).and_then(&metric))
                .reduce(if higher_is_better { f64::max } else { f64::min })?;
            Some(metric(r)? / best)
        })
        .filter(|x| x.is_finite())
        .collect();
    if ratios.is_empty() {
        return None;
    }
    ratios.sort_by(f64::total_cmp);
    let n = ratios.len();
    let median = if n % 2 == 1 {
        ratios[n / 2]
    } else {
        (ratios[n / 2 - 1] + ratios[n / 2]) / 2.0
    };
    let as_good = ratios
        .iter()
        .filter(|&&x| if higher_is_better { x >= 1.0 } else { x <= 1.0 })
        .count();
    Some((
        format!("{median:.2} ({:.2}–{:.2})", ratios[0], ratios[n - 1]),
        as_good,
        n,
    ))
}

/// The paired table: per mode, Portcullis against the better peer of each round.
pub fn paired_table(results: &BTreeMap<(Mode, Kind), Merged>, modes: &[Mode]) -> String {
    let mut s = String::from(
        "Paired by round: Portcullis ÷ the better of nginx and HAProxy in the same round, \
         median (min–max), and the rounds in which Portcullis was at least as good.\n\n\
         | mode | req/s ratio | rounds ≥ | p99 ratio | rounds ≤ | CPU µs/req ratio | rounds ≤ |\n\
         |---|---|---|---|---|---|---|\n",
    );
    let cell = |x: Option<(String, usize, usize)>| match x {
        Some((r, good, n)) => (r, format!("{good}/{n}")),
        None => ("–".into(), "–".into()),
    };
    for &mode in modes {
        // No proxy ran in this mode (HTTP/3): no row.
        let Some(rate) = paired(results, mode, |r| Some(r.rate), true) else {
            continue;
        };
        let (rate, rate_n) = cell(Some(rate));
        let (p99, p99_n) = cell(paired(results, mode, |r| Some(r.p99_ms), false));
        let (cpu, cpu_n) = cell(paired(results, mode, |r| r.cpu_us, false));
        s.push_str(&format!(
            "| {} | {rate} | {rate_n} | {p99} | {p99_n} | {cpu} | {cpu_n} |\n",
            mode.label()
        ));
    }
    s
}

fn round_of(r: &Run, rate: f64) -> Round {
    Round {
        rate,
        p99_ms: quantile_ms(&r.stats.hist, 0.99),
        cpu_us: cpu_per_request(r.cpu, r.stats.hist.len()),
    }
}

/// Adds one round of `kind` in `mode` (`rate`: its requests per second) to `results`.
pub fn add_round(
    results: &mut BTreeMap<(Mode, Kind), Merged>,
    mode: Mode,
    kind: Kind,
    r: Run,
    rate: f64,
) -> anyhow::Result<()> {
    let this_round = round_of(&r, rate);
    match results.get_mut(&(mode, kind)) {
        Some(m) => {
            m.stats.merge(r.stats)?;
            m.secs += r.secs;
            m.per_round.push(this_round);
            m.cpu = m.cpu.zip(r.cpu).map(|(x, y)| x + y);
        }
        None => {
            results.insert(
                (mode, kind),
                Merged {
                    stats: r.stats,
                    secs: r.secs,
                    per_round: vec![this_round],
                    cpu: r.cpu,
                },
            );
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn merged(rounds: &[(f64, f64, Option<f64>)]) -> Merged {
        Merged {
            stats: Stats::new(),
            secs: 1.0,
            per_round: rounds
                .iter()
                .map(|&(rate, p99_ms, cpu_us)| Round {
                    rate,
                    p99_ms,
                    cpu_us,
                })
                .collect(),
            cpu: None,
        }
    }

    /// Each round is compared with the better proxy of that same round, not with the merged
    /// totals: a slow round of Portcullis against a fast round of HAProxy is no comparison.
    #[test]
    fn paired_ratios_compare_each_round_with_the_better_proxy_of_that_round() {
        let mut r = BTreeMap::new();
        r.insert(
            (Mode::H2, Kind::Portcullis),
            merged(&[
                (100.0, 2.0, Some(10.0)),
                (50.0, 4.0, None),
                (90.0, 1.0, Some(9.0)),
            ]),
        );
        r.insert(
            (Mode::H2, Kind::Nginx),
            merged(&[
                (80.0, 1.0, Some(20.0)),
                (40.0, 8.0, None),
                (100.0, 2.0, Some(9.0)),
            ]),
        );
        r.insert(
            (Mode::H2, Kind::Haproxy),
            merged(&[
                (50.0, 4.0, Some(5.0)),
                (45.0, 5.0, None),
                (60.0, 3.0, Some(12.0)),
            ]),
        );
        // req/s: 100/80, 50/45, 90/100 — two rounds ahead.
        let (s, good, n) = paired(&r, Mode::H2, |x| Some(x.rate), true).expect("rate");
        assert_eq!((s.as_str(), good, n), ("1.11 (0.90–1.25)", 2, 3));
        // p99, lower is better: 2/1, 4/5, 1/2.
        let (s, good, n) = paired(&r, Mode::H2, |x| Some(x.p99_ms), false).expect("p99");
        assert_eq!((s.as_str(), good, n), ("0.80 (0.50–2.00)", 2, 3));
        // CPU: the round without figures is left out; 10/5, 9/9.
        let (s, good, n) = paired(&r, Mode::H2, |x| x.cpu_us, false).expect("cpu");
        assert_eq!((s.as_str(), good, n), ("1.50 (1.00–2.00)", 1, 2));
        // No proxy measured in a mode (HTTP/3): no row.
        assert!(paired(&r, Mode::H3, |x| Some(x.rate), true).is_none());
    }
}
