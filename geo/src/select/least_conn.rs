//! Least connections: the backend with the fewest in-flight connections per unit of weight.

use std::sync::atomic::{AtomicUsize, Ordering};

use super::{prepare, Backend, BackendSelection, SelectError, SelectInput};

/// Least connections over [`Backend::load`]. Ties go to the first backend after a rotating
/// start, so idle backends share the traffic instead of the first one taking all of it.
/// Each selection reads every backend's counter: O(backends).
#[derive(Debug)]
pub struct LeastConnections {
    backends: Vec<Backend>,
    cursor: AtomicUsize,
}

impl LeastConnections {
    /// The next request's choices (what [`BackendSelection::iter`] returns).
    pub fn iter_least(&self) -> LeastConnIter<'_> {
        let n = self.backends.len().max(1);
        LeastConnIter {
            sel: self,
            start: self.cursor.fetch_add(1, Ordering::Relaxed) % n,
            state: State::Fresh,
        }
    }

    /// `a` is less loaded than `b`, comparing load / weight without dividing.
    fn less_loaded(&self, (la, a): (usize, usize), (lb, b): (usize, usize)) -> bool {
        let (wa, wb) = (self.weight(a), self.weight(b));
        (la as u128) * wb < (lb as u128) * wa
    }

    fn weight(&self, i: usize) -> u128 {
        self.backends.get(i).map_or(1, |b| u128::from(b.weight))
    }
}

impl BackendSelection for LeastConnections {
    type Config = ();
    type Iter<'a> = LeastConnIter<'a>;

    fn build(backends: Vec<Backend>, _: &()) -> Result<Self, SelectError> {
        Ok(LeastConnections {
            backends: prepare(backends)?,
            cursor: AtomicUsize::new(0),
        })
    }

    fn iter<'a>(&'a self, _: &SelectInput<'_>) -> LeastConnIter<'a> {
        self.iter_least()
    }

    fn backends(&self) -> &[Backend] {
        &self.backends
    }
}

/// Iterator of [`LeastConnections`]: the least loaded first, then by increasing load.
#[derive(Debug)]
pub struct LeastConnIter<'a> {
    sel: &'a LeastConnections,
    start: usize,
    state: State,
}

#[derive(Debug)]
enum State {
    Fresh,
    First(usize),
    /// The remaining order, computed only when a fallback is needed.
    Rest(Vec<usize>, usize),
    Done,
}

impl<'a> Iterator for LeastConnIter<'a> {
    type Item = &'a Backend;

    fn next(&mut self) -> Option<&'a Backend> {
        let backends = &self.sel.backends;
        let n = backends.len();
        let idx = match std::mem::replace(&mut self.state, State::Done) {
            State::Fresh if n == 0 => return None,
            State::Fresh => {
                let mut best = (backends[self.start].load.get(), self.start);
                for k in 1..n {
                    let i = (self.start + k) % n;
                    let cand = (backends[i].load.get(), i);
                    if self.sel.less_loaded(cand, best) {
                        best = cand;
                    }
                }
                self.state = State::First(best.1);
                best.1
            }
            State::First(first) => {
                // Snapshot the loads: they change under us, and a sort needs stable keys.
                let mut rest: Vec<(usize, usize, usize)> = (1..n)
                    .map(|k| (self.start + k) % n)
                    .chain(std::iter::once(self.start))
                    .filter(|&i| i != first)
                    .enumerate()
                    .map(|(rank, i)| (backends[i].load.get(), rank, i))
                    .collect();
                rest.sort_by(|&(la, ra, a), &(lb, rb, b)| {
                    let (wa, wb) = (self.sel.weight(a), self.sel.weight(b));
                    ((la as u128) * wb)
                        .cmp(&((lb as u128) * wa))
                        .then(ra.cmp(&rb))
                });
                let order: Vec<usize> = rest.into_iter().map(|(_, _, i)| i).collect();
                let &i = order.first()?;
                self.state = State::Rest(order, 1);
                i
            }
            State::Rest(order, pos) => {
                let &i = order.get(pos)?;
                self.state = State::Rest(order, pos + 1);
                i
            }
            State::Done => return None,
        };
        backends.get(idx)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn lc(loads_weights: &[(usize, u32)]) -> (LeastConnections, Vec<Vec<super::super::LoadGuard>>) {
        let mut guards = Vec::new();
        let backends = loads_weights
            .iter()
            .enumerate()
            .map(|(i, &(load, w))| {
                let b = Backend::new(format!("b{i}"), "r").with_weight(w);
                guards.push((0..load).map(|_| b.load.acquire()).collect());
                b
            })
            .collect();
        (
            LeastConnections::build(backends, &()).expect("valid"),
            guards,
        )
    }

    #[test]
    fn picks_least_loaded_per_weight() {
        let (s, _g) = lc(&[(5, 1), (2, 1), (9, 1)]);
        assert_eq!(s.iter_least().next().map(|b| b.id.as_str()), Some("b1"));
        // 6 connections on weight 4 (1.5 each) beats 2 on weight 1.
        let (s, _g) = lc(&[(2, 1), (6, 4), (3, 1)]);
        assert_eq!(s.iter_least().next().map(|b| b.id.as_str()), Some("b1"));
    }

    #[test]
    fn fallbacks_follow_increasing_load() {
        let (s, _g) = lc(&[(5, 1), (2, 1), (9, 1), (0, 1)]);
        let order: Vec<_> = s.iter_least().map(|b| b.id.clone()).collect();
        assert_eq!(order, ["b3", "b1", "b0", "b2"]);
    }

    #[test]
    fn ties_rotate_across_idle_backends() {
        let (s, _g) = lc(&[(0, 1), (0, 1), (0, 1)]);
        let firsts: std::collections::BTreeSet<_> = (0..3)
            .map(|_| s.iter_least().next().map(|b| b.id.clone()))
            .collect();
        assert_eq!(firsts.len(), 3);
    }

    #[test]
    fn spreads_held_connections_evenly() {
        let (s, _g) = lc(&[(0, 1), (0, 2), (0, 1)]);
        let mut held = Vec::new();
        for _ in 0..400 {
            let b = s.iter_least().next().expect("a backend");
            held.push(b.load.acquire());
        }
        let loads: Vec<usize> = s.backends().iter().map(|b| b.load.get()).collect();
        assert_eq!(loads.iter().sum::<usize>(), 400);
        assert!((99..=101).contains(&loads[0]), "{loads:?}");
        assert!((199..=201).contains(&loads[1]), "{loads:?}");
        drop(held);
        assert!(s.backends().iter().all(|b| b.load.get() == 0));
    }
}
