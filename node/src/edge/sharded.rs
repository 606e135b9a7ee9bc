//! A string-keyed hash map split into shards behind `Arc`s, for the per-app and per-instance
//! maps of the routing snapshot.
//!
//! A snapshot is immutable, and each state change compiles the next one. With one plain map,
//! the next snapshot would copy every entry (65,536 instances) to change one. Here a clone
//! copies only the shard pointers, and a change copies only its key's shard (about
//! len / 256 entries); every other shard stays shared with the previous snapshot.

use std::collections::HashMap;
use std::hash::BuildHasher;
use std::sync::Arc;

use foldhash::fast::{FixedState, RandomState};

const SHARDS: usize = 256;

#[derive(Clone)]
pub struct ShardedMap<V> {
    shards: Vec<Arc<HashMap<String, V, RandomState>>>,
}

impl<V> Default for ShardedMap<V> {
    fn default() -> Self {
        ShardedMap {
            shards: (0..SHARDS).map(|_| Arc::new(HashMap::default())).collect(),
        }
    }
}

impl<V> std::fmt::Debug for ShardedMap<V> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ShardedMap").finish_non_exhaustive()
    }
}

/// Which shard `key` lives in. A fixed (unkeyed) hasher: the shard must depend only on the
/// key, so lookups in a cloned map find what was inserted. foldhash, not SipHash: every
/// request looks up several keys (route, selector, health), and two SipHashes per lookup
/// were measurable. A fixed hash can be steered, but only into one shard's size (what a
/// change copies); each shard's own table is randomly seeded, so lookups stay O(1).
fn shard(key: &str) -> usize {
    let h = FixedState::with_seed(0x5eed_f5a4).hash_one(key);
    // SHARDS is a power of two; foldhash's low bits are uniform.
    (h as usize) & (SHARDS - 1)
}

impl<V> ShardedMap<V> {
    pub fn get(&self, key: &str) -> Option<&V> {
        self.shards[shard(key)].get(key)
    }

    pub fn contains_key(&self, key: &str) -> bool {
        self.get(key).is_some()
    }

    /// Every entry, in no particular order.
    pub fn iter(&self) -> impl Iterator<Item = (&String, &V)> {
        self.shards.iter().flat_map(|s| s.iter())
    }

    pub fn values(&self) -> impl Iterator<Item = &V> {
        self.iter().map(|(_, v)| v)
    }
}

impl<V: Clone> ShardedMap<V> {
    /// The shard of `key`, copied first if another snapshot shares it.
    fn shard_mut(&mut self, key: &str) -> &mut HashMap<String, V, RandomState> {
        Arc::make_mut(&mut self.shards[shard(key)])
    }

    pub fn insert(&mut self, key: String, value: V) -> Option<V> {
        self.shard_mut(&key).insert(key, value)
    }

    pub fn remove(&mut self, key: &str) -> Option<V> {
        // Look first: removing an absent key must not copy a shared shard.
        if !self.contains_key(key) {
            return None;
        }
        self.shard_mut(key).remove(key)
    }
}

impl<V: Clone> FromIterator<(String, V)> for ShardedMap<V> {
    fn from_iter<I: IntoIterator<Item = (String, V)>>(iter: I) -> Self {
        let mut m = ShardedMap::default();
        for (k, v) in iter {
            m.insert(k, v);
        }
        m
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn clones_share_untouched_shards() {
        let mut a: ShardedMap<u32> = (0..10_000).map(|i| (format!("k{i}"), i)).collect();
        let b = a.clone();
        a.insert("k1".into(), 99);
        assert_eq!(a.remove("k2"), Some(2));
        assert_eq!(a.remove("nope"), None);
        assert_eq!((a.get("k1"), b.get("k1")), (Some(&99), Some(&1)));
        assert_eq!((a.get("k2"), b.get("k2")), (None, Some(&2)));
        assert_eq!((a.iter().count(), b.iter().count()), (9_999, 10_000));
        let shared = a
            .shards
            .iter()
            .zip(&b.shards)
            .filter(|(x, y)| Arc::ptr_eq(x, y))
            .count();
        // At most the two changed keys' shards were copied.
        assert!(shared >= SHARDS - 2, "{shared}");
    }
}
