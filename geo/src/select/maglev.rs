//! Maglev consistent hashing (Eisenbud et al., NSDI 2016) with bounded load.
//!
//! Each backend fills the lookup table along its own permutation (offset and skip from a
//! fixed-seed hash of its id), in turns proportional to its weight, until the table is full.
//! A key's hash picks a slot; the slot's backend is the first choice and the backends met
//! walking on from that slot are the fallbacks. Because the backend list is sorted by id and
//! every hash has a fixed seed, every node builds the same table from the same list: a client
//! hits the same backend whichever gateway it reaches.
//!
//! Bounded load (Mirrokni et al., "Consistent Hashing with Bounded Loads"): a backend whose
//! in-flight count has reached `⌈factor × (total + 1) × weight / Σweight⌉` is passed over for
//! the next one on the key's walk, and only offered after all others. Load is node-local, so
//! under overload different nodes may pick differently; affinity then yields to balance.

use serde::{Deserialize, Serialize};
use xxhash_rust::xxh3::xxh3_64_with_seed;

use super::{prepare, Backend, BackendSelection, SelectError, SelectInput};

/// Seeds for the per-backend permutation. Like the key seed, part of the cluster contract.
const OFFSET_SEED: u64 = 0x7063_6c73_6f66_7331; // "pclsofs1"
const SKIP_SEED: u64 = 0x7063_6c73_736b_7031; // "pclsskp1"

/// Marks a table slot not yet filled during the build.
const EMPTY: u16 = u16::MAX;

/// Largest accepted table size (32 MiB of `u16` per app).
pub const MAX_TABLE_SIZE: usize = 1 << 24;

/// Settings for consistent hashing.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct MaglevConfig {
    /// Lookup-table size: a prime larger than the backend count. With at least 100 entries
    /// per backend, each backend's share is within 1 % of its weight's. Costs 2 bytes per
    /// entry per app using a hash policy. Default 65,537.
    pub table_size: usize,
    /// Whether to cap each backend's in-flight connections (bounded load). Default true.
    pub bounded_load: bool,
    /// The cap, as a multiple of a backend's weighted share of the app's in-flight
    /// connections; 1.25 lets a backend take 25 % more than its share before keys spill to
    /// their next choice. Must be at least 1.0. Default 1.25.
    pub load_factor: f64,
}

impl Default for MaglevConfig {
    fn default() -> Self {
        MaglevConfig {
            table_size: 65_537,
            bounded_load: true,
            load_factor: 1.25,
        }
    }
}

impl MaglevConfig {
    /// Checks that the table size is a prime no larger than [`MAX_TABLE_SIZE`] and the load
    /// factor is at least 1.
    pub fn validate(&self) -> Result<(), SelectError> {
        if self.table_size > MAX_TABLE_SIZE || !is_prime(self.table_size) {
            return Err(SelectError::TableSizeNotPrime(self.table_size));
        }
        if !(self.load_factor.is_finite() && self.load_factor >= 1.0) {
            return Err(SelectError::LoadFactor(self.load_factor));
        }
        Ok(())
    }
}

fn is_prime(n: usize) -> bool {
    if n < 2 {
        return false;
    }
    let mut d = 2;
    while d * d <= n {
        if n.is_multiple_of(d) {
            return false;
        }
        d += 1;
    }
    true
}

/// A Maglev lookup table over a backend list.
#[derive(Debug)]
pub struct Maglev {
    backends: Vec<Backend>,
    table: Vec<u16>,
    total_weight: u64,
    /// `Some(factor)` when bounded load is on.
    load_factor: Option<f64>,
}

impl BackendSelection for Maglev {
    type Config = MaglevConfig;
    type Iter<'a> = MaglevIter<'a>;

    fn build(backends: Vec<Backend>, config: &MaglevConfig) -> Result<Self, SelectError> {
        config.validate()?;
        let backends = prepare(backends)?;
        if !backends.is_empty() && config.table_size <= backends.len() {
            return Err(SelectError::TableTooSmall {
                table_size: config.table_size,
                backends: backends.len(),
            });
        }
        Ok(Maglev {
            table: populate(&backends, config.table_size),
            total_weight: backends.iter().map(|b| u64::from(b.weight)).sum(),
            load_factor: config.bounded_load.then_some(config.load_factor),
            backends,
        })
    }

    fn iter<'a>(&'a self, input: &SelectInput<'_>) -> MaglevIter<'a> {
        self.iter_hash(input.key_hash())
    }

    fn backends(&self) -> &[Backend] {
        &self.backends
    }
}

