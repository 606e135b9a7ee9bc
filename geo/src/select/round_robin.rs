//! Weighted round robin without a lock or a schedule table.
//!
//! Request number `c` maps to position `(c · stride) mod W` on the line of total weight `W`,
//! where each backend owns a segment as long as its weight, and `stride` is coprime to `W`
//! and close to `W / φ`. Over every `W` consecutive requests each position is hit exactly
//! once, so each backend gets exactly its weight; the golden-ratio stride spreads a heavy
//! backend's turns out instead of giving them in a burst. One atomic add per request.

use std::collections::hash_map::RandomState;
use std::hash::BuildHasher;
use std::sync::atomic::{AtomicU64, Ordering};

use super::{prepare, Backend, BackendSelection, SelectError, SelectInput};

/// Weighted round robin. Fallbacks after the first choice are the following backends in id
/// order, wrapping around.
#[derive(Debug)]
pub struct WeightedRoundRobin {
    backends: Vec<Backend>,
    /// `ends[i]` is the end (exclusive) of backend `i`'s segment.
    ends: Vec<u64>,
    total: u64,
    stride: u64,
    cursor: AtomicU64,
}

impl WeightedRoundRobin {
    /// The next request's choices (what [`BackendSelection::iter`] returns).
    pub fn iter_next(&self) -> RoundRobinIter<'_> {
        let first = if self.total == 0 {
            0
        } else {
            let c = self.cursor.fetch_add(1, Ordering::Relaxed) % self.total;
            // Both factors are below 2^30 (65,535 backends × weight 10,000), so no overflow.
            let pos = c * self.stride % self.total;
            self.ends.partition_point(|&end| end <= pos)
        };
        RoundRobinIter {
            backends: &self.backends,
            first,
            taken: 0,
        }
    }
}

impl BackendSelection for WeightedRoundRobin {
    type Config = ();
    type Iter<'a> = RoundRobinIter<'a>;

    fn build(backends: Vec<Backend>, _: &()) -> Result<Self, SelectError> {
        let backends = prepare(backends)?;
        let ends: Vec<u64> = backends
            .iter()
            .scan(0u64, |sum, b| {
                *sum += u64::from(b.weight);
                Some(*sum)
            })
            .collect();
        let total = ends.last().copied().unwrap_or(0);
        Ok(WeightedRoundRobin {
            stride: golden_stride(total),
            ends,
            total,
            backends,
            // Start each node (and each rebuild) at a different place in the cycle, so that
            // nodes restarted together don't all send their first request to one backend.
            cursor: AtomicU64::new(RandomState::new().hash_one(0u8)),
        })
    }

    fn iter<'a>(&'a self, _: &SelectInput<'_>) -> RoundRobinIter<'a> {
        self.iter_next()
    }

    fn backends(&self) -> &[Backend] {
        &self.backends
    }
}

/// The step closest to `total / φ` that is coprime to `total` (so it visits every position).
fn golden_stride(total: u64) -> u64 {
    if total <= 1 {
        return 1;
    }
    // total < 2^30, exact in f64.
    let mut stride = ((total as f64 * 0.618_033_988_749_895) as u64).max(1);
    while gcd(stride, total) != 1 {
        stride += 1;
    }
    stride
}

fn gcd(mut a: u64, mut b: u64) -> u64 {
    while b != 0 {
        (a, b) = (b, a % b);
    }
    a
}

/// Iterator of [`WeightedRoundRobin`].
#[derive(Debug)]
pub struct RoundRobinIter<'a> {
    backends: &'a [Backend],
    first: usize,
    taken: usize,
}

impl<'a> Iterator for RoundRobinIter<'a> {
    type Item = &'a Backend;
    fn next(&mut self) -> Option<&'a Backend> {
        let n = self.backends.len();
        if self.taken >= n {
            return None;
        }
        let i = (self.first + self.taken) % n;
        self.taken += 1;
        self.backends.get(i)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::collections::BTreeMap;

    fn weighted(ws: &[u32]) -> WeightedRoundRobin {
        let backends = ws
            .iter()
            .enumerate()
            .map(|(i, &w)| Backend::new(format!("b{i}"), "r").with_weight(w))
            .collect();
        WeightedRoundRobin::build(backends, &()).expect("valid backends")
    }

    fn counts(rr: &WeightedRoundRobin, requests: usize) -> BTreeMap<String, usize> {
        let mut m = BTreeMap::new();
        for _ in 0..requests {
            let b = rr.iter_next().next().expect("a backend");
            *m.entry(b.id.clone()).or_insert(0) += 1;
        }
        m
    }

    #[test]
    fn every_cycle_gives_each_backend_exactly_its_weight() {
        for ws in [
            &[1, 1, 1][..],
            &[5, 1, 1],
            &[3, 0, 7, 2],
            &[1],
            &[10_000, 1],
        ] {
            let rr = weighted(ws);
            let total: u32 = ws.iter().sum();
            let c = counts(&rr, total as usize * 3);
            for (i, &w) in ws.iter().enumerate() {
                let got = c.get(&format!("b{i}")).copied().unwrap_or(0);
                assert_eq!(got, w as usize * 3, "weights {ws:?}, backend {i}");
            }
        }
    }

    #[test]
    fn heavy_backend_is_interleaved_not_bursty() {
        let rr = weighted(&[2, 1, 1]);
        let mut run = 0;
        let mut longest = 0;
        for _ in 0..400 {
            let b = rr.iter_next().next().expect("a backend");
            run = if b.id == "b0" { run + 1 } else { 0 };
            longest = longest.max(run);
        }
        assert!(longest <= 2, "b0 chosen {longest} times in a row");
    }

    #[test]
    fn fallbacks_cover_every_backend_once() {
        let rr = weighted(&[1, 2, 3, 4]);
        for _ in 0..20 {
            let mut ids: Vec<_> = rr.iter_next().map(|b| b.id.clone()).collect();
            ids.sort();
            assert_eq!(ids, ["b0", "b1", "b2", "b3"]);
        }
    }

    #[test]
    fn empty_and_drained_yield_nothing() {
        assert!(weighted(&[]).iter_next().next().is_none());
        assert!(weighted(&[0, 0]).iter_next().next().is_none());
    }

    #[test]
    fn stride_is_coprime() {
        for total in 1..2000 {
            assert_eq!(gcd(golden_stride(total), total), 1, "total {total}");
        }
    }
}
