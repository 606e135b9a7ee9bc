//! Backend selection: which instance of an app gets the next connection.
//!
//! Modelled on pingora's `BackendSelection`: a selector is built once from a backend list
//! (rebuilt when the list changes) and, per request, yields an iterator. The first item is the
//! choice; each further item is the next choice when the previous one cannot be used
//! (unhealthy, connect failure). Every backend is yielded at most once, so
//! `iter.find(|b| usable(b))` terminates. The caller owns health; selectors only order.
//!
//! Methods: [`WeightedRoundRobin`], [`LeastConnections`], [`Maglev`] (consistent hash with
//! bounded load), and [`GeoSelector`] (nearest region, then one of the others inside it).
//! [`Selector`] builds the right one from an [`LbPolicy`].

mod cookie;
mod geo;
mod least_conn;
mod maglev;
mod policy;
mod round_robin;

use std::net::IpAddr;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;

use serde::{Deserialize, Serialize};

pub use cookie::cookie_value;
pub use geo::{GeoIter, GeoSelector, GeoSelectorConfig};
pub use least_conn::{LeastConnIter, LeastConnections};
pub use maglev::{Maglev, MaglevConfig, MaglevIter, MAX_TABLE_SIZE};
pub use policy::{HashKey, LbPolicy, PolicyParseError, RegionMethod};
pub use round_robin::{RoundRobinIter, WeightedRoundRobin};

use crate::lookup::Location;
use crate::region::{Region, RegionError};

/// Largest accepted backend weight. Weights are relative; 0 means drained (never chosen).
pub const MAX_WEIGHT: u32 = 10_000;

/// Most backends one selector accepts (Maglev stores indices as `u16`).
pub const MAX_BACKENDS: usize = u16::MAX as usize;

/// One instance of an app that connections can be sent to.
#[derive(Debug, Clone)]
pub struct Backend {
    /// Unique, stable identifier (the CVM instance id). Consistent hashing orders backends by
    /// it, so every node must use the same ids.
    pub id: String,
    /// The region the instance runs in (a [`Region::name`]).
    pub region: String,
    /// Relative weight, 0..=[`MAX_WEIGHT`]; 0 drains the backend.
    pub weight: u32,
    /// In-flight connections on this node: soft state for least-conn and bounded load. Keep
    /// one counter per instance across selector rebuilds so counts survive a route change.
    pub load: LoadCounter,
}

impl Backend {
    /// A backend with weight 1 and a fresh load counter.
    pub fn new(id: impl Into<String>, region: impl Into<String>) -> Backend {
        Backend {
            id: id.into(),
            region: region.into(),
            weight: 1,
            load: LoadCounter::default(),
        }
    }

    /// Sets the weight.
    pub fn with_weight(mut self, weight: u32) -> Backend {
        self.weight = weight;
        self
    }

    /// Shares an existing load counter (e.g. kept in a map by instance id).
    pub fn with_load(mut self, load: LoadCounter) -> Backend {
        self.load = load;
        self
    }
}

/// A shared count of in-flight connections to one backend on this node.
#[derive(Debug, Clone, Default)]
pub struct LoadCounter(Arc<AtomicUsize>);

impl LoadCounter {
    /// The current count.
    pub fn get(&self) -> usize {
        self.0.load(Ordering::Relaxed)
    }

    /// Counts one connection until the guard is dropped.
    pub fn acquire(&self) -> LoadGuard {
        self.0.fetch_add(1, Ordering::Relaxed);
        LoadGuard(self.clone())
    }
}

/// Holds one unit of a [`LoadCounter`]; releases it on drop.
#[derive(Debug)]
pub struct LoadGuard(LoadCounter);

impl Drop for LoadGuard {
    fn drop(&mut self) {
        self.0 .0.fetch_sub(1, Ordering::Relaxed);
    }
}

/// What a selector may look at for one request.
#[derive(Debug, Clone, Copy)]
pub struct SelectInput<'a> {
    /// The client address (after trusted PROXY protocol / X-Forwarded-For handling).
    pub client_ip: IpAddr,
    /// The client's location, for `geo` policies; `None` if unknown.
    pub location: Option<&'a Location>,
    /// For `hash:header=…` / `hash:cookie=…`: the header or cookie value (see
    /// [`LbPolicy::hash_key`] and [`cookie_value`]). `None` hashes the client address.
    pub hash_key: Option<&'a [u8]>,
}