/// Fills the table: in each round a backend of weight `w` takes a slot if its running target
/// allows it (so it takes about `w / max weight` of the rounds), at the next free position of
/// its permutation. Integer arithmetic only, so every node gets the same table.
fn populate(backends: &[Backend], size: usize) -> Vec<u16> {
    if backends.is_empty() {
        return Vec::new();
    }
    let m = size as u64;
    let mut table = vec![EMPTY; size];
    // (next position, skip) per backend; skip in 1..m is coprime to the prime m, so each
    // permutation visits every slot.
    let mut perm: Vec<(u64, u64)> = backends
        .iter()
        .map(|b| {
            let offset = xxh3_64_with_seed(b.id.as_bytes(), OFFSET_SEED) % m;
            let skip = xxh3_64_with_seed(b.id.as_bytes(), SKIP_SEED) % (m - 1) + 1;
            (offset, skip)
        })
        .collect();
    let max_weight = backends
        .iter()
        .map(|b| u64::from(b.weight))
        .max()
        .unwrap_or(1);
    let mut target = vec![0u64; backends.len()];
    let mut filled = 0;
    let mut round: u64 = 1;
    while filled < size {
        for (i, b) in backends.iter().enumerate() {
            if round * u64::from(b.weight) < target[i] {
                continue;
            }
            target[i] += max_weight;
            let (pos, skip) = &mut perm[i];
            loop {
                let slot = *pos as usize;
                *pos = (*pos + *skip) % m;
                if table[slot] == EMPTY {
                    // i < MAX_BACKENDS = u16::MAX, checked by `prepare`.
                    table[slot] = i as u16;
                    break;
                }
            }
            filled += 1;
            if filled == size {
                break;
            }
        }
        round += 1;
    }
    table
}

impl Maglev {
    /// The choices for a key hash (see [`SelectInput::key_hash`]).
    pub fn iter_hash(&self, key_hash: u64) -> MaglevIter<'_> {
        let start = if self.table.is_empty() {
            0
        } else {
            (key_hash % self.table.len() as u64) as usize
        };
        MaglevIter {
            maglev: self,
            slot: start,
            walked: 0,
            decided: 0,
            seen: Seen::default(),
            deferred: Vec::new(),
            deferred_pos: 0,
            total_load: None,
        }
    }

    /// The backend each table slot maps to, for tests and tools that compare tables.
    pub fn table_ids(&self) -> impl Iterator<Item = &str> + '_ {
        self.table
            .iter()
            .filter_map(|&i| self.backends.get(usize::from(i)).map(|b| b.id.as_str()))
    }

    /// The lookup-table size (0 when there are no backends).
    pub fn table_size(&self) -> usize {
        self.table.len()
    }

    /// Whether backend `i`, with `total` connections in flight over all backends, may take
    /// one more.
    fn has_room(&self, i: usize, total: &mut Option<u64>) -> bool {
        let Some(factor) = self.load_factor else {
            return true;
        };
        let Some(b) = self.backends.get(i) else {
            return false;
        };
        let load = b.load.get() as u64;
        // An idle backend always has room; this keeps the common case free of the O(n) sum.
        if load == 0 {
            return true;
        }
        let total =
            *total.get_or_insert_with(|| self.backends.iter().map(|b| b.load.get() as u64).sum());
        let share = (total + 1) as f64 * f64::from(b.weight) / self.total_weight as f64;
        (load as f64) < (factor * share).ceil()
    }
}

/// Backends already decided for this request: the first inline, the rest in a bitset that
/// is only allocated when a fallback is needed.
#[derive(Debug, Default)]
struct Seen {
    first: Option<u16>,
    bits: Vec<u64>,
}

impl Seen {
    fn insert(&mut self, i: u16, n: usize) -> bool {
        if self.first.is_none() {
            self.first = Some(i);
            return true;
        }
        if self.first == Some(i) {
            return false;
        }
        if self.bits.is_empty() {
            self.bits = vec![0; n.div_ceil(64)];
        }
        let (word, bit) = (usize::from(i) / 64, usize::from(i) % 64);
        match self.bits.get_mut(word) {
            Some(w) if *w & (1 << bit) == 0 => {
                *w |= 1 << bit;
                true
            }
            _ => false,
        }
    }
}

/// Iterator of [`Maglev`]: the key's slot, then the distinct backends met walking on through
/// the table; over-loaded backends are held back until the end.
#[derive(Debug)]
pub struct MaglevIter<'a> {
    maglev: &'a Maglev,
    slot: usize,
    walked: usize,
    decided: usize,
    seen: Seen,
    deferred: Vec<u16>,
    deferred_pos: usize,
    total_load: Option<u64>,
}

impl<'a> Iterator for MaglevIter<'a> {
    type Item = &'a Backend;

    fn next(&mut self) -> Option<&'a Backend> {
        let m = self.maglev;
        let (size, n) = (m.table.len(), m.backends.len());
        while self.decided < n && self.walked < size {
            let i = m.table[self.slot];
            self.slot = (self.slot + 1) % size;
            self.walked += 1;
            if !self.seen.insert(i, n) {
                continue;
            }
            self.decided += 1;
            if m.has_room(usize::from(i), &mut self.total_load) {
                return m.backends.get(usize::from(i));
            }
            self.deferred.push(i);
        }
        let &i = self.deferred.get(self.deferred_pos)?;
        self.deferred_pos += 1;
        m.backends.get(usize::from(i))
    }
}

#[cfg(test)]
mod tests;