impl<'a> SelectInput<'a> {
    /// Input with only a client address.
    pub fn new(client_ip: IpAddr) -> SelectInput<'a> {
        SelectInput {
            client_ip,
            location: None,
            hash_key: None,
        }
    }

    /// Sets the client location.
    pub fn with_location(mut self, location: Option<&'a Location>) -> SelectInput<'a> {
        self.location = location;
        self
    }

    /// Sets the hash key bytes.
    pub fn with_hash_key(mut self, key: Option<&'a [u8]>) -> SelectInput<'a> {
        self.hash_key = key;
        self
    }

    /// The 64-bit hash consistent hashing uses: of the key bytes if present, else of the
    /// client address (IPv4-mapped IPv6 hashed as IPv4).
    pub fn key_hash(&self) -> u64 {
        match self.hash_key {
            Some(key) => hash_bytes(key),
            None => match self.client_ip.to_canonical() {
                IpAddr::V4(v4) => hash_bytes(&v4.octets()),
                IpAddr::V6(v6) => hash_bytes(&v6.octets()),
            },
        }
    }
}

/// Seed for hashing request keys. Part of the cluster's wire contract: every node must hash
/// the same way, so changing it remaps every client.
const KEY_SEED: u64 = 0x7063_6c73_6b65_7931; // "pclskey1"

/// The fixed-seed hash (XXH3-64) used for request keys.
pub fn hash_bytes(bytes: &[u8]) -> u64 {
    xxhash_rust::xxh3::xxh3_64_with_seed(bytes, KEY_SEED)
}

/// A selection algorithm over a fixed backend list (pingora's `BackendSelection`).
pub trait BackendSelection: Sized {
    /// Build-time settings.
    type Config;
    /// Yields the first choice, then the fallbacks, each backend at most once.
    type Iter<'a>: Iterator<Item = &'a Backend>
    where
        Self: 'a;

    /// Builds the selector. Backends are sorted by id; weight-0 backends are dropped.
    fn build(backends: Vec<Backend>, config: &Self::Config) -> Result<Self, SelectError>;

    /// The choices for one request, best first.
    fn iter<'a>(&'a self, input: &SelectInput<'_>) -> Self::Iter<'a>;

    /// The selectable backends, sorted by id.
    fn backends(&self) -> &[Backend];
}

/// A backend list or selector setting that cannot be used.
#[derive(Debug, Clone, PartialEq, thiserror::Error)]
pub enum SelectError {
    /// Two backends share an id.
    #[error("backend id {0:?} appears twice")]
    DuplicateBackend(String),
    /// A weight above [`MAX_WEIGHT`].
    #[error("backend {id:?} has weight {weight}, above the maximum {MAX_WEIGHT}")]
    WeightTooLarge {
        /// The backend.
        id: String,
        /// The rejected weight.
        weight: u32,
    },
    /// More backends than [`MAX_BACKENDS`].
    #[error("{0} backends given, more than the maximum {MAX_BACKENDS}")]
    TooManyBackends(usize),
    /// The Maglev table size is not a prime.
    #[error("maglev table size {0} is not a prime")]
    TableSizeNotPrime(usize),
    /// The Maglev table is not larger than the backend count.
    #[error("maglev table size {table_size} must exceed the backend count {backends}")]
    TableTooSmall {
        /// The configured size.
        table_size: usize,
        /// The number of backends.
        backends: usize,
    },
    /// The bounded-load factor is below 1 or not finite.
    #[error("hash load factor {0} must be a finite number >= 1.0")]
    LoadFactor(f64),
    /// A region definition is invalid.
    #[error(transparent)]
    Region(#[from] RegionError),
    /// The home region is not among the configured regions.
    #[error("home region {0:?} is not a configured region")]
    UnknownHomeRegion(String),
}

/// Sorts by id, rejects duplicates and bad weights, drops drained backends.
pub(crate) fn prepare(mut backends: Vec<Backend>) -> Result<Vec<Backend>, SelectError> {
    backends.sort_by(|a, b| a.id.cmp(&b.id));
    for pair in backends.windows(2) {
        if pair[0].id == pair[1].id {
            return Err(SelectError::DuplicateBackend(pair[0].id.clone()));
        }
    }
    if let Some(b) = backends.iter().find(|b| b.weight > MAX_WEIGHT) {
        return Err(SelectError::WeightTooLarge {
            id: b.id.clone(),
            weight: b.weight,
        });
    }
    backends.retain(|b| b.weight > 0);
    if backends.len() > MAX_BACKENDS {
        return Err(SelectError::TooManyBackends(backends.len()));
    }
    Ok(backends)
}

/// Settings shared by all apps' selectors on a node.
#[derive(Debug, Clone, PartialEq, Default, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct SelectConfig {
    /// Consistent hashing (`hash:*`, `geo+hash:*`).
    pub hash: MaglevConfig,
    /// This node's region. When a client's location is unknown, `geo` policies rank regions
    /// from here, so such clients stay local. Default: none (configured region order).
    pub home_region: Option<String>,
}

impl SelectConfig {
    /// Checks the settings and that `home_region` is one of `regions`.
    pub fn validate(&self, regions: &[Region]) -> Result<(), SelectError> {
        self.hash.validate()?;
        crate::region::validate_regions(regions)?;
        if let Some(home) = &self.home_region {
            if !regions.iter().any(|r| &r.name == home) {
                return Err(SelectError::UnknownHomeRegion(home.clone()));
            }
        }
        Ok(())
    }
}

/// The non-geographic methods, used directly or inside one region.
#[derive(Debug)]
pub(crate) enum LocalSelector {
    RoundRobin(WeightedRoundRobin),
    LeastConn(LeastConnections),
    Hash(Maglev),
}

impl LocalSelector {
    fn build(
        method: &RegionMethod,
        backends: Vec<Backend>,
        config: &SelectConfig,
    ) -> Result<Self, SelectError> {
        Ok(match method {
            RegionMethod::RoundRobin => {
                LocalSelector::RoundRobin(WeightedRoundRobin::build(backends, &())?)
            }
            RegionMethod::LeastConn => {
                LocalSelector::LeastConn(LeastConnections::build(backends, &())?)
            }
            RegionMethod::Hash(_) => LocalSelector::Hash(Maglev::build(backends, &config.hash)?),
        })
    }

    fn iter_hashed(&self, key_hash: u64) -> LocalIter<'_> {
        match self {
            LocalSelector::RoundRobin(s) => LocalIter::RoundRobin(s.iter_next()),
            LocalSelector::LeastConn(s) => LocalIter::LeastConn(s.iter_least()),
            LocalSelector::Hash(s) => LocalIter::Hash(s.iter_hash(key_hash)),
        }
    }

    fn backends(&self) -> &[Backend] {
        match self {
            LocalSelector::RoundRobin(s) => s.backends(),
            LocalSelector::LeastConn(s) => s.backends(),
            LocalSelector::Hash(s) => s.backends(),
        }
    }
}

/// Iterator of a [`LocalSelector`].
#[derive(Debug)]
pub(crate) enum LocalIter<'a> {
    RoundRobin(RoundRobinIter<'a>),
    LeastConn(LeastConnIter<'a>),
    Hash(MaglevIter<'a>),
}

impl<'a> Iterator for LocalIter<'a> {
    type Item = &'a Backend;
    fn next(&mut self) -> Option<&'a Backend> {
        match self {
            LocalIter::RoundRobin(i) => i.next(),
            LocalIter::LeastConn(i) => i.next(),
            LocalIter::Hash(i) => i.next(),
        }
    }
}

/// The selector for one app, built from its [`LbPolicy`]. Rebuild it (and swap it in with
/// the route snapshot) whenever the app's backends or policy change.
#[derive(Debug)]
pub struct Selector {
    policy: LbPolicy,
    kind: Kind,
}

#[derive(Debug)]
enum Kind {
    Local(LocalSelector),
    Geo(GeoSelector),
}

impl Selector {
    /// Builds the selector `policy` calls for. `regions` is only used by `geo` policies.
    pub fn build(
        policy: &LbPolicy,
        backends: Vec<Backend>,
        regions: &[Region],
        config: &SelectConfig,
    ) -> Result<Selector, SelectError> {
        let kind = match policy {
            LbPolicy::RoundRobin => Kind::Local(LocalSelector::build(
                &RegionMethod::RoundRobin,
                backends,
                config,
            )?),
            LbPolicy::LeastConn => Kind::Local(LocalSelector::build(
                &RegionMethod::LeastConn,
                backends,
                config,
            )?),
            LbPolicy::Hash(key) => Kind::Local(LocalSelector::build(
                &RegionMethod::Hash(key.clone()),
                backends,
                config,
            )?),
            LbPolicy::Geo(method) => Kind::Geo(GeoSelector::build(
                backends,
                &GeoSelectorConfig {
                    method: method.clone(),
                    regions: regions.to_vec(),
                    select: config.clone(),
                },
            )?),
        };
        Ok(Selector {
            policy: policy.clone(),
            kind,
        })
    }

    /// The policy this selector implements.
    pub fn policy(&self) -> &LbPolicy {
        &self.policy
    }

    /// The choices for one request, best first; each backend at most once.
    pub fn iter<'a>(&'a self, input: &SelectInput<'_>) -> SelectIter<'a> {
        match &self.kind {
            Kind::Local(local) => {
                // Only hashing needs the key; skip hashing for the other methods.
                let hash = match local {
                    LocalSelector::Hash(_) => input.key_hash(),
                    _ => 0,
                };
                SelectIter(SelectIterKind::Local(local.iter_hashed(hash)))
            }
            Kind::Geo(geo) => SelectIter(SelectIterKind::Geo(geo.iter(input))),
        }
    }

    /// The first choice that `usable` accepts (e.g. healthy and not yet tried).
    pub fn select<'a>(
        &'a self,
        input: &SelectInput<'_>,
        mut usable: impl FnMut(&Backend) -> bool,
    ) -> Option<&'a Backend> {
        self.iter(input).find(|b| usable(b))
    }

    /// The selectable backends (weight > 0).
    pub fn backends(&self) -> &[Backend] {
        match &self.kind {
            Kind::Local(local) => local.backends(),
            Kind::Geo(geo) => geo.backends(),
        }
    }
}

/// Iterator returned by [`Selector::iter`].
#[derive(Debug)]
pub struct SelectIter<'a>(SelectIterKind<'a>);

#[derive(Debug)]
enum SelectIterKind<'a> {
    Local(LocalIter<'a>),
    Geo(GeoIter<'a>),
}

impl<'a> Iterator for SelectIter<'a> {
    type Item = &'a Backend;
    fn next(&mut self) -> Option<&'a Backend> {
        match &mut self.0 {
            SelectIterKind::Local(i) => i.next(),
            SelectIterKind::Geo(i) => i.next(),
        }
    }
}

#[cfg(test)]
mod tests;
